"""qfinal's numba 4-bit quantizer against `bitsandbytes.functional.quantize_4bit`, byte for byte.

Adversarial inputs from hypothesis: random data, zero and -0.0 blocks, subnormals, values at the
dtype's maxima, |x| = absmax duplicates, exact and near midpoint ties, NaN (several payloads) and
Inf, sizes that do not divide by the blocksize (odd ones too), fp16 / bf16 / fp32, nf4 and fp4,
every blocksize, double quantization and non-uint8 storage.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from builders import bits_equal  # noqa: E402

from qfinal.compat.bitsandbytes import four_bit_quantize_tables, functional_replaced  # noqa: E402
from qfinal.formats import bnb_kernel  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
NAN_PAYLOADS = [0x7FC00000, 0xFFC00000, 0x7FC12345, 0x7F800001]  # quiet, negative, payload, signalling


def _special_values(dtype: torch.dtype, quant_type: str) -> list[float]:
    info = torch.finfo(dtype)
    bounds, _order = four_bit_quantize_tables(quant_type)
    values = [0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, info.max, -info.max, 1.0, -1.0]
    values += [float("inf"), float("-inf")]
    for b in bounds.tolist():  # midpoints, and their neighbours in this dtype
        t = torch.tensor([b], dtype=torch.float32).to(dtype)
        values += [t.item(), torch.nextafter(t.float(), torch.tensor([2.0])).to(dtype).item()]
    return values


@st.composite
def inputs(draw):
    dtype = draw(st.sampled_from(DTYPES))
    quant_type = draw(st.sampled_from(["nf4", "fp4"]))
    blocksize = draw(st.sampled_from(bnb_kernel.BLOCKSIZES))
    blocks = draw(st.integers(0, 3))
    n = blocks * blocksize + draw(st.sampled_from([0, 0, 1, 2, 3, blocksize // 2 + 1, blocksize - 1]))
    n = max(n, 1)
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3, 1e-30, 1e30]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(n, generator=g, dtype=torch.float32) * scale).to(dtype)
    specials = _special_values(dtype, quant_type)
    for _ in range(draw(st.integers(0, 12))):
        A[draw(st.integers(0, n - 1))] = draw(st.sampled_from(specials))
    if draw(st.booleans()):  # a whole block of zeros, -0.0 or one value repeated (|x| = absmax ties)
        start = draw(st.integers(0, max(n - 1, 0))) // blocksize * blocksize
        fill = draw(st.sampled_from([0.0, -0.0, 0.5, -3.0, specials[2]]))
        A[start : start + blocksize] = fill
        if fill not in (0.0,) and n > start + 1:
            A[start + 1] = -fill
    for _ in range(draw(st.integers(0, 2))):
        payload = draw(st.sampled_from(NAN_PAYLOADS))
        nan = torch.tensor([payload], dtype=torch.int64).to(torch.int32).view(torch.float32).to(dtype)
        A[draw(st.integers(0, n - 1))] = nan
    shape = draw(st.sampled_from(["flat", "2d"]))
    if shape == "2d" and n % 2 == 0:
        A = A.reshape(2, n // 2)
    return A, quant_type, blocksize


def _assert_same(A, quant_type, blocksize, **options):
    expected, state_e = bnb_functional.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, **options)
    got, state_g = bnb_kernel.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, **options)
    assert bits_equal(got, expected)
    de, dg = state_e.as_dict(packed=True), state_g.as_dict(packed=True)
    assert de.keys() == dg.keys()
    for key in de:
        assert bits_equal(dg[key], de[key]), key
    assert state_g.shape == state_e.shape and state_g.dtype == state_e.dtype


def test_the_kernel_is_used():
    assert bnb_kernel.kernel_name() == "numba"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs())
def test_packed_data_and_absmax_equal_bitsandbytes(case):
    A, quant_type, blocksize = case
    _assert_same(A, quant_type, blocksize)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs(), st.sampled_from([torch.uint8, torch.bfloat16, torch.float32]))
def test_double_quant_and_storage_equal_bitsandbytes(case, storage):
    A, quant_type, blocksize = case
    if storage != torch.uint8 and ((A.numel() + 1) // 2) % storage.itemsize:
        return  # bitsandbytes itself cannot view that many bytes as `storage`
    _assert_same(A, quant_type, blocksize, compress_statistics=True, quant_storage=storage)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_fp32_midpoint_ties_go_to_the_lower_code(dtype):
    """absmax 1 and every element on a midpoint (exact in fp32; rounded in 16-bit dtypes)."""
    for quant_type in ("nf4", "fp4"):
        bounds, _order = four_bit_quantize_tables(quant_type)
        A = torch.cat([torch.tensor([1.0]), bounds, -bounds, torch.tensor([0.0])]).to(dtype)
        A = A.repeat(4)[:64]
        _assert_same(A, quant_type, 64)


def test_a_large_matrix_equals_bitsandbytes():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(512, 1000, generator=g).to(torch.bfloat16)
    for quant_type in ("nf4", "fp4"):
        _assert_same(A, quant_type, 64)
        _assert_same(A, quant_type, 64, compress_statistics=True)


def test_forced_fallback_is_bitsandbytes_even_while_patched(monkeypatch):
    """QFINAL_KERNEL=bitsandbytes inside the patch: bitsandbytes' own function runs (no recursion)."""
    A = torch.randn(300, 64)
    monkeypatch.setenv(bnb_kernel.KERNEL_ENV, "bitsandbytes")
    assert bnb_kernel.kernel_name() == "bitsandbytes"
    with functional_replaced("quantize_4bit", bnb_kernel.quantize_4bit):
        assert bnb_functional.quantize_4bit is bnb_kernel.quantize_4bit
        got, _state = bnb_functional.quantize_4bit(A, quant_type="nf4")
    assert bnb_functional.quantize_4bit is not bnb_kernel.quantize_4bit
    expected, _state = bnb_functional.quantize_4bit(A, quant_type="nf4")
    assert bits_equal(got, expected)


def test_without_numba_it_falls_back_to_bitsandbytes():
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch, bitsandbytes.functional as F\n"
        "from qfinal.formats import bnb_kernel as K\n"
        "A = torch.randn(130, 64)\n"
        "print(K.kernel_name(), torch.equal(K.quantize_4bit(A, quant_type='fp4')[0], F.quantize_4bit(A)[0]))\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["bitsandbytes", "True"]


@pytest.mark.parametrize("options", [dict(quantize="nf4", double_quant=True), dict(quantize="fp4")])
def test_load_quantize_packs_the_same_bytes_with_and_without_the_kernel(checkpoints, monkeypatch, options):
    import transformers as tf

    import qfinal

    source = checkpoints["gpt2"]  # Conv1D: the weight is transposed before quantizing
    calls = []
    raw = bnb_kernel.quantize_4bit_raw
    monkeypatch.setattr(bnb_kernel, "quantize_4bit_raw", lambda *a: calls.append(1) or raw(*a))
    quantized = qfinal.load(source, **options).model.state_dict()
    assert len(calls) == 8  # 2 layers x (c_attn, c_proj, c_fc, mlp.c_proj): the kernel did the work
    assert bnb_functional.quantize_4bit is not bnb_kernel.quantize_4bit  # the patch ended with the load
    monkeypatch.setenv(bnb_kernel.KERNEL_ENV, "bitsandbytes")
    reference = qfinal.load(source, **options).model.state_dict()
    monkeypatch.delenv(bnb_kernel.KERNEL_ENV)
    assert quantized.keys() == reference.keys()
    assert any(k.endswith("quant_state.bitsandbytes__" + options["quantize"]) for k in quantized)
    for key in reference:
        assert bits_equal(quantized[key], reference[key]), key
    config = tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options["quantize"],
        bnb_4bit_use_double_quant=options.get("double_quant", False),
    )
    plain = tf.GPT2LMHeadModel.from_pretrained(source, quantization_config=config).state_dict()
    assert plain.keys() == quantized.keys()
    for key in plain:
        assert bits_equal(quantized[key], plain[key]), key


# --------------------------------------------------------------------------- int8 (row-wise)

_INT8_SPECIALS = [0.0, -0.0, 6e-8, -6e-8, 6.1e-5, 65504.0, -65504.0, float("inf"), float("-inf"), 127.0, 2.5, -3.5]


@st.composite
def int8_rows(draw):
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 300))
    scale = draw(st.sampled_from([1.0, 1e-4, 1e3, 6e-8]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    A = (torch.randn(rows, cols, generator=g) * scale).to(torch.float16)
    for _ in range(draw(st.integers(0, 10))):
        A[draw(st.integers(0, rows - 1)), draw(st.integers(0, cols - 1))] = draw(st.sampled_from(_INT8_SPECIALS))
    if draw(st.booleans()):  # a row of one repeated value, zeros, or -0.0
        A[draw(st.integers(0, rows - 1))] = draw(st.sampled_from([0.0, -0.0, 0.5, -65504.0]))
    if draw(st.booleans()):  # absmax 127: the scale is 1, k + 0.5 values are exact ties of the rounding
        r = draw(st.integers(0, rows - 1))
        A[r] = torch.arange(cols, dtype=torch.float32).remainder(8).sub(4).add(0.5).to(torch.float16)
        A[r, 0] = 127.0
    for _ in range(draw(st.integers(0, 2))):
        payload = draw(st.sampled_from([0x7E00, 0xFE00, 0x7E15, 0x7C01]))  # fp16 NaNs
        A.view(torch.int16)[draw(st.integers(0, rows - 1)), draw(st.integers(0, cols - 1))] = payload - (
            0x10000 if payload >= 0x8000 else 0
        )
    return A


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(int8_rows())
def test_int8_rowwise_equals_bitsandbytes(A):
    from qfinal.formats.bnb_int8 import int8_rowwise

    CB, SCB, _outliers = bnb_functional.int8_vectorwise_quant(A.clone())
    got_CB, got_SCB = int8_rowwise(A)
    assert bits_equal(got_CB, CB) and bits_equal(got_SCB, SCB)


def test_int8_rowwise_on_a_large_matrix_and_its_fallback(monkeypatch):
    from qfinal.formats import bnb_int8

    A = (torch.randn(1024, 4096, generator=torch.Generator().manual_seed(3)) * 2).to(torch.float16)
    CB, SCB, _outliers = bnb_functional.int8_vectorwise_quant(A.clone())
    assert all(bits_equal(g, e) for g, e in zip(bnb_int8.int8_rowwise(A), (CB, SCB)))
    from qfinal.compat import bitsandbytes as compat

    calls = []
    monkeypatch.setitem(compat._ORIGINALS, "int8_vectorwise_quant", lambda A: calls.append(A) or (CB, SCB, None))
    monkeypatch.setenv(bnb_kernel.KERNEL_ENV, "bitsandbytes")
    assert bnb_int8.int8_rowwise(A)[0] is CB and len(calls) == 1  # bitsandbytes' own, when asked


def test_int8_on_load_is_the_fast_path_and_bitsandbytes_own_after(monkeypatch):
    """Inside `kernels_for_load` bnb's Int8Params reach qfinal's int8 (same bytes); outside, bnb's own."""
    from qfinal.formats import bnb_int8

    A = (torch.randn(64, 96, generator=torch.Generator().manual_seed(5)) * 4).to(torch.float16)
    own = bnb_functional.int8_vectorwise_quant
    with bnb_kernel.kernels_for_load():
        assert bnb_functional.int8_vectorwise_quant is bnb_int8.int8_vectorwise_quant
        CB, SCB, outliers = bnb_functional.int8_vectorwise_quant(A)
    assert bnb_functional.int8_vectorwise_quant is own
    expected = own(A.clone())
    assert bits_equal(CB, expected[0]) and bits_equal(SCB, expected[1]) and outliers is None
