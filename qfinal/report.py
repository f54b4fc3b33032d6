"""The one report model. Renderers (rich, JSON, JUnit) read it; stages and checks fill it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

Severity = Literal["error", "warning", "info"]
SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}


class Finding(BaseModel):
    """One observation of a named check. `check` names are stable: CI filters on them."""

    check: str
    severity: Severity
    key: str | None = None
    message: str


class StageRecord(BaseModel):
    name: str
    status: Literal["ran", "nothing to do", "skipped by request", "not reached", "failed"] = "ran"
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    detail: str = ""


class TiedKey(BaseModel):
    target: str
    source: str
    shared: bool


class MismatchedKey(BaseModel):
    key: str
    checkpoint_shape: list[int]
    model_shape: list[int]


class ConvertedModule(BaseModel):
    module: str
    from_: str = Field(alias="from")
    to: str

    model_config = {"populate_by_name": True}


class SkippedModule(BaseModel):
    module: str
    reason: str


class Keys(BaseModel):
    tied: list[TiedKey] = []
    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[MismatchedKey] = []
    converted: list[ConvertedModule] = []
    skipped: list[SkippedModule] = []


class AdapterRecord(BaseModel):
    name: str
    path: str
    peft_type: str | None = None  # peft's type: LORA, ADALORA, IA3, LOHA, LOKR, PROMPT_TUNING, ...
    variants: list[str] = []  # of a LORA adapter: DoRA, rsLoRA
    wrapped_modules: list[str] = []  # base modules the adapter wraps (or merged into)
    virtual_tokens: int = 0  # prompt learning: virtual tokens before the input; adaption prompt: its length
    matched: int
    unused: list[str] = []
    unmatched_targets: list[str] = []
    merged: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    modules_to_save: list[str] = []


class ReportExtra(TypedDict, total=False):
    """What a command adds beyond the common fields, each key declared here: a key not declared is
    dropped from the JSON (tests/test_report.py checks that every key qfinal writes is declared)."""

    parameters: dict[str, int]  # runtime: {"trainable": n, "total": n}
    attn_implementation: str | None  # runtime: what the attention modules dispatch to
    compile_seconds: float  # runtime, with runtime.compile
    skipped_checks: dict[str, str]  # validate: check -> why it did not run
    fail_on: str  # validate: the level that fails
    full_mode: str  # validate: why the full checks could not run (header-only instead)
    ignored_by_validate: list[str]  # validate: config settings the gate overrides (stop_after, enabled: false)
    save: dict[str, Any]  # save: out, writer, copied side files, files
    dequantize: dict[str, Any]  # dequantize: out, files, total_bytes
    merge: dict[str, Any]  # merge: out, adapters, files, total_bytes, peak estimate, logits vs unmerged
    quantize: dict[str, Any]  # quantize: out, files, total_bytes, peak_rss_estimate_bytes, dry_run
    diff: dict[str, Any]  # diff: sides, tolerances, probe, the per-tensor table, html
    plan: dict[str, Any]  # plan: bytes per device, large unquantized leaves, placement by module
    quality: list[dict[str, Any]]  # load --quality: one row per quantized module
    hub: dict[str, Any]  # a hub id: repo_id, commit, downloaded files and bytes, headers_only


class Report(BaseModel):
    source: str
    command: str = "load"
    model_class: str | None = None
    quantization: str = "none"
    dtype: str | None = None
    trust_remote_code: bool = False
    commit: str | None = None  # a hub id's resolved commit hash
    stages: list[StageRecord] = []
    keys: Keys = Keys()
    adapters: list[AdapterRecord] = []
    placement: dict[str, str] = {}
    checks: list[str] = []
    findings: list[Finding] = []
    extra: ReportExtra = {}

    def failing(self, fail_on: Severity = "error") -> list[Finding]:
        level = SEVERITY_RANK[fail_on]
        return [f for f in self.findings if SEVERITY_RANK[f.severity] >= level]

    @property
    def ok(self) -> bool:
        return not self.failing("error")

    def check_status(self, check: str, fail_on: Severity = "error") -> list[Finding]:
        """The findings of one check at or above the fail level (empty: the check passed)."""
        return [f for f in self.failing(fail_on) if f.check == check]

    def to_json_dict(self) -> dict:
        data = self.model_dump(mode="json", by_alias=True)
        data["ok"] = self.ok
        return data
