"""GPTQ and AWQ fixtures made by GPTQModel itself, with GPTQModel's own dequantization of each.

Run as a script (`made_by_gptqmodel`) in a child interpreter that finds GPTQModel in
`.venv/gptqmodel-only`: its import patches safetensors and transformers, and transformers changes
course when it is importable, which the rest of the suite must not see. The test modules import
only the plain data (VARIANTS, LAYERS, ROLES, quantization_config) and the child launchers
(`made_by_gptqmodel`, `gptqmodel_env`) from here, never GPTQModel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))

import builders  # noqa: E402

VARIANTS = {
    "gptq4": dict(method="gptq", bits=4, group_size=32, sym=False, desc_act=False, format="gptq"),
    "gptq4_act_sym": dict(method="gptq", bits=4, group_size=32, sym=True, desc_act=True, format="gptq"),
    "gptq8_channel": dict(method="gptq", bits=8, group_size=-1, sym=False, desc_act=False, format="gptq"),
    "gptq2_v2_act": dict(method="gptq", bits=2, group_size=32, sym=False, desc_act=True, format="gptq_v2"),
    "awq": dict(method="awq", bits=4, group_size=32, sym=False),
}
# Single layers with ragged shapes: inputs not a multiple of the group or pack factor, outputs not of 8.
LAYERS = {
    f"gptq{bits}_{'act' if act else 'seq'}_{fmt}": dict(
        method="gptq", bits=bits, group_size=32, sym=False, desc_act=act, format=fmt, shape=(36, 72)
    )
    for bits in (2, 4, 8)
    for act in (False, True)
    for fmt in ("gptq", "gptq_v2")
}
LAYERS["awq_g64"] = dict(method="awq", bits=4, group_size=64, sym=False, shape=(40, 192))
ROLES = ("qweight", "qzeros", "scales", "g_idx")
GPTQMODEL_ONLY = Path(sys.prefix) / "gptqmodel-only"


# ----------------------------------------------------------------------------------------- the test side


def gptqmodel_env(**extra: str) -> dict[str, str]:
    """The environment of a child interpreter that finds GPTQModel in `.venv/gptqmodel-only` (the
    Makefile installs it there) before whatever this interpreter finds."""
    path = os.pathsep.join(p for p in (str(GPTQMODEL_ONLY), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **extra}


def made_by_gptqmodel(root: Path) -> Path:
    """`root`, holding every fixture and reference (`build`), built by this file run as a script in
    a child interpreter (`gptqmodel_env`); a `root` that exists is taken as built. Skips the calling
    test when GPTQModel is in neither place."""
    import pytest

    if not (GPTQMODEL_ONLY / "gptqmodel").is_dir() and importlib.util.find_spec("gptqmodel") is None:
        pytest.skip("gptqmodel is not installed (the Makefile puts it in .venv/gptqmodel-only)")
    if not root.exists():
        env = gptqmodel_env(GPTQMODEL_CPU_WORKERS="2")
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), str(root)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
    return root


# ----------------------------------------------------------------------------------------- the library side


def _library():
    """GPTQModel's packers, converters and dequantizers, imported without its banner."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear
        from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
        from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module, convert_gptq_v2_to_v1_format_module
    return SimpleNamespace(
        TorchLinear=TorchLinear,
        AwqTorchLinear=AwqTorchLinear,
        dequantize_gemm=dequantize_gemm,
        convert_gptq_v1_to_v2_format_module=convert_gptq_v1_to_v2_format_module,
        convert_gptq_v2_to_v1_format_module=convert_gptq_v2_to_v1_format_module,
    )


def _qparams(weight, groups, count: int, bits: int, sym: bool):
    """[out, G] scales and zero points from each group's min/max (GPTQ's initial grid)."""
    maxq = 2**bits - 1
    wmin = torch.stack([weight[:, groups == g].min(1).values for g in range(count)], 1).clamp(max=0)
    wmax = torch.stack([weight[:, groups == g].max(1).values for g in range(count)], 1).clamp(min=0)
    if sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    scale = ((wmax - wmin) / maxq).clamp(min=1e-5).half().float()
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-wmin / scale)
    if not sym:
        zero[0], zero[1] = 0, maxq  # the v1 borrow case and the top of the range
    return scale, zero


def _pack(lib, weight, spec, gen) -> dict:
    """role -> stored tensor of one Linear, packed by GPTQModel as it saves the format."""
    out_f, in_f = weight.shape
    gs, bits = spec["group_size"], spec["bits"]
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    linear.weight.data = weight.float().clone()
    count = 1 if gs == -1 else -(-in_f // gs)
    groups = torch.arange(in_f) // (in_f if gs == -1 else gs)
    if spec.get("desc_act"):
        groups = groups[torch.randperm(in_f, generator=gen)]
    scale, zero = _qparams(linear.weight.data, groups, count, bits, spec["sym"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if spec["method"] == "awq":
            module = lib.AwqTorchLinear(bits, gs, spec["sym"], False, in_f, out_f, bias=False)
            module.pack(linear, scale.half(), zero)
            return {r: getattr(module, r).clone() for r in ROLES[:3]}
        module = lib.TorchLinear(bits, gs, spec["sym"], spec["desc_act"], in_f, out_f, bias=False)
        module.pack_original(linear, scale, zero, groups.int())
        if spec["format"] == "gptq":
            lib.convert_gptq_v2_to_v1_format_module(module, SimpleNamespace(bits=bits, pack_dtype=torch.int32))
    return {r: getattr(module, r).clone() for r in ROLES}


def _reference(lib, parts: dict, spec, shape) -> torch.Tensor:
    """[out, in] as GPTQModel dequantizes the stored tensors when it loads them (torch backends)."""
    out_f, in_f = shape
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if spec["method"] == "awq":
            return lib.dequantize_gemm(
                parts["qweight"], parts["qzeros"], parts["scales"], 4, spec["group_size"]
            ).T.contiguous()
        args = (spec["bits"], spec["group_size"], spec["sym"], spec["desc_act"], in_f, out_f)
        module = lib.TorchLinear(*args, bias=False, register_buffers=True)
        module.load_state_dict({k: v.clone() for k, v in parts.items()}, strict=False)
        if spec["format"] == "gptq":
            lib.convert_gptq_v1_to_v2_format_module(module, spec["bits"], torch.int32)
        return module.eval().dequantize_weight().T.contiguous()


def quantization_config(spec) -> dict:
    if spec["method"] == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": spec["group_size"],
            "zero_point": True,
            "version": "gemm",
        }
    keys = ("bits", "group_size", "sym", "desc_act")
    return {
        "quant_method": "gptq",
        **{k: spec[k] for k in keys},
        "checkpoint_format": spec["format"],
        "pack_dtype": "int32",
        "lm_head": False,
    }


def build(root: Path) -> None:
    """Every fixture checkpoint, its reference weights (refs/NAME.safetensors) and the layer cases."""
    import transformers as tf

    lib, gen = _library(), torch.Generator().manual_seed(builders.SEED)
    (root / "refs").mkdir(parents=True)
    for name, spec in VARIANTS.items():
        path = root / name
        torch.manual_seed(builders.SEED)
        config = tf.LlamaConfig(tie_word_embeddings=False, **builders.LLAMA)
        tf.LlamaForCausalLM(config).to(torch.float16).save_pretrained(path)
        tensors, refs = {}, {}
        for key, value in load_file(path / "model.safetensors").items():
            if not key.endswith("_proj.weight"):
                tensors[key] = value
                continue
            prefix = key.removesuffix(".weight")
            parts = _pack(lib, value, spec, gen)
            tensors.update({f"{prefix}.{role}": t for role, t in parts.items()})
            refs[key] = _reference(lib, parts, spec, value.shape)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        save_file(refs, root / "refs" / f"{name}.safetensors")
        raw = json.loads((path / "config.json").read_text())
        raw["quantization_config"] = quantization_config(spec)
        (path / "config.json").write_text(json.dumps(raw, indent=2))
    layers = {}
    for name, spec in LAYERS.items():
        weight = (torch.randn(spec["shape"], generator=gen) * 0.05).half()
        parts = _pack(lib, weight, spec, gen)
        layers.update({f"{name}.{role}": t for role, t in parts.items()})
        layers[f"{name}.reference"] = _reference(lib, parts, spec, spec["shape"])
    save_file(layers, root / "layers.safetensors")


if __name__ == "__main__":  # run by `made_by_gptqmodel` in its own interpreter
    build(Path(sys.argv[1]))
    sys.exit(0)
