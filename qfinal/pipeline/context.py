"""What stages share: the typed context they fill in, their outcome, and the Stage protocol.

Stages talk to each other only through these fields, filled in as the pipeline goes; a field is
None until the stage that owns it has run. Upstream types are imported for type checkers only, so
building a Context imports neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from qfinal.checkpoint.sources import Source, read_config_json
from qfinal.config import RunConfig
from qfinal.report import Report
from qfinal.sizes import peak_rss_bytes  # noqa: F401  (the stages' and ops' name for it)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.quantizers import HfQuantizer

    from qfinal.checkpoint.inventory import CheckpointInventory
    from qfinal.checkpoint.prescan import Prescan
    from qfinal.formats.base import QuantFormat

StageStatus = Literal["ran", "nothing to do", "skipped by request", "not reached", "failed"]


@dataclass
class Outcome:
    status: StageStatus = "ran"
    detail: str = ""


@dataclass
class Context:
    """What stages hand to each other."""

    source: Source
    config: RunConfig
    report: Report
    allow_pickle: bool = False
    # Set by the caller: `qfinal validate` runs the validate stage even when the config disables it,
    # and reports checkpoint defects as findings instead of refusing to load.
    validate_command: bool = False
    tolerate_checkpoint_problems: bool = False
    # Called with (done, total, what) for the work inside a long stage (bytes of tensors read while
    # quantizing on load), so a terminal can show it; None in CI and in the library by default.
    on_progress: Callable[[int, int, str], None] | None = None
    # meta_init
    hf_config: PretrainedConfig | None = None
    model_class: type[PreTrainedModel] | None = None
    inventory: CheckpointInventory | None = None
    dtype: torch.dtype | None = None
    hf_quantizer: HfQuantizer | None = None
    device_map: dict[str, str | int] | None = None
    attn_fallback: str | None = None  # why transformers did not give the requested attention implementation
    original_classes: dict[str, str] = field(default_factory=dict)  # module name -> class before the swap
    # A format qfinal dequantizes while loading (transformers cannot load it faithfully here), and why.
    dequantizing_format: QuantFormat | None = None
    dequantizing_reason: str | None = None
    # checkpoint_dispatch
    load_config: object | None = None  # transformers' LoadStateDictConfig (compat.transformers)
    model: torch.nn.Module | None = None  # the transformers model, or a PeftModel once adapters are on
    loading_info: object | None = None  # transformers' LoadStateDictInfo: missing / unexpected / mismatched keys
    disk_offload_index: dict[str, dict] | None = None
    # postprocess / adapter_load
    dequantized: bool = False  # the bnb modules were turned back into plain ones
    prescan: Prescan | None = None  # the NaN scan of the files, running while torch imports
    parsed_config_json: dict | None = field(default=None, repr=False)  # see config_json()

    def config_json(self) -> dict:
        """The source's config.json, parsed once per run however many stages and checks read it."""
        if self.parsed_config_json is None:
            self.parsed_config_json = read_config_json(self.source.folder)
        return self.parsed_config_json


class Stage(Protocol):
    name: str

    def check(self, config: RunConfig) -> None: ...

    def run(self, ctx: Context) -> Outcome: ...
