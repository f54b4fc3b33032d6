"""`qfinal dequantize --verify` for GPTQ and AWQ: the plain model with every packed weight as
GPTQModel's own torch kernels dequantize it.

transformers loads these formats only through optimum / gptqmodel, into packed kernel modules
without dequantize(), so the default reference (transformers' load, then dequantize) cannot run.
GPTQModel is imported only here, only for --verify: its import patches safetensors and transformers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

from qfinal.errors import SourceError
from qfinal.formats.base import all_stored_tensors

INSTALL_HINT = (
    "install GPTQModel without its requirements (they pull a CUDA torch): pip install --no-deps gptqmodel==7.7.0 "
    "pypcre logbar device-smi tokenicer defuser threadpoolctl pillow requests; or drop --verify"
)


def _gptqmodel_weight(method: str, weight, tensors: dict):
    """[out, in] as GPTQModel dequantizes one stored module when it loads it (torch backends)."""
    import torch

    scheme, parts = weight.scheme, {role: tensors[key] for role, key in weight.parts.items()}
    if method == "awq":
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        return dequantize_gemm(parts["qweight"], parts["qzeros"], parts["scales"], 4, scheme.group_size).T
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    out_features, in_features = weight.shape
    args = (scheme.bits, scheme.group_size, scheme.sym, scheme.desc_act, in_features, out_features)
    module = TorchLinear(*args, bias=False, register_buffers=True)
    module.load_state_dict({k: v.clone() for k, v in parts.items()}, strict=False)
    if scheme.zero_offset:
        convert_gptq_v1_to_v2_format_module(module, scheme.bits, torch.int32)
    return module.eval().dequantize_weight().T


def library_reference(fmt, model_class, folder: Path):
    """The plain float32 model of `folder`, its packed weights dequantized by GPTQModel."""
    import torch
    from transformers import AutoConfig

    from qfinal.checkpoint.dtypes import safetensors_dtype
    from qfinal.checkpoint.sources import read_config_json

    if importlib.util.find_spec("gptqmodel") is None:
        raise SourceError(
            f"--verify compares with GPTQModel's own {fmt.name} dequantization, and gptqmodel is not installed",
            where=str(folder),
            hint=INSTALL_HINT,
        )
    folder = Path(folder)
    scheme = fmt.scheme(read_config_json(folder), str(folder))
    tensors = all_stored_tensors(folder)
    headers = {k: (safetensors_dtype(t.dtype), list(t.shape)) for k, t in tensors.items()}
    weights = fmt.find_weights(headers, tensors.__getitem__, scheme, str(folder))
    consumed = {key for w in weights for key in w.parts.values()}
    state = {k: t for k, t in tensors.items() if k not in consumed}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        state.update({w.name: _gptqmodel_weight(fmt.name, w, tensors) for w in weights})
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = model_class(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in dict(getattr(model, "all_tied_weights_keys", None) or {})]
    if [k for k in missing if "inv_freq" not in k] or unexpected:
        raise SourceError(
            f"the {fmt.name} reference does not fit {model_class.__name__}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}",
            where=str(folder),
        )
    model.tie_weights()
    return model.eval()
