"""HQQ checkpoints: transformers 5.23 loads them with random weights, without an error; qfinal
refuses them with the reason in every command.

The checkpoint is built here by hand, as HQQ stores a quantized Linear: packed `W_q` (uint8, two
4-bit codes a byte), `scale` and `zero` per group of 64, and config.json's quantization_config
with quant_method "hqq". transformers' behaviour is shown with hqq importable, as a user who
quantized with it has it: hqq lives in its own folder (`.venv/hqq-only`, installed by the
Makefile) and is put on the path of one child interpreter only, because once importable every
`import transformers` imports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import builders  # noqa: E402

HQQ_ONLY = Path(sys.prefix) / "hqq-only"
GROUP = 64
HQQ_CONFIG = {
    "quant_method": "hqq",
    "quant_config": {
        "weight_quant_params": {"nbits": 4, "group_size": GROUP, "axis": 1, "channel_wise": True, "optimize": True}
    },
    "skip_modules": ["lm_head"],
}
MARK = "@@hqq-child@@ "


def hqq_checkpoint(path: Path) -> Path:
    """A tiny Llama whose projections are stored as HQQ 4-bit: W_q, scale, zero (seeded codes)."""
    builders.llama(path, tied=False)
    g = torch.Generator().manual_seed(builders.SEED)
    tensors = {}
    for key, value in load_file(path / "model.safetensors").items():
        if not key.endswith("_proj.weight"):
            tensors[key] = value
            continue
        module, groups = key.removesuffix(".weight"), value.numel() // GROUP
        tensors[f"{module}.W_q"] = torch.randint(0, 256, (groups // 2, GROUP), dtype=torch.uint8, generator=g)
        tensors[f"{module}.scale"] = torch.rand(groups, 1, generator=g).to(torch.float16)
        tensors[f"{module}.zero"] = (torch.rand(groups, 1, generator=g) * 15).to(torch.float16)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((path / "config.json").read_text())
    raw["quantization_config"] = HQQ_CONFIG
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return path


@pytest.fixture(scope="module")
def hqq(tmp_path_factory):
    return hqq_checkpoint(tmp_path_factory.mktemp("hqq") / "hqq")


CHILD = f"""
import contextlib, io, json, sys
import hqq  # importable here only
import torch, transformers as tf
tf.logging.set_verbosity_error()
path = sys.argv[1]
out = {{}}
torch.manual_seed(0)
a, info = tf.LlamaForCausalLM.from_pretrained(path, output_loading_info=True)
torch.manual_seed(1)
b = tf.LlamaForCausalLM.from_pretrained(path)
sa, sb = a.state_dict(), b.state_dict()
out["quantizer"] = type(a.hf_quantizer).__name__
out["missing"] = sorted(info["missing_keys"])
out["unexpected"] = sorted(info["unexpected_keys"])
out["proj_classes"] = sorted({{type(m).__name__ for n, m in a.named_modules() if n.endswith("_proj")}})
out["random"] = sorted(k for k in sa if k.endswith("_proj.weight") and not torch.equal(sa[k], sb[k]))
from qfinal.cli.app import main
for name, argv in (("load", ["load", path]), ("fast", ["validate", path, "--fast", "--json", "-"])):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main(argv)
        except SystemExit as exc:
            out[name] = [exc.code, stdout.getvalue(), stderr.getvalue()]
print("\\n{MARK}" + json.dumps(out), flush=True)
"""


def test_transformers_loads_random_weights_where_qfinal_refuses(hqq):
    """With hqq importable, from_pretrained returns a model whose projections are plain nn.Linear
    at their random initialization (a different seed gives different weights) and drops every
    W_q/scale/zero; qfinal load and validate --fast, in the same interpreter, refuse it."""
    if not (HQQ_ONLY / "hqq").is_dir():
        pytest.skip(f"hqq is not installed in {HQQ_ONLY} (the Makefile installs it)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HQQ_ONLY)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(hqq)], capture_output=True, text=True, env=env, timeout=600)
    marks = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert marks, proc.stderr[-3000:]
    out = json.loads(marks[-1][len(MARK) :])
    projections = sorted(
        k.removesuffix(".W_q") + ".weight" for k in load_file(hqq / "model.safetensors") if ".W_q" in k
    )
    assert len(projections) == 14
    assert out["quantizer"] == "HqqHfQuantizer" and out["proj_classes"] == ["Linear"]
    assert set(projections) <= set(out["missing"])
    assert len([k for k in out["unexpected"] if k.endswith((".W_q", ".scale", ".zero"))]) == 3 * 14
    assert out["random"] == projections  # nothing of the checkpoint reached them

    code, _stdout, stderr = out["load"]
    assert code == 2
    (line,) = stderr.strip().splitlines()
    assert "hqq" in line and "random" in line
    code, stdout, _stderr = out["fast"]
    assert code == 1
    (finding,) = builders.failing_checks(json.loads(stdout))["quantization_config"]
    assert "random" in finding["message"]


def test_dequantize_refuses_hqq(hqq, tmp_path, capsys):
    code, _out, err = builders.run_cli(capsys, "dequantize", hqq, tmp_path / "out")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "HQQ" in line and "random" in line
    assert not (tmp_path / "out").exists()


def test_load_refuses_hqq(hqq, capsys):
    """qfinal refuses before transformers runs (which without hqq raises ImportError, and with it
    loads random weights): one line naming the config and qfinal's own reason, not transformers' error."""
    from qfinal.formats.refused import HQQ_REASON

    code, _out, err = builders.run_cli(capsys, "load", hqq)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"qfinal: error: {hqq / 'config.json'}: hqq checkpoint: "), line
    assert HQQ_REASON in line and "random" in line, line


def test_validate_fast_reports_hqq_without_hqq_installed(hqq, capsys):
    code, report = builders.run_json(capsys, "validate", hqq, "--fast")
    assert code == 1
    (finding,) = builders.failing_checks(report)["quantization_config"]
    assert "random" in finding["message"]


def test_refusal_is_declared_by_the_format():
    from qfinal.formats import format_for

    fmt = format_for({"quantization_config": HQQ_CONFIG})
    assert fmt is not None and fmt.name == "hqq"
    assert "random" in fmt.load_refusal({"quantization_config": HQQ_CONFIG})
    (finding,) = fmt.quant_state_findings({"quantization_config": HQQ_CONFIG}, None, None, lambda k: None)
    assert finding.severity == "error" and finding.check == "quantization_config"
