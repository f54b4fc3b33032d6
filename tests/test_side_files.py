"""The files beside the weights (`checkpoint.side_files`): one rule for merge, quantize and dequantize.
Copied are the plain files that are not weights, indexes or what the command writes itself; a
link out of the checkpoint is refused (one line, exit 2, nothing published), as weights are."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import builders  # noqa: E402

from qfinal.checkpoint.side_files import copy_side_files  # noqa: E402
from qfinal.errors import CheckpointError  # noqa: E402


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("tokenizer.json", "config.json", "model.safetensors", "model.safetensors.index.json", ".hidden"):
        (folder / name).write_text(name)
    (folder / "sub").mkdir()
    return folder


def test_what_is_copied(tmp_path):
    folder, out = _folder(tmp_path), tmp_path / "out"
    out.mkdir()
    assert copy_side_files(folder, folder, out) == ["tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == "tokenizer.json"
    assert copy_side_files(folder, folder, tmp_path / "out", skip=()) == ["config.json", "tokenizer.json"]


def test_a_link_out_of_the_checkpoint_is_refused(tmp_path):
    folder, out = _folder(tmp_path), tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere.txt").write_text("secret")
    (folder / "vocab.txt").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(CheckpointError, match="outside the model folder"):
        copy_side_files(folder, folder, out)


@pytest.mark.parametrize(
    "argv",
    [["dequantize"], ["quantize", "--quantize", "nf4"], ["merge", "--adapter", "ADAPTER"]],
    ids=lambda a: a[0],
)
def test_every_command_refuses_it(checkpoints, tmp_path, capsys, argv):
    peft = pytest.importorskip("peft")
    name, *rest = argv
    source = checkpoints.quantized("llama_untied", "nf4") if name == "dequantize" else checkpoints["llama_untied"]
    base = tmp_path / "base"
    shutil.copytree(source, base)
    (tmp_path / "elsewhere.txt").write_text("secret")
    (base / "vocab.txt").symlink_to(tmp_path / "elsewhere.txt")
    if name == "merge":
        model = builders.model_class_for(base).from_pretrained(base)
        adapter = tmp_path / "adapter"
        peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
        rest = [str(adapter) if a == "ADAPTER" else a for a in rest]
    out = tmp_path / "out"
    code, stdout, stderr = builders.run_cli(capsys, name, base, out, *rest)
    assert code == 2 and len(stderr.splitlines()) == 1, stderr
    assert "vocab.txt" in stderr and "outside the model folder" in stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))
