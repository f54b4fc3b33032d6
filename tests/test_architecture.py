"""The layering holds: every module imports on its own, private names stay where they belong, and
the import-linter contracts and ruff can fail.

The layers themselves are stated once, in pyproject.toml's `[tool.importlinter]`; `make test` runs
`lint-imports` and ruff before pytest. These tests check what those tools cannot: that each module
imports in a fresh interpreter, that no module outside `qfinal/compat/` touches a private name of
transformers, bitsandbytes, peft or accelerate, and that no module imports another's `_private` name.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qfinal"
UPSTREAM = ("transformers", "bitsandbytes", "peft", "accelerate", "safetensors", "huggingface_hub")
# Private names of the standard library (and typer's vendored click) that qfinal relies on, each documented.
STDLIB_PRIVATE = {"_exit", "_run_exitfuncs", "_click", "_getframe", "_thread", "_asdict", "_replace", "_fields"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> list[str]:
    return sorted(module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def try_import(name: str) -> tuple[str, str | None]:
        proc = subprocess.run(
            [sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
        )
        return name, (proc.stderr.strip().splitlines() or ["?"])[-1] if proc.returncode else None

    modules = package_modules()
    assert len(modules) > 40, modules
    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = {name: err for name, err in pool.map(try_import, modules) if err}
    assert failed == {}


def _own_private_names() -> set[str]:
    """Every `_name` qfinal defines itself: functions, classes, module globals, attributes it sets."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(parse(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "setattr"
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
            ):
                names.add(str(node.args[1].value))
    return {n for n in names if n.startswith("_")}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_upstream_uses(path: Path, own: set[str]) -> list[str]:
    """`from transformers.x import _y`, `bitsandbytes.functional._z`, and `obj._attr` for an attribute
    qfinal does not define itself (a model's `_keep_in_fp32_modules`, a config's `_attn_implementation`)."""
    found = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UPSTREAM:
            found += [
                f"{path.name}:{node.lineno} from {node.module} import {a.name}"
                for a in node.names
                if _is_private(a.name) or any(map(_is_private, node.module.split(".")))
            ]
        elif isinstance(node, ast.Import):
            found += [
                f"{path.name}:{node.lineno} import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in UPSTREAM and any(map(_is_private, a.name.split(".")))
            ]
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if node.attr in own or node.attr in STDLIB_PRIVATE or node.attr.startswith("_qfinal"):
                continue
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _is_private(node.args[1].value)
            and node.args[1].value not in own
            and node.args[1].value not in STDLIB_PRIVATE
            and not node.args[1].value.startswith("_qfinal")
        ):
            found.append(f"{path.name}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_no_private_upstream_name_outside_compat():
    own = _own_private_names() - _upstream_private_attributes()
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "compat":
            continue
        uses = private_upstream_uses(path, own)
        if uses:
            offenders[module_name(path)] = uses
    assert offenders == {}


def _upstream_private_attributes() -> set[str]:
    """Private attributes qfinal sets on upstream objects only through compat/ (so setting one there
    does not make reading it elsewhere look like qfinal's own)."""
    names: set[str] = set()
    for path in (PACKAGE / "compat").rglob("*.py"):
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Attribute) and _is_private(node.attr) and not node.attr.startswith("_qfinal"):
                names.add(node.attr)
    own_elsewhere: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "compat":
            continue
        for node in ast.walk(parse(path)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                own_elsewhere.add(node.name)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                own_elsewhere.add(node.attr)
    return names - own_elsewhere


@pytest.mark.parametrize("folder", ["qfinal", "tests", "bench"])
def test_no_private_qfinal_name_is_imported_from_another_module(folder):
    offenders = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qfinal":
                offenders += [
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}"
                    for a in node.names
                    if _is_private(a.name)
                ]
    assert offenders == []


def test_the_private_name_check_catches_a_planted_use(tmp_path):
    """The checks above can fail: each flags a planted offence."""
    own = _own_private_names()
    planted = tmp_path / "planted.py"
    planted.write_text(
        "from transformers.modeling_utils import _get_dtype\n"
        "import bitsandbytes.functional as F\n"
        "def f(model):\n"
        "    F._convert_weight_packed_for_cpu_inverse\n"
        "    return model._keep_in_fp32_modules, getattr(model.config, '_attn_implementation_x')\n"
    )
    uses = private_upstream_uses(planted, own)
    assert len(uses) == 4, uses


LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter is not installed (pip install -e '.[test]')")
@pytest.mark.parametrize(
    "module, bad_import",
    [
        ("checkpoint/atomic.py", "import qfinal.cli.app"),  # a low layer reaching up to the CLI
        ("compare/tensors.py", "import qfinal.adapters"),  # one sibling importing another
        ("ops/load.py", "import qfinal.render.json_report"),  # a library entry point rendering
    ],
)
def test_import_linter_fails_on_an_upward_import(tmp_path, module, bad_import):
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "qfinal", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    env = {**os.environ, "PYTHONPATH": str(copy)}
    clean = subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stdout[-3000:]
    target = copy / "qfinal" / module
    target.write_text(target.read_text() + f"\n{bad_import}  # planted\n")
    broken = subprocess.run(
        [LINT_IMPORTS, "--no-cache"], cwd=copy, env=env, capture_output=True, text=True, timeout=300
    )
    assert broken.returncode != 0, broken.stdout[-3000:]
    assert "BROKEN" in broken.stdout
