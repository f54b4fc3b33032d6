"""`qfinal merge`: the streaming merge equals peft's `merge_and_unload()` + `save_pretrained` bit for bit,
for every adapter type peft can merge, on every fixture; QLoRA bases; refusals write nothing."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import builders  # noqa: E402

from qfinal.ops.merge import run_merge  # noqa: E402

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")
from peft import PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.config import BdLoraConfig, KasaConfig  # noqa: E402

LIN = ["q_proj", "v_proj", "down_proj"]
# LoRA and its variants first, then every other type peft 0.21 merges (tests/test_adapter_types.py
# has the ones it cannot: prompt learning, POLY, SHADOW).
TYPES = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=LIN),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=LIN, use_rslora=True),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=LIN, use_dora=True),
    "lora_patterns": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LIN, rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3}
    ),
    "lora_embedding": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "kasa": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=LIN, kasa_config=KasaConfig()),
    "bdlora": lambda: peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LIN,
        use_bdlora=BdLoraConfig(target_modules_bd_a=["down_proj"], target_modules_bd_b=["q_proj", "v_proj"], nblocks=2),
    ),
    "lora_modules_to_save": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]
    ),
    "adalora": lambda: peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, target_modules=LIN, total_step=100),
    "ia3": lambda: peft.IA3Config(target_modules=LIN, feedforward_modules=["down_proj"]),
    "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=LIN),
    "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=LIN),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=16, target_modules=LIN),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=LIN),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "fourierft": lambda: peft.FourierFTConfig(n_frequency=20, target_modules=LIN),
    "hra": lambda: peft.HRAConfig(r=4, target_modules=LIN),
    "miss": lambda: peft.MissConfig(r=4, target_modules=LIN),
    "randlora": lambda: peft.RandLoraConfig(r=4, target_modules=LIN),
    "vblora": lambda: peft.VBLoRAConfig(r=4, num_vectors=16, vector_length=16, target_modules=LIN),
    "shira": lambda: peft.ShiraConfig(r=4, target_modules=LIN),
    "c3a": lambda: peft.C3AConfig(block_size=16, target_modules=LIN),
    "road": lambda: peft.RoadConfig(target_modules=LIN, group_size=16),
    "ln_tuning": lambda: peft.LNTuningConfig(target_modules=["input_layernorm"]),
    "trainable_tokens": lambda: peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1, 5, 7]),
    "delora": lambda: peft.DeloraConfig(r=4, target_modules=LIN),
    "waveft": lambda: peft.WaveFTConfig(n_frequency=16, target_modules=LIN),
    "gralora": lambda: peft.GraloraConfig(r=4, gralora_k=2, target_modules=LIN),
    "deft": lambda: peft.DeftConfig(target_modules=LIN),
    "glora": lambda: peft.GloraConfig(target_modules=LIN),
    "hira": lambda: peft.HiraConfig(target_modules=LIN),
    "peanut": lambda: peft.PeanutConfig(target_modules=LIN),
    "pvera": lambda: peft.PveraConfig(target_modules=["q_proj", "v_proj"]),
    "supertuning": lambda: peft.SupertuningConfig(target_modules=LIN),
    "tinylora": lambda: peft.TinyLoraConfig(target_modules=LIN),
    "unilora": lambda: peft.UniLoraConfig(target_modules=LIN),
}
# held whole (peft's load_adapter): tensors shared by modules, or built anew from the file's, or base
# tensors saved with the adapter; every other type is read from the file module by module
HELD_WHOLE = {"vera", "pvera", "randlora", "tinylora", "unilora", "vblora", "shira", "lora_embedding"}
# peft derives these layers from the base weights at injection (SVD): refused, never merged wrong
BASE_AT_INJECTION = {
    "frod": lambda: peft.FrodConfig(target_modules=LIN),
    "osf": lambda: peft.OSFConfig(target_modules=LIN),
    "psoft": lambda: peft.PsoftConfig(target_modules=LIN),
}
FIXTURE_LORA = {  # fixture -> LoRA targets (GPT-2's Conv1D needs fan_in_fan_out)
    "llama_tied": dict(target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "gpt2": dict(target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True),
    "bert": dict(target_modules=["query", "value", "dense"]),
    "t5": dict(target_modules=["q", "v", "wo"]),
    "llama_sharded": dict(target_modules="all-linear"),
}


def _model(path: Path, **kwargs):
    return builders.model_class_for(path).from_pretrained(path, **kwargs).eval()


def _adapter(base: Path, out: Path, config, seed: int) -> Path:
    """A real peft adapter, saved by peft, every trainable tensor moved off its initialization."""
    if out.exists():
        return out
    torch.manual_seed(seed)
    model = get_peft_model(_model(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.add_((0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))
    model.save_pretrained(out)
    return out


def _peft_merged(base_model, adapters: list[Path], out: Path) -> Path:
    """peft's result: each adapter loaded and merged in turn (`merge_and_unload`), then saved."""
    model = base_model
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.save_pretrained(out)
    return out


def _assert_same(ours: Path, theirs: Path, base: Path | None = None) -> None:
    a, b = builders.read_tensors(ours), builders.read_tensors(theirs)
    assert sorted(a) == sorted(b)
    different = [k for k in b if not builders.bits_equal(a[k], b[k])]
    assert different == []
    if base is not None:  # the adapter changed something: the comparison means something
        original = builders.read_tensors(base)
        assert any(not builders.bits_equal(b[k], original[k].to(b[k].dtype)) for k in b if k in original)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("merge_stream")


@pytest.fixture(scope="module")
def llama(checkpoints):
    return checkpoints["llama_untied"]


def _bf16_base(root: Path, llama: Path) -> Path:
    bf16 = root / "llama_bf16"
    if not bf16.exists():
        _model(llama, dtype=torch.bfloat16).save_pretrained(bf16)
    return bf16


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", list(TYPES))
def test_every_mergeable_type_equals_peft(root, llama, kind, base_dtype):
    """On a bf16 base too: a 16-bit base is where reading the adapter per module could drift from
    peft's eager load (peft moves adapters to the base's dtype on a meta load: AdaLoRA's ranknum)."""
    base = llama if base_dtype == "float32" else _bf16_base(root, llama)
    config = TYPES[kind]()
    config.task_type = "CAUSAL_LM"
    adapter = _adapter(llama, root / f"adapter_{kind}", config, seed=list(TYPES).index(kind) + 1)
    theirs = _peft_merged(_model(base), [adapter], root / f"peft_{kind}_{base_dtype}")
    ours = root / f"ours_{kind}_{base_dtype}"
    report = run_merge(base, ours, [str(adapter)])
    _assert_same(ours, theirs, base)
    assert report.extra["merge"]["merged_tensors"] > 0
    [held] = [a["held_whole"] for a in report.extra["merge"]["adapters"]]
    assert (held is not None) == (kind in HELD_WHOLE), held
    # one file, as save_pretrained writes it: the very bytes
    assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()


@pytest.mark.parametrize("fixture", list(FIXTURE_LORA))
def test_lora_on_every_fixture(root, checkpoints, fixture):
    base = checkpoints[fixture]
    config = peft.LoraConfig(r=4, lora_alpha=8, **FIXTURE_LORA[fixture])
    adapter = _adapter(base, root / f"adapter_{fixture}", config, seed=7)
    theirs = _peft_merged(_model(base), [adapter], root / f"peft_{fixture}")
    run_merge(base, root / f"ours_{fixture}", [str(adapter)])
    _assert_same(root / f"ours_{fixture}", theirs, base)
    ours = root / f"ours_{fixture}"
    if fixture == "llama_sharded":  # the base's sharding is kept: one output shard per input shard
        names = sorted(p.name for p in base.glob("*.safetensors"))
        assert len(names) > 1 and sorted(p.name for p in ours.glob("*.safetensors")) == names
        assert (ours / "model.safetensors.index.json").is_file()
    else:
        assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()
    # plain from_pretrained loads it, every tensor from the file
    _loaded, info = builders.model_class_for(ours).from_pretrained(ours, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_bf16_base_and_dtype_option(root, llama, variant):
    """On a bf16 base peft computes LoRA's B @ A in fp32 on CPU and casts the delta back; --dtype
    bfloat16 on an fp32 base equals peft on the base loaded in bf16."""
    bf16 = _bf16_base(root, llama)
    config = TYPES[variant]()
    adapter = _adapter(llama, root / f"adapter_{variant}", config, seed=list(TYPES).index(variant) + 1)
    theirs = _peft_merged(_model(bf16), [adapter], root / f"peft_bf16_{variant}")
    run_merge(bf16, root / f"ours_bf16_{variant}", [str(adapter)])
    run_merge(llama, root / f"ours_cast_{variant}", [str(adapter)], dtype="bfloat16")
    _assert_same(root / f"ours_bf16_{variant}", theirs, bf16)
    _assert_same(root / f"ours_cast_{variant}", theirs)


def test_several_adapters_merge_in_turn(root, llama):
    kinds = ["dora", "loha", "lora"]
    adapters = []
    for kind in kinds:
        config = TYPES[kind]()
        adapters.append(_adapter(llama, root / f"adapter_{kind}", config, seed=list(TYPES).index(kind) + 1))
    theirs = _peft_merged(_model(llama), adapters, root / "peft_three")
    report = run_merge(llama, root / "ours_three", [str(a) for a in adapters])
    swapped = run_merge(llama, root / "ours_swapped", [str(a) for a in reversed(adapters)])
    _assert_same(root / "ours_three", theirs, llama)
    assert [a["peft_type"] for a in report.extra["merge"]["adapters"]] == ["LORA", "LOHA", "LORA"]
    # the order matters (DoRA's norm is taken of what it merges into): not the same bytes reversed
    assert swapped.extra["merge"]["merged_tensors"] == report.extra["merge"]["merged_tensors"]
    a, b = builders.read_tensors(root / "ours_three"), builders.read_tensors(root / "ours_swapped")
    assert any(not builders.bits_equal(a[k], b[k]) for k in a)


def test_qlora_merges_into_the_dequantized_weights(root, checkpoints, llama):
    nf4 = checkpoints.quantized("llama_untied", "nf4")
    adapter = _adapter(llama, root / "adapter_lora", TYPES["lora"](), seed=1)
    base = _model(nf4, dtype=torch.float16)
    base = base.dequantize(dtype=torch.float16) or base
    # transformers cannot save a dequantized model (its bnb converters have no reverse): its state dict
    theirs = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    report = run_merge(nf4, root / "ours_qlora", [str(adapter)], dtype="float16")
    dense = _peft_merged(_model(llama, dtype=torch.float16), [adapter], root / "peft_dense16")
    original = run_merge(nf4, root / "ours_original", [str(adapter)], base_weights=llama, compare=False)
    ours = builders.read_tensors(root / "ours_qlora")
    assert sorted(ours) == sorted(theirs)
    # transformers keeps the bnb checkpoint's unquantized tensors in fp32; qfinal writes every float in
    # --dtype, as `qfinal dequantize` does (one exact cast)
    assert [k for k in ours if not builders.bits_equal(ours[k], theirs[k].to(ours[k].dtype))] == []
    assert all(theirs[k].dtype == torch.float16 for k in ours if k.endswith("proj.weight"))  # merged in fp16
    _assert_same(root / "ours_original", dense)
    info = report.extra["merge"]
    assert report.quantization == "nf4"
    change = info["logits_vs_unmerged"]
    assert change["positions"] > 0 and 0 <= change["logits_max_abs"] < 1.0 and change["top1_agreement"] > 0.5
    assert "logits_vs_unmerged" not in original.extra["merge"]
    config = (root / "ours_qlora" / "config.json").read_text()
    assert "quantization_config" not in config and '"dtype": "float16"' in config


def test_adapters_in_folders_of_the_same_name(root, llama, tmp_path):
    """Two adapters both in a folder named `ck`: named ck and ck_2, as `qfinal save` names them,
    and merged in turn as peft does."""
    adapters = [
        _adapter(llama, tmp_path / "a" / "ck", TYPES["lora"](), seed=21),
        _adapter(llama, tmp_path / "b" / "ck", TYPES["loha"](), seed=22),
    ]
    theirs = _peft_merged(_model(llama), adapters, tmp_path / "peft")
    report = run_merge(llama, tmp_path / "ours", [str(a) for a in adapters])
    assert [a["name"] for a in report.extra["merge"]["adapters"]] == ["ck", "ck_2"]
    _assert_same(tmp_path / "ours", theirs, llama)


def test_bad_config_json_is_one_line(llama, tmp_path, capsys):
    """A base whose config.json is not JSON: exit 2, one line, nothing written."""
    adapter = tmp_path / "adapter"
    _adapter(llama, adapter, TYPES["lora"](), seed=1)
    base = tmp_path / "base"
    shutil.copytree(llama, base)
    (base / "config.json").write_text("{not json", encoding="utf-8")
    code, _out, err = builders.run_cli(capsys, "merge", base, tmp_path / "out", "--adapter", adapter)
    assert code == 2 and "config.json is not valid JSON" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_refusals_write_nothing(root, checkpoints, llama, tmp_path, capsys):
    gpt2 = checkpoints["gpt2"]
    foreign = _adapter(
        gpt2, root / "adapter_gpt2", peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True), 3
    )
    prompt = root / "adapter_prompt"
    if not prompt.exists():
        config = peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
        get_peft_model(_model(llama), config).save_pretrained(prompt)
    lora = _adapter(llama, root / "adapter_lora", TYPES["lora"](), seed=1)
    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(lora, wrong_shape)
    tensors = builders.read_tensors(wrong_shape)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    from safetensors.torch import save_file

    save_file(tensors, wrong_shape / "adapter_model.safetensors")
    cases = {"foreign": foreign, "prompt": prompt, "shape": wrong_shape}
    results = {}
    for name, adapter in cases.items():
        out = tmp_path / f"out_{name}"
        results[name] = builders.run_cli(capsys, "merge", llama, out, "--adapter", adapter) + (out.exists(),)
    for name, (code, _out, err, written) in results.items():
        assert code == 2, (name, err)
        assert not written, name
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
    assert "cannot merge" in results["prompt"][2]
    assert not list(tmp_path.glob(".out_*"))  # no temporary folder left


def test_cli_dry_run_and_json(root, llama, tmp_path, capsys):
    adapter = _adapter(llama, root / "adapter_lora", TYPES["lora"](), seed=1)
    code, report = builders.run_json(capsys, "merge", llama, tmp_path / "out", "--adapter", adapter, "--dry-run")
    code2, written = builders.run_json(capsys, "merge", llama, tmp_path / "out2", "--adapter", adapter)
    exists = builders.run_cli(capsys, "merge", llama, tmp_path / "out2", "--adapter", adapter)
    assert code == 0 and not (tmp_path / "out").exists()
    info = report["extra"]["merge"]
    assert info["dry_run"] and info["files"] == ["model.safetensors"] and info["merged_tensors"] == 6
    assert info["peak_bytes_estimate"] > 0 and info["total_bytes"] > 0
    assert code2 == 0 and "config.json" in written["extra"]["merge"]["files"]
    assert exists[0] == 2 and "already exists" in exists[2]
    [stage] = [s for s in report["stages"] if s["name"] == "merge"]
    assert "would write" in stage["detail"] and "peak memory needed about" in stage["detail"]
    assert any("would be merged into" in f["message"] for f in report["findings"])


@pytest.mark.slow  # starts worker processes, each importing torch, transformers and peft
def test_pool_executor_writes_the_same_bytes(root, checkpoints):
    from qfinal.ops.executors import make_executor

    base = checkpoints["llama_sharded"]
    adapter = _adapter(
        base, root / "adapter_llama_sharded", peft.LoraConfig(r=4, lora_alpha=8, **FIXTURE_LORA["llama_sharded"]), 7
    )
    pooled = run_merge(base, root / "pool", [str(adapter)], executor=make_executor("pool", 2))
    here = run_merge(base, root / "inproc", [str(adapter)])
    assert pooled.extra["merge"]["worker_peak_bytes"] > 100 * 2**20 and here.extra["merge"]["worker_peak_bytes"] == 0
    files = sorted(p.name for p in (root / "inproc").iterdir())
    assert files == sorted(p.name for p in (root / "pool").iterdir())
    assert all((root / "pool" / f).read_bytes() == (root / "inproc" / f).read_bytes() for f in files)


def test_the_comparison_can_fail(root, llama):
    """A changed tensor is seen: _assert_same is not vacuous."""
    adapter = _adapter(llama, root / "adapter_lora", TYPES["lora"](), seed=1)
    run_merge(llama, root / "ours_check", [str(adapter)])
    with pytest.raises(AssertionError):
        _assert_same(root / "ours_check", llama)


def _transformers_quantized(source: Path, out: Path, method: str) -> Path:
    """transformers' quantize-on-load of a plain checkpoint, saved."""
    import transformers as tf

    config = tf.BitsAndBytesConfig(**builders.QUANT_OPTIONS[method])
    builders.model_class_for(source).from_pretrained(source, quantization_config=config).save_pretrained(out)
    return out


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantize_equals_quantize_of_the_plain_merge(root, llama, tmp_path, capsys, method):
    """--quantize: OUT is, file for file, `qfinal quantize` of the plain merge, and so transformers'
    quantize-on-load + save_pretrained of peft's merged model; no temporary folder stays."""
    from qfinal.ops.quantize import run_quantize

    adapter = _adapter(llama, root / "adapter_lora", TYPES["lora"](), seed=1)
    plain = tmp_path / "plain"
    run_merge(llama, plain, [str(adapter)])
    run_quantize(plain, tmp_path / "quantized", method=method)
    peft_merged = _peft_merged(_model(llama), [adapter], tmp_path / "peft")
    theirs = _transformers_quantized(peft_merged, tmp_path / "transformers", method)
    out = tmp_path / "out"
    if method == "nf4":  # through the CLI
        code, report = builders.run_json(capsys, "merge", llama, out, "--adapter", adapter, "--quantize", method)
        assert code == 0 and report["quantization"] == "nf4"
        files = report["extra"]["merge"]["files"]
    else:
        result = run_merge(llama, out, [str(adapter)], quantize=method)
        assert result.quantization == "int8" and result.keys.converted
        files = result.extra["merge"]["files"]
    names = sorted(p.name for p in (tmp_path / "quantized").iterdir())
    assert sorted(p.name for p in out.iterdir()) == names == files
    assert [n for n in names if (out / n).read_bytes() != (tmp_path / "quantized" / n).read_bytes()] == []
    written = sorted(p.name for p in theirs.iterdir())
    assert [n for n in written if (out / n).read_bytes() != (theirs / n).read_bytes()] == []
    assert "quantization_config" in (out / "config.json").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_qlora_requantized_warns_that_errors_compound(root, checkpoints, llama, tmp_path):
    nf4 = checkpoints.quantized("llama_untied", "nf4")
    adapter = _adapter(llama, root / "adapter_lora", TYPES["lora"](), seed=1)
    report = run_merge(nf4, tmp_path / "out", [str(adapter)], quantize="nf4")  # compares, as for a bnb base
    dense = run_merge(nf4, tmp_path / "dense", [str(adapter)], base_weights=llama, quantize="nf4", compare=False)
    warnings = [f.message for f in report.findings if f.severity == "warning"]
    assert any("the two rounding errors compound" in m for m in warnings), warnings
    assert not any("compound" in f.message for f in dense.findings)
    assert report.quantization == "nf4, then nf4"
    change = report.extra["merge"]["logits_vs_unmerged"]  # of the plain merge, before requantizing
    assert change["positions"] > 0 and change["logits_max_abs"] < 1.0
    assert any("before requantization" in f.message for f in report.findings)
    from qfinal.ops.quantize import run_quantize

    run_merge(nf4, tmp_path / "plain", [str(adapter)], compare=False)
    run_quantize(tmp_path / "plain", tmp_path / "ref", method="nf4")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_quantize_failure_publishes_nothing(root, llama, tmp_path, capsys, monkeypatch):
    """A failure after the merge: OUT absent, the temporary merge removed, one line and exit 2."""
    import qfinal.ops.quantize as quantize_mod
    from qfinal.errors import SourceError

    adapter = _adapter(llama, root / "adapter_lora", TYPES["lora"](), seed=1)
    seen = []

    def failing(source, out, **kwargs):
        seen.append(sorted(p.name for p in Path(source).iterdir()))
        raise SourceError("simulated failure", where=str(source))

    monkeypatch.setattr(quantize_mod, "run_quantize", failing)
    code, _out, err = builders.run_cli(
        capsys, "merge", llama, tmp_path / "out", "--adapter", adapter, "--quantize", "nf4"
    )
    assert code == 2 and "simulated failure" in err and len(err.strip().splitlines()) == 1
    assert seen and "model.safetensors" in seen[0]  # the merge was written before quantizing
    assert list(tmp_path.iterdir()) == []
    bad = builders.run_cli(capsys, "merge", llama, tmp_path / "x", "--adapter", adapter, "--double-quant")
    assert bad[0] == 2 and "--quantize" in bad[2] and not (tmp_path / "x").exists()


def test_lora_merged_in_slabs_of_rows_equals_peft(root, checkpoints, monkeypatch):
    """Slabs forced small (alignment 16, one aligned slab per 16 rows, tensors copied a row at a
    time): plain LoRAs (two in turn, one with rsLoRA and the head targeted) still give peft's bytes,
    and the row merge really ran."""
    from qfinal.adapters import lora_rows
    from qfinal.checkpoint.row_slabs import CHUNK_ENV

    base = checkpoints["llama_sharded"]
    adapters = [
        _adapter(base, root / "adapter_rows_a", peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), 11),
        _adapter(
            base,
            root / "adapter_rows_b",
            peft.LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=["up_proj", "o_proj", "lm_head"]),
            12,
        ),
    ]
    theirs = _peft_merged(_model(base), adapters, root / "peft_rows")
    monkeypatch.setenv(CHUNK_ENV, "1")
    monkeypatch.setattr(lora_rows, "ROW_ALIGN", 16)
    calls = []
    real = lora_rows.RowDelta.add_to

    def spy(self, first, slab, workspace):
        calls.append(first)
        return real(self, first, slab, workspace)

    monkeypatch.setattr(lora_rows.RowDelta, "add_to", spy)
    run_merge(base, root / "ours_rows", [str(a) for a in adapters])
    _assert_same(root / "ours_rows", theirs, base)
    assert max(calls) >= 112  # the 128-row weights went in 16-row slabs
    assert len(calls) > 50


def test_lora_falls_back_to_peft_where_the_probe_fails(root, llama, monkeypatch):
    """A machine whose matmul fails the slab probe merges every module whole, by peft."""
    from qfinal.adapters import lora_rows
    from qfinal.checkpoint.row_slabs import CHUNK_ENV

    adapter = _adapter(llama, root / "adapter_lora", TYPES["lora"](), seed=1)
    theirs = _peft_merged(_model(llama), [adapter], root / "peft_lora_probe")
    monkeypatch.setenv(CHUNK_ENV, "1")
    monkeypatch.setattr(lora_rows, "ROW_ALIGN", 16)
    monkeypatch.setattr(lora_rows, "slabs_are_exact", lambda *a: False)
    monkeypatch.setattr(lora_rows.RowDelta, "add_to", lambda *a: pytest.fail("row merge used"))
    run_merge(llama, root / "ours_lora_probe", [str(adapter)])
    _assert_same(root / "ours_lora_probe", theirs, llama)


@pytest.mark.parametrize("kind", list(BASE_AT_INJECTION))
def test_types_built_from_the_base_weights_are_refused(root, llama, kind, tmp_path):
    """FROD, OSF, PSOFT: a hollow-base injection gave other bytes than peft; refused, nothing written."""
    from qfinal.errors import ConfigError

    config = BASE_AT_INJECTION[kind]()
    config.task_type = "CAUSAL_LM"
    adapter = _adapter(llama, root / f"adapter_{kind}", config, seed=31)
    with pytest.raises(ConfigError, match="from the base weights"):
        run_merge(llama, tmp_path / "out", [str(adapter)])
    assert not (tmp_path / "out").exists()


def test_adapter_is_read_module_by_module(root, llama, tmp_path):
    """Between merges no adapter tensor is in memory; a module's are, while it merges, in the
    dtype peft loads them in (a bf16 file: fp32, peft's autocast)."""
    from safetensors.torch import load_file, save_file

    from qfinal.ops.merge_shard import MergeJob, Session

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LIN)
    fp32 = _adapter(llama, root / "adapter_by_module", config, seed=41)
    adapter = tmp_path / "adapter_bf16"
    shutil.copytree(fp32, adapter)
    tensors = {k: v.bfloat16() for k, v in load_file(fp32 / "adapter_model.safetensors").items()}
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    job = MergeJob(
        base=str(llama),
        confine_to=str(llama),
        adapters=((str(adapter), None),),
        dtype=None,
        config=json.loads((llama / "config.json").read_text()),
    )
    session = Session(job)
    try:
        [merger] = session.mergers
        assert merger.lazy is not None and merger.held_whole is None

        def adapter_tensors():
            return [(n, t) for n, t in merger.peft_model.named_parameters() if f".{merger.name}." in n]

        assert adapter_tensors() and all(t.is_meta for _n, t in adapter_tensors())
        path = next(iter(merger.units))
        with merger.loaded(path):
            real = [n for n, t in adapter_tensors() if not t.is_meta]
            assert real and all(n.startswith(f"base_model.model.{path}.") for n in real)
            assert all(t.dtype == torch.float32 for _n, t in adapter_tensors())  # peft's autocast, as loaded
        assert all(t.is_meta for _n, t in adapter_tensors())
        assert merger.adapter_bytes == max(merger.lazy.unit_bytes(p) for p in merger.units) > 0  # the largest unit's
    finally:
        session.close()


def test_a_tensor_missing_from_the_file_keeps_peft_initialization(root, llama, tmp_path):
    """peft leaves an injected tensor the file lacks at its initialization (LoRA's B: zeros); so does
    the merge, which then holds that adapter whole, and says so."""
    from safetensors.torch import load_file, save_file

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LIN)
    adapter = _adapter(llama, root / "adapter_for_missing", config, seed=43)
    cut = tmp_path / "cut"
    shutil.copytree(adapter, cut)
    tensors = load_file(cut / "adapter_model.safetensors")
    dropped = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    del tensors[dropped]
    save_file(tensors, cut / "adapter_model.safetensors", metadata={"format": "pt"})
    theirs = _peft_merged(_model(llama), [cut], tmp_path / "peft")
    report = run_merge(llama, tmp_path / "ours", [str(cut)])
    _assert_same(tmp_path / "ours", theirs, llama)
    [info] = report.extra["merge"]["adapters"]
    assert info["held_whole"] == "the file leaves a tensor to its initialization"
    assert any("lacks 1 tensor" in f.message for f in report.findings)


def test_heap_threshold_is_fixed_once_and_leaves_a_users_own(monkeypatch):
    from qfinal.checkpoint import heap

    monkeypatch.setattr(heap, "_done", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert heap.keep_heap_flat() is False  # the user's choice stands
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    if sys.platform == "linux":  # glibc here
        assert heap.keep_heap_flat() is True and heap._done is True


def test_an_adapter_peft_cannot_inject_on_meta_is_held_whole(root, llama, tmp_path, monkeypatch):
    from qfinal.adapters import deltas
    from qfinal.errors import CheckpointError

    real = deltas._inject

    def inject(hollow, prep, lazy):
        if lazy:
            raise CheckpointError("no meta injection here")
        return real(hollow, prep, lazy)

    monkeypatch.setattr(deltas, "_inject", inject)
    adapter = _adapter(llama, root / "adapter_lora", TYPES["lora"](), seed=1)
    theirs = _peft_merged(_model(llama), [adapter], tmp_path / "peft")
    report = run_merge(llama, tmp_path / "ours", [str(adapter)])
    _assert_same(tmp_path / "ours", theirs, llama)
    [info] = report.extra["merge"]["adapters"]
    assert info["held_whole"] == "peft cannot inject it on the meta device"


BASE_REWRITTEN = {  # LoRA initializations that rewrite the base weight as peft injects the adapter
    "pissa": "pissa",  # W - s B0 A0 from W's SVD
    "pissa_niter": "pissa_niter_4",  # the same by randomized SVD: peft's own merge differs run to run
    "olora": "olora",  # W - s B0 A0 from W's QR (in place: fails on a hollow tensor)
}


@pytest.mark.parametrize("kind", list(BASE_REWRITTEN))
def test_lora_inits_that_rewrite_the_base_are_refused(root, llama, kind, tmp_path):
    """The merge gave W + s B A where peft gives W - s B0 A0 + s B A (6 tensors differed for
    PiSSA): refused, naming the initialization, nothing written."""
    from qfinal.errors import ConfigError

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LIN, init_lora_weights=BASE_REWRITTEN[kind])
    config.task_type = "CAUSAL_LM"
    adapter = _adapter(llama, root / f"adapter_{kind}", config, seed=37)
    with pytest.raises(
        ConfigError, match=f"changes the base weights as it injects it .init_lora_weights='{BASE_REWRITTEN[kind]}'"
    ):
        run_merge(llama, tmp_path / "out", [str(adapter)])
    assert not (tmp_path / "out").exists()


def test_pissa_merges_in_memory_as_peft_does(root, llama, tmp_path, capsys):
    """What the refusal points to: `save --merge` gives peft's merge of a PiSSA adapter."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LIN, init_lora_weights="pissa")
    config.task_type = "CAUSAL_LM"
    adapter = _adapter(llama, root / "adapter_pissa", config, seed=37)
    theirs = _peft_merged(_model(llama), [adapter], tmp_path / "peft")
    code, _out, err = builders.run_cli(capsys, "save", llama, tmp_path / "ours", "--adapter", adapter, "--merge")
    assert code == 0, err
    _assert_same(tmp_path / "ours", theirs, llama)


def test_an_adapter_file_safetensors_cannot_read_is_one_line(root, llama, tmp_path, capsys):
    """A header qfinal's validator accepts but safetensors cannot load (an F6_E2M3 tensor): exit 2
    and one line, not a traceback, as when the file was read whole up front."""
    import struct

    from safetensors.torch import load_file

    adapter = _adapter(llama, root / "adapter_lora", TYPES["lora"](), seed=1)
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    target = next(k for k in tensors if k.endswith("lora_B.weight"))
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for key, value in tensors.items():
        raw = value.contiguous().view(torch.uint8).numpy().tobytes()
        if key == target:
            raw = b"\x11" * (value.numel() * 6 // 8)
        header[key] = {
            "dtype": "F6_E2M3" if key == target else "F32",
            "shape": list(value.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (bad / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)
    code, _out, err = builders.run_cli(capsys, "merge", llama, tmp_path / "out", "--adapter", bad)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "F6_E2M3" in err and not (tmp_path / "out").exists()


@pytest.mark.slow  # two processes, each importing torch, transformers and peft
def test_the_dry_run_estimate_covers_the_run(root, llama, tmp_path):
    """The peak a dry run predicts, and what a merge in a fresh process then peaks at (in this
    test's process, the estimate would include every earlier test's peak)."""
    import subprocess

    adapter = _adapter(llama, root / "adapter_lora", TYPES["lora"](), seed=1)

    def merge(*extra):
        argv = [sys.executable, "-m", "qfinal", "merge", str(llama), str(tmp_path / "out"), "--adapter", str(adapter)]
        done = subprocess.run([*argv, *extra, "--json", "-"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    estimate = merge("--dry-run")["extra"]["merge"]["peak_bytes_estimate"]
    [ran] = [s for s in merge()["stages"] if s["name"] == "merge"]
    assert 0 < ran["peak_rss_bytes"] <= estimate < 2 * ran["peak_rss_bytes"]  # covers it, and not wildly


@pytest.mark.parametrize("double_quant", [False, True])
def test_dry_run_with_quantize_sizes_the_quantized_output(root, checkpoints, tmp_path, monkeypatch, double_quant):
    """--dry-run --quantize plans the quantize step from the merge's outline (headers over holes):
    the files, tensor bytes and converted modules of the real run, nothing merged or written."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    base = checkpoints["llama_sharded"]
    adapter = _adapter(base, root / "adapter_sharded_all", peft.LoraConfig(r=4, target_modules="all-linear"), seed=9)
    options = dict(quantize="nf4", double_quant=double_quant)
    from qfinal.ops import quantize_run

    def no_data(*_args):  # the outline's data are holes: a dry run must not read them
        raise AssertionError("the dry run read a weight")

    with monkeypatch.context() as patched:
        patched.setattr(quantize_run, "nested_offset", no_data)
        dry = run_merge(base, tmp_path / "dry", [str(adapter)], dry_run=True, **options)
    real = run_merge(base, tmp_path / "real", [str(adapter)], **options)
    assert dry.extra["merge"]["files"] == dry.extra["quantize"]["files"]  # OUT's files, not the plain merge's
    assert not (tmp_path / "dry").exists() and list((tmp_path / "tmp").iterdir()) == []
    planned, written = dry.extra["quantize"], real.extra["quantize"]
    assert planned["dry_run"] and planned["files"] == [f for f in written["files"] if f.endswith(".safetensors")]
    assert [c.module for c in dry.keys.converted] == [c.module for c in real.keys.converted] != []
    on_disk = sum(p.stat().st_size for p in (tmp_path / "real").glob("*.safetensors"))
    if double_quant:  # the offsets in the quant-state JSON: a few bytes a weight
        assert abs(planned["total_bytes"] - written["total_bytes"]) < 32 * len(real.keys.converted)
    else:
        assert planned["total_bytes"] == written["total_bytes"]
    assert planned["total_bytes"] < on_disk < 2 * planned["total_bytes"]  # tensors + headers
    [stage] = [s for s in dry.stages if s.name == "plan"]
    assert "would write" in stage.detail and "peak memory needed about" in stage.detail
    from qfinal.errors import OutputError

    for quantize in (None, "nf4"):  # an OUT the run would refuse, the dry run refuses too
        with pytest.raises(OutputError, match="already exists"):
            run_merge(base, tmp_path / "real", [str(adapter)], dry_run=True, quantize=quantize)
