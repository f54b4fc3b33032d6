"""`qfinal plan` on checkpoints of every readable format: the bytes it predicts per device are
what the real `qfinal load` then holds (parameters and persistent buffers, ties counted once).

The fp8 / compressed-tensors / GPTQ / AWQ checkpoints are dequantized on load, so the plan must
count their weights dense in the load dtype; torchao loads through transformers' quantizer, so it
must count the tensor subclasses' own components.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import builders  # noqa: E402

import qfinal  # noqa: E402
from qfinal.ops.plan import measured_bytes_per_device, plan  # noqa: E402

tf.logging.set_verbosity_error()


def _fp8(root: Path) -> Path:
    from test_format_fp8 import SHAPES, fp8_checkpoint

    return fp8_checkpoint(root / "fp8", SHAPES["ragged"])


def _compressed_tensors(root: Path) -> Path:
    pytest.importorskip("compressed_tensors")
    from test_format_compressed_tensors import ct_checkpoint

    ct_checkpoint(root / "ct", "mixed_w4_attn_w8_mlp")
    return root / "ct"


def _gptq_awq(root: Path, name: str) -> Path:
    """Built by GPTQModel in a child interpreter, as tests/test_format_gptq_awq.py builds them."""
    from gptq_awq_fixtures import made_by_gptqmodel

    return made_by_gptqmodel(root.parent / "gptq-awq") / name  # built once for both


def _torchao(root: Path, scheme: str) -> Path:
    from test_format_torchao import SCHEMES  # skips the test without torchao

    plain = builders.llama(root / "plain", tied=False)
    model = tf.LlamaForCausalLM.from_pretrained(
        plain, dtype=torch.bfloat16, quantization_config=tf.TorchAoConfig(SCHEMES[scheme]())
    )
    model.save_pretrained(root / scheme, safe_serialization=True)
    return root / scheme


BUILDERS = {
    "fp8": _fp8,
    "compressed_tensors": _compressed_tensors,
    "gptq": lambda root: _gptq_awq(root, "gptq4_act_sym"),
    "awq": lambda root: _gptq_awq(root, "awq"),
    "torchao_int8": lambda root: _torchao(root, "int8"),
    "torchao_int4": lambda root: _torchao(root, "int4"),
}


def held(model) -> int:
    """Bytes the loaded model holds, counted here: each parameter and persistent buffer once; a
    torchao weight by the components it keeps (qdata, scale, zero point), not its logical size."""
    total, seen = 0, set()
    persistent = set(model.state_dict(keep_vars=True))
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name in persistent and id(tensor) not in seen:
            seen.add(id(tensor))
            parts = [getattr(tensor, p) for p in ("qdata", "scale", "zero_point") if hasattr(tensor, "qdata")]
            total += sum(p.nbytes for p in parts if p is not None) if parts else tensor.nbytes
    return total


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("plan")


@pytest.mark.parametrize("fmt", list(BUILDERS))
def test_plan_predicts_the_bytes_load_holds(root, fmt):
    (root / fmt).mkdir()
    source = BUILDERS[fmt](root / fmt)
    predicted = plan(source).extra["plan"]
    real = qfinal.load(source)
    assert real.report.ok, [f.message for f in real.report.findings if f.severity == "error"]
    measured = measured_bytes_per_device(real.model, real.context.disk_offload_index)
    assert measured == predicted["bytes_per_device"] == {"cpu": held(real.model)}, fmt
    assert predicted["total_bytes"] == held(real.model)
    if fmt.startswith("torchao"):  # far below the bfloat16 model it was quantized from
        dense = sum(t.numel() * 2 for t in real.model.state_dict().values() if t.is_floating_point())
        assert predicted["total_bytes"] < 0.8 * dense
