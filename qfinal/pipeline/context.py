"""What stages share: the typed context they fill in, their outcome, and the Stage protocol."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

from qfinal.config import RunConfig
from qfinal.report import Report
from qfinal.checkpoint.sources import Source

def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Outcome:
    status: str = "ran"
    detail: str = ""


@dataclass
class Context:
    """What stages hand to each other. Filled in as the pipeline goes."""

    source: Source
    config: RunConfig
    report: Report
    allow_pickle: bool = False
    hf_config: Any = None
    model_class: Any = None
    inventory: Any = None
    dtype: Any = None
    hf_quantizer: Any = None
    device_map: Any = None
    load_config: Any = None
    model: Any = None
    loading_info: Any = None
    disk_offload_index: Any = None
    original_classes: dict[str, str] = field(default_factory=dict)
    dequantized: bool = False  # postprocess (or a merge) turned the bnb modules back into plain ones
    prescan: Any = None  # prescan.Prescan: the NaN scan of the files, running while torch imports
    scratch: dict[str, Any] = field(default_factory=dict)


class Stage(Protocol):
    name: str

    def check(self, config: RunConfig) -> None: ...

    def run(self, ctx: Context) -> Outcome: ...
