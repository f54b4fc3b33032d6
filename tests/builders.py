"""Tiny real checkpoints, built deterministically from configs (no hub).

Each builder writes a folder with config.json + safetensors via `save_pretrained` and returns
its path. Sizes keep bnb's 4-bit blocksize (64) happy.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open

SEED = 1234


def _save(model, path: Path, **kwargs) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, **kwargs)
    return path


def _build(config_cls, model_cls, path: Path, save_kwargs=None, **cfg) -> Path:
    torch.manual_seed(SEED)
    config = config_cls(**cfg)
    model = model_cls(config).eval()
    return _save(model, path, **(save_kwargs or {}))


LLAMA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def llama(path: Path, tied: bool = True, shard: str | None = None) -> Path:
    save_kwargs = {"max_shard_size": shard} if shard else None
    return _build(tf.LlamaConfig, tf.LlamaForCausalLM, path, save_kwargs, tie_word_embeddings=tied, **LLAMA)


def gpt2(path: Path) -> Path:
    return _build(
        tf.GPT2Config,
        tf.GPT2LMHeadModel,
        path,
        vocab_size=256,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )


def bert(path: Path) -> Path:
    return _build(
        tf.BertConfig,
        tf.BertForMaskedLM,
        path,
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )


def t5(path: Path) -> Path:
    return _build(
        tf.T5Config,
        tf.T5ForConditionalGeneration,
        path,
        vocab_size=256,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        tie_word_embeddings=True,
    )


BUILDERS = {
    "llama_tied": lambda p: llama(p, tied=True),
    "llama_untied": lambda p: llama(p, tied=False),
    "gpt2": gpt2,
    "bert": bert,
    "t5": t5,
    "llama_sharded": lambda p: llama(p, tied=False, shard="100KB"),
}


def probe_inputs(model) -> dict:
    """A fixed probe batch for logits comparisons."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 8), generator=g)
    kwargs = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids[:, :4]
    return kwargs


def output_cost(dense: Path, dtype, weights: dict | None = None, candidate=None) -> dict:
    """What `qfinal diff` should report as the logits cost against the dense original at `dense`,
    computed here on `qfinal diff`'s documented probe batch, in float64. The candidate is the
    dense model with `weights` (a dequantized format's weights) swapped in, or `candidate` itself
    (a model the format's library runs with its own kernels)."""
    from qfinal.compare.outputs import probe_batch

    original = tf.AutoModelForCausalLM.from_pretrained(dense, dtype=dtype).eval()
    if candidate is None:
        candidate = tf.AutoModelForCausalLM.from_pretrained(dense, dtype=dtype).eval()
        candidate.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    probe = probe_batch(original)
    with torch.no_grad():
        la, lb = (m(**probe).logits.double().reshape(-1, m.config.vocab_size) for m in (candidate, original))
    lpa, lpb = torch.log_softmax(la, -1), torch.log_softmax(lb, -1)
    return {
        "logits_max_abs": (la - lb).abs().max().item(),
        "kl_divergence": (lpb.exp() * (lpb - lpa)).sum(-1).mean().item(),
        "top1_agreement": (la.argmax(-1) == lb.argmax(-1)).double().mean().item(),
    }


def assert_output_cost(reported: dict, expected: dict) -> None:
    """`qfinal diff`'s output section equals `output_cost`'s, and shows a real, finite cost."""
    assert reported["logits_max_abs"] == pytest.approx(expected["logits_max_abs"], rel=1e-9)
    assert reported["kl_divergence"] == pytest.approx(expected["kl_divergence"], rel=1e-6)
    assert reported["top1_agreement"] == expected["top1_agreement"]
    assert 0 < reported["kl_divergence"] < 1 and 0 < reported["logits_max_abs"] < 10


QUANT_OPTIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


def model_class_for(path: Path):
    config = tf.AutoConfig.from_pretrained(path)
    return getattr(tf, config.architectures[0])


def bnb_checkpoint(source: Path, out: Path, method: str, max_shard_size: str | None = None) -> Path:
    """A pre-quantized bnb checkpoint, as transformers writes it after quantizing on the fly
    (sharded by save_pretrained when `max_shard_size` is given)."""
    cls = model_class_for(source)
    model = cls.from_pretrained(source, quantization_config=tf.BitsAndBytesConfig(**QUANT_OPTIONS[method]))
    return _save(model, out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, flat. Comparing these is bit-for-bit equality, NaN payloads and signed
    zeros included (4-bit data packed into a float quant_storage is full of NaN patterns, which
    torch.equal calls unequal). Written here, not taken from qfinal.compare: the code under test
    must not judge itself."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape and the same bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def tensors_by_file(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """file name -> {tensor name -> tensor}, for every *.safetensors file in `folder`."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            out[path.name] = {k: fh.get_tensor(k) for k in fh.keys()}
    return out


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in `folder`'s *.safetensors files, by name; no name may be in two files."""
    merged: dict[str, torch.Tensor] = {}
    for name, tensors in tensors_by_file(folder).items():
        assert not merged.keys() & tensors.keys(), (name, sorted(merged.keys() & tensors.keys()))
        merged.update(tensors)
    return merged


SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}


def failing_checks(report: dict, level: str = "error") -> dict[str, list[dict]]:
    """A JSON report's findings at `level` or above, by check name, in report order. A severity
    other than info/warning/error is a KeyError: the report's schema changed."""
    out: dict[str, list[dict]] = {}
    for f in report["findings"]:
        if SEVERITY_RANK[f["severity"]] >= SEVERITY_RANK[level]:
            out.setdefault(f["check"], []).append(f)
    return out


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `qfinal ARGV` in-process, through the CLI's error boundary (`qfinal.cli.app.main`); return
    its exit code, stdout and stderr. Whatever was printed before (fixture building) is dropped."""
    from qfinal.cli.app import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def run_json(capsys, *argv) -> tuple[int, dict]:
    """`qfinal ARGV --json -`: exit 0 or 1, no traceback, and the report parsed from stdout."""
    code, out, err = run_cli(capsys, *argv, "--json", "-")
    assert "Traceback" not in err, err
    assert code in (0, 1), (code, err[-2000:])
    assert out.strip(), (code, err[-2000:])
    return code, json.loads(out)


def sparse_header_over_cap(path: Path) -> int:
    """Give the safetensors file at `path` (created if missing) a header length field of qfinal's
    100 MB cap + 1, and make the file long enough, sparsely, to hold that header: the file is only
    refused for the length itself. Returns the length written."""
    from qfinal.checkpoint.headers import MAX_HEADER_SIZE

    n = MAX_HEADER_SIZE + 1
    path.touch()
    with open(path, "r+b") as fh:
        fh.write(struct.pack("<Q", n))
        fh.truncate(8 + n + 64)
    assert path.stat().st_size > 8 + n
    return n


def writer_tensors() -> dict[str, torch.Tensor]:
    """Every dtype the streaming writer takes, odd names (JSON escapes, non-ASCII), a scalar, an
    empty tensor, a non-contiguous one; several tensors per dtype so the name order matters."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.1.mlp.up_proj.weight": torch.randn(5, 3, generator=g).half(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(3, 5, generator=g).half(),
        "model.embed.weight": torch.randn(7, 4, generator=g).bfloat16(),
        "lm_head.weight": torch.randn(4, 6, generator=g),
        "scale": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "transposed": torch.randn(3, 4, generator=g).t(),
        "f64": torch.randn(2, generator=g, dtype=torch.float64),
        "position_ids": torch.arange(9).reshape(1, 9),
        "i32": torch.arange(-3, 3, dtype=torch.int32),
        "i16": torch.arange(-3, 3, dtype=torch.int16),
        "weight.int8": torch.randint(-128, 127, (4, 4), generator=g, dtype=torch.int8),
        "packed": torch.randint(0, 255, (10, 1), generator=g, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "fp8": torch.randn(3, 2, generator=g).to(torch.float8_e4m3fn),
        "fp8b": torch.randn(3, generator=g).to(torch.float8_e5m2),
        "c64": torch.randn(2, generator=g, dtype=torch.complex64),
        "u16": torch.arange(-2, 2, dtype=torch.int16).view(torch.uint16),  # no arange for uint16
        "u32": torch.arange(-2, 2, dtype=torch.int32).view(torch.uint32),
        "u64": torch.arange(-2, 2, dtype=torch.int64).view(torch.uint64),
        "e8m0": torch.arange(120, 126, dtype=torch.uint8).view(torch.float8_e8m0fnu),
        "fnuz_a": torch.arange(3, dtype=torch.uint8).view(torch.float8_e4m3fnuz),
        "fnuz_b": torch.arange(3, dtype=torch.uint8).view(torch.float8_e5m2fnuz),
        'odd "name"\\with\nescapes\u0001\u007f/é中': torch.randn(2, 2, generator=g).half(),
        "Zeta": torch.randn(2, generator=g).half(),  # uppercase sorts before lowercase
    }
    return tensors


def writer_entries(tensors) -> list[tuple]:
    """(name, dtype, shape) of each tensor: what the safetensors writers plan a header from."""
    return [(k, v.dtype, list(v.shape)) for k, v in tensors.items()]


PERTURBED = "model.layers.1.mlp.down_proj.weight"  # a weight of the Llama fixtures
DELTA = 0.5


def perturbed_copy(source: Path, dest: Path, key: str = PERTURBED, delta: float = DELTA) -> Path:
    """A copy of a single-file checkpoint folder with one element of `key` ([3, 5]) moved by `delta`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, dest)
    state = load_file(dest / "model.safetensors")
    state[key] = state[key].clone()
    state[key][3, 5] += delta
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def edited_copy(src: Path, dest: Path, edit=None, config_edit=None, metadata_edit=None) -> Path:
    """A copy of the single-file checkpoint folder `src`: its tensors dict through `edit`, its
    safetensors metadata (the source's, kept) through `metadata_edit`, config.json's
    quantization_config through `config_edit`. Without a tensor or metadata edit the safetensors
    file is copied byte for byte."""
    from safetensors.torch import load_file, save_file

    dest.mkdir()
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    if edit is not None or metadata_edit is not None:
        with safe_open(str(src / "model.safetensors"), "pt") as fh:
            metadata = dict(fh.metadata() or {})
        tensors = load_file(src / "model.safetensors")
        if edit is not None:
            edit(tensors)
        if metadata_edit is not None:
            metadata_edit(metadata)
        save_file(tensors, dest / "model.safetensors", metadata=metadata or None)
    if config_edit is not None:
        raw = json.loads((dest / "config.json").read_text())
        config_edit(raw["quantization_config"])
        (dest / "config.json").write_text(json.dumps(raw))
    return dest


def dequantize_each(sources: dict[str, Path], root: Path, dtype: str) -> dict[str, Path]:
    """name -> OUT of `qfinal dequantize SRC OUT --dtype DTYPE -q` for each source, run through
    the CLI (exit 0 asserted); each OUT is `root / name`. For module-scoped fixtures: no capsys."""
    from qfinal.cli.app import main

    outs = {}
    for name, src in sources.items():
        outs[name] = root / name
        with pytest.raises(SystemExit) as exit_info:
            main(["dequantize", str(src), str(outs[name]), "--dtype", dtype, "-q"])
        assert exit_info.value.code == 0, name
    return outs


def assert_diff_rows(rows: list[dict], dense: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """`qfinal diff QUANTIZED DENSE_ORIGINAL`'s tensor rows: one for every tensor of `dense`; each
    weight in `reference` (the format's own dequantization) "different" by exactly its relative
    error against the dense original, computed here in float64; every other tensor "identical"."""
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) >= set(dense), sorted(set(dense) - set(by_name))
    for key, row in by_name.items():
        if key not in reference:
            assert row["status"] == "identical", key
            continue
        ref, orig = reference[key].double(), dense[key].double()
        expected = ((ref - orig).norm() / orig.norm()).item()
        assert row["status"] == "different" and row["rel_error"] == pytest.approx(expected, rel=1e-9), key
