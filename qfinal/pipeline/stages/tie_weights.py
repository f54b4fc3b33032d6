"""Stage 5: tie every pair the model declares, and prove each pair shares storage.

Disk/CPU offload hooks are attached after tying, so accelerate sees the ties it must keep.
"""

from __future__ import annotations

from qfinal.adapters.peft_model import base_model_of
from qfinal.compat import transformers as _hf
from qfinal.pipeline.context import Context, Outcome
from qfinal.pipeline.stages.base import BaseStage
from qfinal.report import TiedKey


def audit_ties(model, offload_index: dict | None = None) -> list[TiedKey]:
    """Every tie the config asks for, refused ones included (transformers drops a tie from
    `all_tied_weights_keys` when the checkpoint holds two different tensors for it).

    Offloaded halves share storage only if accelerate's offload index sends both names to the same
    bytes; an offloaded pair with no index entry counts as shared only if it is one Parameter."""
    from qfinal.checks.ties import declared_ties, same_tensor

    model = base_model_of(model)
    return [
        TiedKey(target=t.target, source=t.source, shared=bool(same_tensor(model, t.target, t.source, offload_index)))
        for t in declared_ties(model)
        if t.requested
    ]


class TieWeights(BaseStage):
    name = "tie_weights"

    def run(self, ctx: Context) -> Outcome:
        model, info = base_model_of(ctx.model), ctx.loading_info
        if ctx.config.tie_weights:
            _hf.tie_and_adjust(model, info)
        else:
            _hf.adjust_keys(model, info)
        keys = ctx.report.keys
        keys.missing = sorted(info.missing_keys)
        keys.unexpected = sorted(info.unexpected_keys)
        device_map = ctx.device_map
        hooked = ""
        if device_map is not None and (len(set(device_map.values())) > 1 or "disk" in device_map.values()):
            if not getattr(model, "_qfinal_dispatched", False):  # a second run must not hook twice
                _hf.accelerate_dispatch(
                    model, ctx.hf_quantizer, device_map, ctx.config.offload_folder, ctx.disk_offload_index, False
                )
                model._qfinal_dispatched = True
            hooked = "; offload hooks attached"
        keys.tied = audit_ties(model, ctx.disk_offload_index)  # after dispatch: what the forward will use
        shared = sum(t.shared for t in keys.tied)
        if not ctx.config.tie_weights:
            return Outcome("skipped by request", f"{len(keys.tied)} declared tie(s) left untied{hooked}")
        if not keys.tied:
            return Outcome("nothing to do", f"the model declares no tied weights{hooked}")
        return Outcome("ran", f"{shared}/{len(keys.tied)} tie(s) share storage{hooked}")
