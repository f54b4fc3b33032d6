"""The CLI's options agree with the config schema and with the README.

One table maps options to config fields (config.OVERRIDE_PATHS, plus the few that
cli.options.config_overrides translates); every option of every command either sets a real field
of RunConfig or is declared CLI-only here. The README's command synopsis lists exactly the options
each command has, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

from qfinal.cli.app import app
from qfinal.config import OVERRIDE_PATHS, RunConfig

README = Path(__file__).resolve().parents[1] / "README.md"
# Options that are about this run's inputs and outputs, not about how the model is finalized.
CLI_ONLY = {
    "config",
    "json",
    "quiet",
    "allow_pickle",
    "force",
    "max_shard_size",
    "junit",
    "fast",
    "quality",
    "dry_run",
    "html",
    "verify",
    "top",
    "outputs",
    "raw",
    "config_a",
    "config_b",
    "max_abs",
    "rel_error",
    "logits_max_abs",
    "min_top1",
    "max_kl",
    "allow_dtype_change",
}
# Options config_overrides translates before they reach the schema: option -> the field it sets.
TRANSLATED = {
    "adapter": ("adapters",),
    "merge": ("adapters",),
    "max_memory": ("max_memory",),
    "dequantize": ("dequantize",),
}
CONFIG_COMMANDS = ("load", "save", "plan", "validate")


def commands() -> dict:
    return typer.main.get_command(app).commands


def field_exists(path: tuple[str, ...]) -> bool:
    model = RunConfig
    for part in path:
        fields = {name: f for name, f in model.model_fields.items()}
        fields.update({f.alias: f for f in model.model_fields.values() if f.alias})
        if part not in fields:
            return False
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) else None
        if model is None or not hasattr(model, "model_fields"):
            return part == path[-1]
    return True


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_every_option_sets_a_config_field_or_is_cli_only(command):
    unmapped = {}
    for param in commands()[command].params:
        if param.param_type_name != "option" or param.name in CLI_ONLY:
            continue
        path = TRANSLATED.get(param.name) or OVERRIDE_PATHS.get(param.name) or (param.name,)
        if not field_exists(path):
            unmapped[param.name] = ".".join(path)
    assert unmapped == {}


def test_every_override_path_is_a_config_field():
    assert {name: path for name, path in OVERRIDE_PATHS.items() if not field_exists(path)} == {}


def test_the_field_check_can_fail():
    assert field_exists(("quantize", "method")) and field_exists(("validate", "fail_on"))
    assert not field_exists(("quantize", "methd")) and not field_exists(("no_such_field",))


def readme_synopsis() -> dict[str, set[str]]:
    """`qfinal CMD ...` lines of the README's Commands block -> the options they list."""
    text = README.read_text(encoding="utf-8")
    block = text.split("## Commands", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    out: dict[str, set[str]] = {}
    current = None
    for line in block.splitlines():
        start = re.match(r"qfinal (\w+) ", line)
        if start:
            current = start.group(1)
            out[current] = set()
        elif not line.startswith(" "):
            current = None
        if current:
            out[current] |= set(re.findall(r"(--[a-z0-9-]+|-[a-z])\b", line.split("#", 1)[0]))
    return out


COMMANDS = ["load", "validate", "dequantize", "quantize", "merge", "save", "diff", "plan"]


def test_every_command_is_in_the_readme_synopsis_and_in_these_tests():
    assert sorted(commands()) == sorted(COMMANDS) == sorted(readme_synopsis())


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_synopsis_lists_exactly_the_command_options(command):
    documented = readme_synopsis()[command]
    actual = {
        opt for p in commands()[command].params if p.param_type_name == "option" for opt in (*p.opts, *p.secondary_opts)
    }
    assert documented - actual == set(), "documented but not an option"
    assert actual - documented == set(), "an option the README does not list"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_one_line_help(command):
    missing = [
        p.name for p in commands()[command].params if p.param_type_name == "option" and not (p.help or "").strip()
    ]
    assert missing == []


@pytest.mark.parametrize(
    "words, cword, expected",
    [
        ("qfinal lo", 1, ["load"]),
        ("qfinal validate --j", 2, ["--json", "--junit"]),
        ("qfinal dequantize x y --ver", 4, ["--verify"]),
    ],
)
def test_shell_completion_completes_commands_and_options(words, cword, expected):
    """`qfinal --install-completion` installs the hook; this is what the hook asks qfinal."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "_QFINAL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    proc = subprocess.run([sys.executable, "-m", "qfinal"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected
