"""What a merge cost: the merged checkpoint's logits against the base with the adapters unmerged.

Loads both whole (the base as stored, bnb layers included, with peft's unmerged adapter layers on
top; the merged checkpoint plainly), so it is opt-out (`--no-compare`) on bases too big for memory.
Several adapters are active together where peft allows it (LoRA-family tuners), which is what
their sequential merge approximates.
"""

from __future__ import annotations

import warnings
from pathlib import Path


def logits_change(base: Path, merged: Path, plan) -> dict:
    """{"logits_max_abs", "kl_divergence", "top1_agreement", "positions", "adapters_active"}."""
    import torch
    import transformers
    from peft import PeftModel

    from qfinal.compare.outputs import output_metrics, probe_batch, probe_logits
    from qfinal.compat.transformers_layout import architecture_class

    config = transformers.AutoConfig.from_pretrained(base)
    _name, cls = architecture_class(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unmerged = cls.from_pretrained(base).eval()
        names = [a["name"] for a in plan.adapters]
        paths = [a["path"] for a in plan.adapters]
        model = PeftModel.from_pretrained(unmerged, paths[0], adapter_name=names[0])
        for path, name in zip(paths[1:], names[1:]):
            model.load_adapter(path, adapter_name=name)
        active = names[:1]
        if len(names) > 1:
            try:
                model.base_model.set_adapter(names)
                active = names
            except (ValueError, TypeError, AttributeError):
                pass
        probe = probe_batch(unmerged)
        reference = probe_logits(model, probe)
        del model, unmerged
        result = cls.from_pretrained(merged, dtype=getattr(torch, plan.dtype)).eval()
        candidate = probe_logits(result, probe)
    diff = output_metrics(candidate, reference)
    return {
        "logits_max_abs": diff.logits_max_abs,
        "kl_divergence": diff.kl_divergence,
        "top1_agreement": diff.top1_agreement,
        "positions": diff.positions,
        "adapters_active": active,
    }
