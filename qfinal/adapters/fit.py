"""Does the adapter fit this base? Its task type against the model class, its training base against
this one (compared config to config when the training base is a local folder, else by name)."""

from __future__ import annotations

import json
from pathlib import Path

from qfinal.adapters.prepare import Prepared
from qfinal.report import Finding

BASE = "adapter_base"
# config fields whose difference means the adapter was trained on another architecture or size
_COMPARED = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers")


def base_findings(model, prep: Prepared) -> list[Finding]:
    """Warnings when the adapter was trained for another task or on another base."""
    from qfinal.compat.transformers import class_fits_peft_task

    out: list[Finding] = []
    hf_config = getattr(model, "config", None)
    cls_name = type(model).__name__
    task = prep.config.get("task_type")
    if task and not class_fits_peft_task(task, cls_name):
        out.append(
            Finding(
                check=BASE,
                severity="warning",
                key=prep.name,
                message=f"adapter '{prep.name}' was trained for task {task}; the base is a {cls_name}",
            )
        )
    adapter_base = prep.config.get("base_model_name_or_path")
    if not adapter_base or hf_config is None:
        return out
    base_name = getattr(hf_config, "name_or_path", None) or getattr(model, "name_or_path", None) or ""
    trained_on = _local_config(adapter_base)
    if trained_on is not None:
        diffs = []
        for field in _COMPARED:
            theirs, ours = trained_on.get(field), getattr(hf_config, field, None)
            if theirs is not None and ours is not None and theirs != ours:
                diffs.append(f"{field} {theirs} vs {ours}")
        if diffs:
            out.append(
                Finding(
                    check=BASE,
                    severity="warning",
                    key=prep.name,
                    message=f"adapter '{prep.name}' was trained on {adapter_base}, which differs "
                    f"from this base: {'; '.join(diffs)}",
                )
            )
        return out
    if base_name and not _same_name(adapter_base, base_name):
        out.append(
            Finding(
                check=BASE,
                severity="warning",
                key=prep.name,
                message=f"adapter '{prep.name}' was trained on {adapter_base}; the base is "
                f"{base_name} (could not compare their configs)",
            )
        )
    return out


def _local_config(name_or_path: str) -> dict | None:
    path = Path(name_or_path).expanduser() / "config.json"
    try:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
    return None


def _same_name(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    try:
        if pa.exists() and pb.exists() and pa.resolve() == pb.resolve():
            return True
    except OSError:
        pass
    return a.rstrip("/").rsplit("/", 1)[-1].lower() == b.rstrip("/").rsplit("/", 1)[-1].lower()
