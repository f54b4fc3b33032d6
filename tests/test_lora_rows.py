"""`adapters.lora_rows`: a plain LoRA added to its weight a slab of rows at a time equals peft's
`lora.Linear.merge` bit for bit (shapes, ranks, scalings, base and adapter dtypes, slab sizes down
to one row), and every layer whose merge is not exactly `W += (B @ A) * scaling` is left to peft."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")

from qfinal.adapters import lora_rows  # noqa: E402
from qfinal.adapters.lora_rows import ROW_ALIGN, merge_bounds, row_delta  # noqa: E402
from qfinal.checkpoint.row_slabs import CHUNK_ENV, Workspace  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class _Net(torch.nn.Module):
    def __init__(self, out_features: int, in_features: int, bias: bool = True):
        super().__init__()
        self.lin = torch.nn.Linear(in_features, out_features, bias=bias)


def _lora_layer(out_features, in_features, r, alpha, base_dtype, adapter_dtype, seed, **config):
    """A peft lora.Linear on a random base, its A and B random in `adapter_dtype`."""
    torch.manual_seed(seed)
    net = _Net(out_features, in_features).to(base_dtype)
    model = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], **config))
    layer = model.base_model.model.lin
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (layer.lora_A["default"], layer.lora_B["default"]):
            module.weight.data = torch.randn(module.weight.shape, generator=g).to(adapter_dtype)
    return layer


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _merged_in_rows(layer, bounds):
    """As the merge does it: one workspace, its buffers reused from slab to slab."""
    weight = layer.get_base_layer().weight.detach().clone()
    delta = row_delta(layer, "default", list(weight.shape))
    assert delta is not None
    workspace = Workspace()
    for first, end in bounds:
        delta.add_to(first, weight[first:end], workspace)
    return weight


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    out_features=st.integers(1, 700),
    in_features=st.integers(1, 90),
    r=st.integers(1, 17),
    alpha=st.sampled_from([1, 3, 8, 16, 7.5]),
    rslora=st.booleans(),
    base_dtype=st.sampled_from(DTYPES),
    adapter_dtype=st.sampled_from(DTYPES),
    chunk=st.integers(1, 200_000),
    seed=st.integers(0, 2**16),
)
def test_rows_equal_peft_merge(out_features, in_features, r, alpha, rslora, base_dtype, adapter_dtype, chunk, seed):
    """The slabs `merge_bounds` gives (forced small: chunk bytes from 1) merge to peft's bits."""
    layer = _lora_layer(out_features, in_features, r, alpha, base_dtype, adapter_dtype, seed, use_rslora=rslora)
    original = layer.get_base_layer().weight.detach().clone()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CHUNK_ENV, str(chunk))
        bounds = merge_bounds(out_features, in_features)
    assert bounds[0][0] == 0 and bounds[-1][1] == out_features
    assert all(start % ROW_ALIGN == 0 and end - start >= min(ROW_ALIGN, out_features) for start, end in bounds)
    ours = _merged_in_rows(layer, bounds)
    assert row_delta(layer, "default", list(original.shape)).exact_in(bounds)  # this machine passes the probe
    layer.merge()
    theirs = layer.get_base_layer().weight.detach()
    assert ours.dtype == theirs.dtype
    assert torch.equal(_bits(ours), _bits(theirs))


def test_large_slabs_of_a_7b_shaped_mlp_weight(monkeypatch):
    """Real slab sizes (hundreds of rows, the matmul's blocked paths) still give peft's rows."""
    layer = _lora_layer(2816, 1024, 16, 32, torch.bfloat16, torch.float32, seed=3)
    layouts = []
    for chunk in (1, 600_000, 1_100_000, 3_000_000, 16 << 20):
        monkeypatch.setenv(CHUNK_ENV, str(chunk))
        layouts.append(merge_bounds(2816, 1024))
    assert len({len(b) for b in layouts}) >= 4  # 22, 5..1 slabs
    results = [_merged_in_rows(layer, bounds) for bounds in layouts]
    layer.merge()
    theirs = layer.get_base_layer().weight.detach()
    for bounds, ours in zip(layouts, results):
        assert torch.equal(_bits(ours), _bits(theirs)), len(bounds)


def test_the_probe_catches_a_matmul_that_depends_on_the_slab(monkeypatch):
    """A machine whose matmul gives a slab other bits than the whole product fails the probe."""
    real = torch.Tensor.__matmul__

    def rows_dependent(a, b):  # the last bit of every product of fewer than 200 rows flipped
        out = real(a, b)
        if a.shape[0] < 200:
            out = (out.view(torch.int32) ^ 1).view(torch.float32)
        return out

    monkeypatch.setattr(lora_rows, "_PROBED", {})
    bounds = [(0, 128), (128, 300)]
    assert lora_rows.slabs_are_exact(bounds, 64, 8, torch.float32)
    monkeypatch.setattr(lora_rows, "_PROBED", {})
    monkeypatch.setattr(torch.Tensor, "__matmul__", rows_dependent)
    assert not lora_rows.slabs_are_exact(bounds, 64, 8, torch.float32)
    assert lora_rows.slabs_are_exact([(0, 300)], 64, 8, torch.float32)  # one slab is the whole product


@pytest.mark.parametrize(
    "config",
    [
        dict(use_dora=True),
        dict(lora_bias=True),
    ],
    ids=["dora", "lora_bias"],
)
def test_other_merges_are_left_to_peft(config):
    layer = _lora_layer(8, 6, 2, 4, torch.float32, torch.float32, seed=1, **config)
    assert row_delta(layer, "default", [8, 6]) is None


def test_wrong_shape_unknown_adapter_and_merged_layer_are_left_to_peft():
    layer = _lora_layer(8, 6, 2, 4, torch.float32, torch.float32, seed=1)
    assert row_delta(layer, "default", [6, 8]) is None
    assert row_delta(layer, "other", [8, 6]) is None
    layer.merge()
    assert row_delta(layer, "default", [8, 6]) is None


def test_conv1d_lora_is_left_to_peft():
    """GPT-2's Conv1D: peft merges the transposed delta (fan_in_fan_out)."""
    from transformers.pytorch_utils import Conv1D

    net = torch.nn.Module()
    net.c_fc = Conv1D(8, 6)
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True))
    layer = model.base_model.model.c_fc
    assert layer.fan_in_fan_out
    assert row_delta(layer, "default", [6, 8]) is None


def test_embedding_lora_is_left_to_peft():
    net = torch.nn.Module()
    net.emb = torch.nn.Embedding(10, 4)
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["emb"]))
    assert row_delta(model.base_model.model.emb, "default", [10, 4]) is None
