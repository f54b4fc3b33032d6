from __future__ import annotations

import json
from pathlib import Path

from qfinal.checkpoint.atomic import write_text_atomic
from qfinal.report import Report


def to_json(report: Report) -> str:
    return json.dumps(report.to_json_dict(), indent=2, sort_keys=False) + "\n"


def write_json(report: Report, path: Path) -> None:
    write_text_atomic(Path(path), to_json(report))
