"""Which weights of a transformers architecture are stored in Conv1D layout ([in, out]).

Kept apart from `compat.transformers`, which imports transformers when it is imported: the
common answer ("no Conv1D") is read from transformers' installed source files without importing
it, so a model without Conv1D is dequantized without importing transformers at all.
"""

from __future__ import annotations

import re
from pathlib import Path

from qfinal.errors import CheckpointError

_TWO_DOT_IMPORT = re.compile(r"^\s*from\s+\.\.(?!\.)", re.MULTILINE)  # another model's package


def _single_model(config: dict) -> bool:
    """One architecture, no remote code, no sub-model config (the quantization_config is not one)."""
    archs, model_type = config.get("architectures"), config.get("model_type")
    if "auto_map" in config or not isinstance(model_type, str) or not model_type:
        return False
    if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str) and archs[0].isidentifier()):
        return False
    for key, value in config.items():
        if key == "quantization_config":
            continue
        if isinstance(value, dict) and (
            "model_type" in value or key.endswith("_config") or key in ("encoder", "decoder")
        ):
            return False
    return True


def plainly_without_conv1d(config: dict) -> bool:
    """True when the architecture provably has no Conv1D module, read from transformers' source
    files without importing transformers (importing it and building the skeleton took most of a
    small model's dequantize, for an answer that is nearly always "none").

    Provable means: one architecture, no remote code, no sub-model config, and that class is
    defined in its model's own modeling file(s), which never name Conv1D and import nothing from
    another model's package (`from ..x`). Anything else builds the skeleton (`conv1d_layout`).
    In transformers 5.23 six modeling files name Conv1D: GPT-2, OpenAI GPT, ImageGPT, Decision
    Transformer, CLVP, ConvBERT.
    """
    import importlib.util

    if not _single_model(config):
        return False
    spec = importlib.util.find_spec("transformers")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return False
    package = Path(list(spec.submodule_search_locations)[0]) / "models" / config["model_type"].replace("-", "_")
    sources = sorted(package.glob("modeling_*.py")) if package.is_dir() else []
    if not sources:
        return False
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in sources]
    if any("Conv1D" in text or _TWO_DOT_IMPORT.search(text) for text in texts):
        return False
    defined = re.compile(rf"^class\s+{re.escape(config['architectures'][0])}\s*[(:]", re.MULTILINE)
    return any(defined.search(text) for text in texts)


def conv1d_layout(folder: Path, where: str, config: dict | None = None):
    """(conv1d owner names, expected shapes, base_model_prefix) from the model skeleton built on
    the meta device; with `config` (config.json's dict) and an architecture that provably has no
    Conv1D, (empty, empty, "") without transformers: no layout to change, and no shapes to check
    the quant states against (plain from_pretrained, or --verify, still checks them)."""
    if config is not None and plainly_without_conv1d(config):
        return set(), {}, ""
    import torch
    import transformers
    from transformers.pytorch_utils import Conv1D

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"config.json cannot be parsed by transformers ({first})", where=str(folder / "config.json")
        ) from None
    name, cls = architecture_class(config)
    if cls is None:
        raise CheckpointError(
            f"model class {name!r} is not in transformers",
            where=where,
            hint="config.json 'architectures' must name a transformers model class; "
            "it decides each weight's layout (Linear or Conv1D)",
        )
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as err:
        raise CheckpointError(f"cannot build {cls.__name__} from config.json ({err})", where=where) from None
    conv1d = {name for name, mod in model.named_modules() if isinstance(mod, Conv1D)}
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    return conv1d, shapes, prefix


def architecture_class(config) -> tuple[object, type | None]:
    """(what `architectures[0]` of `config` (a transformers config or config.json's dict) says, the
    transformers model class of that name or None): a bare string, a number or a non-model
    attribute of transformers names no class."""
    import transformers

    archs = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    listed = isinstance(archs, (list, tuple)) and len(archs) > 0
    name = archs[0] if listed else archs
    cls = getattr(transformers, name, None) if listed and isinstance(name, str) else None
    return name, cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None
