"""qfinal.compare: the one comparison engine, on tiny real checkpoints (CPU bitsandbytes)."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bitsandbytes as bnb  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402
from rich.console import Console  # noqa: E402
from safetensors.torch import safe_open  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import builders  # noqa: E402

from qfinal.compare.layers import LayerQuality, parse_layer, quality_by_layer  # noqa: E402
from qfinal.compare.models import compare_models  # noqa: E402
from qfinal.compare.outputs import output_diff, probe_batch  # noqa: E402
from qfinal.compare.tensors import Comparison, Tolerances, compare_tensors  # noqa: E402
from qfinal.compare.views import dequantized_state_dict, raw_state_dict  # noqa: E402
from qfinal.compat.bitsandbytes import cpu_repack_disabled  # noqa: E402
from qfinal.render.bars import render_rich_bars  # noqa: E402
from qfinal.render.html import render_html  # noqa: E402

PERTURBED, DELTA = builders.PERTURBED, builders.DELTA


def _load(path, cls=tf.LlamaForCausalLM, method=None):
    kwargs = {}
    if method:
        kwargs["quantization_config"] = tf.BitsAndBytesConfig(**builders.QUANT_OPTIONS[method])
    return cls.from_pretrained(path, **kwargs).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    llama = builders.llama(root / "llama", tied=True)
    gpt2 = builders.gpt2(root / "gpt2")
    perturbed = builders.perturbed_copy(llama, root / "llama_perturbed", PERTURBED, DELTA)
    return {
        "llama": llama,
        "gpt2": gpt2,
        "perturbed": perturbed,
        "nf4_dq": builders.bnb_checkpoint(llama, root / "llama_nf4_dq", "nf4_dq"),
        "int8": builders.bnb_checkpoint(llama, root / "llama_int8", "int8"),
    }


@pytest.fixture(scope="module")
def llama_fp(ckpts):
    return _load(ckpts["llama"])


@pytest.fixture(scope="module")
def llama_nf4(ckpts):
    return _load(ckpts["llama"], method="nf4")


@pytest.fixture(scope="module")
def gpt2_fp(ckpts):
    return _load(ckpts["gpt2"], tf.GPT2LMHeadModel)


def _direct_rel(approx: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = approx.detach().double(), ref.detach().double()
    return float((a - b).norm() / b.norm())


def _by_name(cmp: Comparison):
    return {t.name: t for t in cmp.tensors}


# ------------------------------------------------------------------------------------ identity


def test_identical_models_compare_identical(ckpts, llama_fp):
    other = _load(ckpts["llama"])
    for dequantize in (True, False):
        cmp = compare_models(other, llama_fp, dequantize=dequantize)
        assert cmp.identical()
        assert cmp.tensors and all(t.bit_identical and t.status == "identical" for t in cmp.tensors)
        assert all(t.max_abs == 0.0 and t.rel_error == 0.0 for t in cmp.tensors)
        o = cmp.output
        assert o is not None
        assert o.logits_max_abs == 0.0 and o.kl_divergence == 0.0 and o.top1_agreement == 1.0
        assert o.positions == 2 * 16
    fs = cmp.findings("diff")
    assert {f.check for f in fs} == {"diff_keys", "diff_tensors", "diff_logits"}
    assert all(f.severity == "info" for f in fs)


def test_one_perturbed_tensor_is_the_only_difference(ckpts, llama_fp):
    pert = _load(ckpts["perturbed"])
    cmp = compare_models(pert, llama_fp, outputs=False)
    different = [t for t in cmp.tensors if t.status != "identical"]
    assert [t.name for t in different] == [PERTURBED]
    t = different[0]
    assert t.status == "different" and not t.bit_identical
    a = pert.state_dict()[PERTURBED].double()
    b = llama_fp.state_dict()[PERTURBED].double()
    assert t.max_abs == float((a - b).abs().max()) == pytest.approx(DELTA, abs=1e-6)
    assert t.rel_error == pytest.approx(_direct_rel(a, b), rel=1e-12)
    assert cmp.output is None and not cmp.identical()

    # raw comparison sees the same single difference
    raw = compare_tensors(raw_state_dict(pert), raw_state_dict(llama_fp))
    assert [x.name for x in raw if not x.bit_identical] == [PERTURBED]

    # findings name the failing tensor and its max abs diff
    fs = cmp.findings("roundtrip")
    errors = [f for f in fs if f.severity == "error"]
    assert errors and all(f.check == "roundtrip_tensors" for f in errors)
    assert any(f.key == PERTURBED for f in errors)
    summary = next(f for f in errors if f.key is None)
    assert PERTURBED in summary.message and "max abs diff 0.5" in summary.message
    assert [f.severity for f in fs if f.check == "roundtrip_keys"] == ["info"]

    # within tolerance: no error; exceeds() agrees
    loose = Tolerances(max_abs=1.0, rel_error=1.0)
    assert cmp.exceeds(loose) == []
    assert all(f.severity == "info" for f in cmp.findings("roundtrip", loose))
    assert [x.name for x in cmp.exceeds(Tolerances())] == [PERTURBED]


def test_missing_keys_and_shapes_are_findings():
    a = {"x": torch.zeros(2, 3), "only_a.weight": torch.ones(1)}
    b = {"x": torch.zeros(3, 2), "only_b.weight": torch.ones(1)}
    cmp = Comparison(tensors=compare_tensors(a, b), output=None)
    st = {t.name: t.status for t in cmp.tensors}
    assert st == {"x": "shape", "only_a.weight": "only_a", "only_b.weight": "only_b"}
    fs = cmp.findings("diff")
    keys = [f for f in fs if f.check == "diff_keys" and f.severity == "error"]
    assert any("only_a.weight" in f.message for f in keys) and any(f.key == "only_b.weight" for f in keys)
    assert any(f.check == "diff_tensors" and f.key == "x" and "shape" in f.message for f in fs)


def test_bitwise_semantics_nan_zero_and_dtype():
    nan = torch.tensor([1.0, float("nan"), 2.0])
    (t,) = compare_tensors({"t": nan}, {"t": nan.clone()})
    assert t.status == "identical" and t.bit_identical  # same bits, NaN included
    (t,) = compare_tensors({"t": nan}, {"t": torch.tensor([1.0, 0.0, 2.0])})
    assert t.status == "different" and t.max_abs == math.inf and t.rel_error == math.inf
    assert Comparison([t], None).exceeds(Tolerances(max_abs=1e9, rel_error=1e9)) == [t]
    (t,) = compare_tensors({"t": torch.ones(4)}, {"t": torch.zeros(4)})
    assert t.max_abs == 1.0 and t.rel_error == math.inf  # b == 0, a != 0
    (t,) = compare_tensors({"t": torch.zeros(4)}, {"t": -torch.zeros(4)})
    assert t.status == "different" and not t.bit_identical and t.max_abs == 0.0 and t.rel_error == 0.0
    (t,) = compare_tensors(
        {"p": torch.tensor([1, 2], dtype=torch.uint8)}, {"p": torch.tensor([1, 3], dtype=torch.uint8)}
    )
    assert t.status == "different" and t.max_abs == 1.0
    (t,) = compare_tensors({"t": torch.ones(3, dtype=torch.bfloat16)}, {"t": torch.ones(3)})
    assert t.status == "dtype" and t.max_abs == 0.0 and not t.bit_identical
    cmp = Comparison([t], None)
    assert cmp.exceeds(Tolerances()) == [t]
    assert cmp.exceeds(Tolerances(allow_dtype_change=True)) == []


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16, torch.complex64]
)
@pytest.mark.parametrize("numel", [1, 3, 8, 63, 4096])
def test_bit_equal_sees_every_flipped_bit(dtype, numel):
    """bit_equal compares in int64 words where the size and alignment allow: one flipped bit
    anywhere (first, middle, last element, any bit of it) must still be seen, on any slice."""
    from qfinal.compare.tensors import as_words, bit_equal

    g = torch.Generator().manual_seed(numel)
    base = torch.randint(
        0, 256, (numel * torch.empty((), dtype=dtype).element_size(),), dtype=torch.uint8, generator=g
    ).view(dtype)
    for a in (base, base[1:] if numel > 1 else base):  # a slice: an odd storage offset
        assert bit_equal(a, a.clone())
        width = a.element_size()
        for index in {0, a.numel() // 2, a.numel() - 1}:
            for byte in range(width):
                for bit in range(8):
                    b = a.clone()
                    flat = b.view(torch.uint8).reshape(-1)
                    flat[index * width + byte] ^= 1 << bit
                    assert not bit_equal(a, b), (dtype, numel, index, byte, bit)
    if numel in (8, 4096) and base.element_size() < 8:  # sizes that divide into words
        words = as_words(base, base.clone())  # a fresh tensor's storage is 64-byte aligned
        assert words is not None and words[0].dtype == torch.int64  # the fast path is taken


def test_compare_of_a_plain_model_does_not_import_bitsandbytes(tmp_path):
    """bitsandbytes is only looked at when something imported it: a plain save round trip must
    not pay its import (about 1.5 s)."""
    import subprocess

    code = (
        "import sys, torch; from qfinal.compare.models import compare_models; "
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4)); "
        "c = compare_models(m, m, dequantize=False, outputs=False); "
        "print(all(t.bit_identical for t in c.tensors), 'bitsandbytes' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]


def test_reference_logits_are_used_as_given(tmp_path):
    """compare_models(reference_logits=...) compares the candidate with those logits and does
    not run the reference (save computes the original's logits once for both reloads)."""
    from qfinal.compare.outputs import probe_batch, probe_logits

    path = builders.llama(tmp_path / "llama", tied=False)
    model = builders.model_class_for(path).from_pretrained(path).eval()
    probe = probe_batch(model)
    want = probe_logits(model, probe)
    calls = []
    real_forward = model.forward
    model.forward = lambda *a, **k: calls.append(1) or real_forward(*a, **k)
    same = compare_models(model, model, dequantize=False, probe=probe, reference_logits=want)
    assert len(calls) == 1 and same.output.logits_max_abs == 0.0
    moved = compare_models(model, model, dequantize=False, probe=probe, reference_logits=want + 0.5)
    assert moved.output.logits_max_abs == pytest.approx(0.5)


# ----------------------------------------------------------------------------------- quantized


def test_nf4_rel_error_matches_direct_dequantize_4bit(llama_fp, llama_nf4):
    cmp = compare_models(llama_nf4, llama_fp)
    assert cmp.output is not None and not _packed_for_cpu(llama_nf4)
    diffs = _by_name(cmp)
    fp_sd = llama_fp.state_dict()
    quantized = [(n, m) for n, m in llama_nf4.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7
    assert not any(".absmax" in n or "quant_state" in n for n in diffs)  # aux keys are not values
    for name, mod in quantized:
        direct = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
        ref = fp_sd[f"{name}.weight"]
        t = diffs[f"{name}.weight"]
        assert t.status == "different" and t.shape_a == t.shape_b == tuple(ref.shape)
        assert t.rel_error == pytest.approx(_direct_rel(direct, ref), rel=0, abs=1e-12)
        assert t.max_abs == float((direct.double() - ref.double()).abs().max())
        assert 0 < t.rel_error < 0.2
    # everything bnb left alone is bit-identical
    assert all(t.bit_identical for n, t in diffs.items() if not any(n == f"{q}.weight" for q, _ in quantized))

    rows = quality_by_layer(fp_sd, llama_nf4)
    assert [r.name for r in rows] == [n for n, _ in quantized]
    for r, (name, mod) in zip(rows, quantized):
        direct = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
        assert r.rel_error == pytest.approx(_direct_rel(direct, fp_sd[f"{name}.weight"]), rel=0, abs=1e-12)
        assert r.quant == "nf4" and r.stack == "model.layers"
    assert rows[0].layer == 0 and rows[0].module_type == "q_proj" and rows[-1].layer == 1
    assert rows[-1].module_type == "down_proj"
    # a float model as the original gives the same numbers
    assert [r.rel_error for r in quality_by_layer(llama_fp, llama_nf4)] == [r.rel_error for r in rows]


def test_output_metrics_match_direct_computation(llama_fp, llama_nf4):
    probe = probe_batch(llama_fp)
    with torch.no_grad(), cpu_repack_disabled(llama_nf4):
        la = llama_nf4(**probe).logits.double()
        lb = llama_fp(**probe).logits.double()
    lpa, lpb = torch.log_softmax(la, -1), torch.log_softmax(lb, -1)
    kl = (lpb.exp() * (lpb - lpa)).sum(-1).mean().item()  # KL(p_ref || p_candidate)
    top1 = (la.argmax(-1) == lb.argmax(-1)).double().mean().item()
    max_abs = (la - lb).abs().max().item()

    for out in (output_diff(llama_nf4, llama_fp, probe), compare_models(llama_nf4, llama_fp).output):
        assert out.logits_max_abs == pytest.approx(max_abs, rel=0, abs=1e-12)
        assert out.kl_divergence == pytest.approx(kl, rel=1e-9, abs=1e-12)
        assert out.top1_agreement == top1
        assert out.kl_divergence > 0 and out.positions == 32

    cmp = compare_models(llama_nf4, llama_fp)
    fs = cmp.findings("quality", Tolerances(max_abs=1.0, rel_error=0.5, logits_max_abs=1e-9))
    logits = [f for f in fs if f.check == "quality_logits"]
    assert [f.severity for f in logits] == ["error"] and "KL(B||A)" in logits[0].message


def test_probe_batch_is_fixed_and_documented():
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(**builders.LLAMA))
    p1, p2 = probe_batch(llama), probe_batch(llama)
    assert set(p1) == {"input_ids"} and p1["input_ids"].shape == (2, 16)
    assert torch.equal(p1["input_ids"], p2["input_ids"])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(p1["input_ids"], torch.randint(0, 256, (2, 16), generator=g))
    t5 = tf.T5ForConditionalGeneration(
        tf.T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
    )
    p = probe_batch(t5)
    assert p["decoder_input_ids"].shape == (2, 16) and int(p["input_ids"].max()) < 256


def test_probe_batch_of_another_size_is_drawn_the_same_way():
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(**builders.LLAMA))
    small = probe_batch(llama, batch=1, length=4)["input_ids"]
    g = torch.Generator().manual_seed(0)
    assert small.shape == (1, 4) and torch.equal(small, torch.randint(0, 256, (1, 4), generator=g))
    short = tf.LlamaForCausalLM(tf.LlamaConfig(**{**builders.LLAMA, "max_position_embeddings": 3}))
    assert probe_batch(short, batch=1, length=4)["input_ids"].shape == (1, 3)  # capped by max positions


# ------------------------------------------------------------------------------------- layouts


def _gpt2_with_linears(model):
    """The same GPT-2 with every Conv1D replaced by nn.Linear (weights transposed)."""
    conv1d = tf.pytorch_utils.Conv1D
    for name, mod in list(model.named_modules()):
        if isinstance(mod, conv1d):
            lin = torch.nn.Linear(mod.weight.shape[0], mod.weight.shape[1])
            with torch.no_grad():
                lin.weight.copy_(mod.weight.t())
                lin.bias.copy_(mod.bias)
            model.set_submodule(name, lin)
    return model


def test_gpt2_conv1d_aligns_with_linear_layout(ckpts, gpt2_fp):
    conv1d_keys = {f"{n}.weight" for n, m in gpt2_fp.named_modules() if isinstance(m, tf.pytorch_utils.Conv1D)}
    assert any(gpt2_fp.get_parameter(k).shape[0] == gpt2_fp.get_parameter(k).shape[1] for k in conv1d_keys)
    linear_sd = {k: (v.t().contiguous() if k in conv1d_keys else v) for k, v in raw_state_dict(gpt2_fp).items()}

    cmp = compare_models(gpt2_fp, linear_sd)  # model vs Linear-layout mapping
    assert cmp.identical() and cmp.output is None
    assert not [t for t in cmp.tensors if t.status == "shape"]
    assert dequantized_state_dict(gpt2_fp)["transformer.h.0.attn.c_attn.weight"].shape == (192, 64)

    # raw mode, model vs model: every Conv1D weight (square ones too) lines up with the Linear
    lin_model = _gpt2_with_linears(_load(ckpts["gpt2"], tf.GPT2LMHeadModel))
    raw = compare_models(gpt2_fp, lin_model, dequantize=False, outputs=False)
    d = _by_name(raw)
    assert all(d[k].status == "identical" and d[k].aligned == "a" for k in conv1d_keys)
    assert raw.identical()
    # raw mode, model vs mapping: non-square ones line up by shape
    raw_map = _by_name(compare_models(gpt2_fp, linear_sd, dequantize=False))
    assert raw_map["transformer.h.0.attn.c_attn.weight"].status == "identical"
    assert not [t for t in raw_map.values() if t.status == "shape"]


def test_gpt2_nf4_against_conv1d_original(ckpts, gpt2_fp):
    q = _load(ckpts["gpt2"], tf.GPT2LMHeadModel, method="nf4")
    cmp = compare_models(q, gpt2_fp)
    assert not [t for t in cmp.tensors if t.status == "shape"]
    mod = q.transformer.h[0].attn.c_proj  # square: only the layout bookkeeping can get it right
    direct = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
    ref = gpt2_fp.transformer.h[0].attn.c_proj.weight.t()
    t = _by_name(cmp)["transformer.h.0.attn.c_proj.weight"]
    assert t.aligned is None  # the dequantized view already put c_proj in Linear layout
    assert t.rel_error == pytest.approx(_direct_rel(direct, ref), rel=0, abs=1e-12)
    rows = quality_by_layer(raw_state_dict(gpt2_fp), q)
    assert {r.module_type for r in rows} == {"c_attn", "c_proj", "c_fc"}
    assert all(0 < r.rel_error < 0.2 for r in rows)  # a wrong transpose would be ~1.4
    assert [r.layer for r in rows] == [0, 0, 0, 0, 1, 1, 1, 1]


def _packed_for_cpu(model):
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    ]


def test_comparing_does_not_modify_a_quantized_model(ckpts, llama_fp):
    """bnb repacks 4-bit weights (bf16 absmax) on a CPU forward with AVX512-BF16; measuring must not."""
    q = _load(ckpts["nf4_dq"])
    before = {k: v.clone() for k, v in raw_state_dict(q).items()}
    cmp = compare_models(q, llama_fp)
    assert cmp.output is not None and not _packed_for_cpu(q)
    after = raw_state_dict(q)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # two probes give the same logits
    assert compare_models(q, q, dequantize=False).identical()

    # a model some other code ran forward on (possibly repacked) still dequantizes correctly
    other = _load(ckpts["nf4_dq"])
    with torch.no_grad():
        other(**probe_batch(other))
    rows = quality_by_layer(llama_fp, other)
    assert all(0 < r.rel_error < 0.2 for r in rows) and not _packed_for_cpu(other)


# ------------------------------------------------------------------------------ pre-quantized


@pytest.mark.parametrize("method", ["nf4_dq", "int8"])
def test_two_loads_of_prequantized_checkpoint_are_bit_identical(ckpts, method):
    a, b = _load(ckpts[method]), _load(ckpts[method])
    raw_a = raw_state_dict(a)
    with safe_open(str(ckpts[method] / "model.safetensors"), "pt") as f:
        assert set(raw_a) == set(f.keys())  # exactly what save persisted
    aux = {
        "nf4_dq": (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"),
        "int8": (".SCB", ".weight_format"),
    }[method]
    for suffix in aux:
        assert any(k.endswith(suffix) for k in raw_a), suffix

    cmp = compare_models(a, b, dequantize=False)
    assert cmp.identical() and all(t.bit_identical for t in cmp.tensors)
    assert {t.name for t in cmp.tensors} == set(raw_a)
    packed = _by_name(cmp)["model.layers.0.self_attn.q_proj.weight"]
    assert packed.dtype_a == ("uint8" if method == "nf4_dq" else "int8")
    assert all(t.bit_identical for t in compare_tensors(raw_a, raw_state_dict(b)))


def test_int8_dequantization_and_quality(ckpts, llama_fp):
    q = _load(ckpts["int8"])
    deq = dequantized_state_dict(q)
    assert not any(k.endswith((".SCB", ".weight_format")) for k in deq)
    mod = q.model.layers[0].mlp.up_proj
    direct = mod.weight.data.double() * mod.weight.SCB.double().view(-1, 1) / 127
    assert torch.allclose(deq["model.layers.0.mlp.up_proj.weight"].double(), direct, rtol=1e-6, atol=0)
    rows = quality_by_layer(llama_fp.state_dict(), q)
    assert len(rows) == 14 and all(r.quant == "int8" and 0 < r.rel_error < 0.05 for r in rows)


# ----------------------------------------------------------------------------------- rendering


def test_parse_layer():
    assert parse_layer("model.layers.3.self_attn.q_proj") == ("model.layers", 3)
    assert parse_layer("transformer.h.11.mlp.c_fc") == ("transformer.h", 11)
    assert parse_layer("encoder.block.0.layer.1.DenseReluDense.wi") == ("encoder.block", 0)
    assert parse_layer("lm_head") == (None, None)


def test_html_is_self_contained_and_escaped(llama_fp, llama_nf4):
    rows = quality_by_layer(llama_fp.state_dict(), llama_nf4)
    evil = LayerQuality(
        name='x.<script>alert("1")</script>',
        layer=None,
        module_type="<b>",
        rel_error=0.5,
        max_abs=1.0,
        quant="nf4",
        shape=(2, 2),
    )
    cmp = compare_models(llama_nf4, llama_fp)
    for page in (render_html(rows + [evil], "quality <nf4>"), render_html(cmp, "diff")):
        assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "</svg>" in page
        assert "http" not in page
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
        assert "<script" not in page
    page = render_html(rows + [evil], "quality <nf4>")
    assert "&lt;script&gt;" in page and "quality &lt;nf4&gt;" in page
    assert "model.layers.1.mlp.down_proj" in page and "q_proj" in page


def test_rich_bars(llama_fp, llama_nf4):
    rows = quality_by_layer(llama_fp.state_dict(), llama_nf4)
    console = Console(record=True, width=140, color_system=None)
    render_rich_bars(rows, console)
    text = console.export_text()
    worst = max(rows, key=lambda r: r.rel_error)
    line = next(ln for ln in text.splitlines() if worst.name in ln)
    assert "█" * 40 in line  # the largest error fills the bar
    assert all(r.name in text for r in rows)
