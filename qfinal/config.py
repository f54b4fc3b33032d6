"""The YAML schema. Everything is validated before any weight is read.

Frozen pydantic models with `extra="forbid"`: a typo in a YAML file is an error, not a silently
ignored key. Trust flags (`--allow-pickle`) are deliberately not part of the schema, so a config
file found next to a checkpoint cannot switch them on.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qfinal.errors import ConfigError

QuantMethod = Literal["none", "nf4", "fp4", "int8"]
DType = Literal["auto", "float16", "bfloat16", "float32"]
Task = Literal[
    "causal-lm",
    "masked-lm",
    "seq2seq-lm",
    "sequence-classification",
    "token-classification",
    "question-answering",
    "base",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantizeConfig(_Strict):
    """bitsandbytes options, passed to transformers' BitsAndBytesConfig unchanged in meaning."""

    method: QuantMethod = "none"
    double_quant: bool = Field(False, description="nested quantization of the 4-bit absmax")
    compute_dtype: Literal["float16", "bfloat16", "float32"] | None = None
    quant_storage: Literal["uint8", "float16", "bfloat16", "float32"] = "uint8"
    skip_modules: list[str] | None = Field(None, description="llm_int8_skip_modules; default: the output head")
    int8_threshold: float = 6.0

    @model_validator(mode="after")
    def _four_bit_only(self):
        if self.method in ("none", "int8") and self.double_quant:
            raise ValueError("double_quant applies to nf4/fp4 only")
        return self


class AdapterConfig(_Strict):
    path: str
    name: str | None = None
    merge: bool = False
    scale: float = 1.0


class CompileConfig(_Strict):
    enabled: bool = False
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    warmup: bool = Field(True, description="run one forward on the probe batch so compile time is paid here")


class RuntimeConfig(_Strict):
    """What makes a loaded model ready to use, applied after adapters and before validation."""

    mode: Literal["inference", "training"] = "inference"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = None
    compile: CompileConfig = CompileConfig()
    gradient_checkpointing: bool = False


class ValidateConfig(_Strict):
    enabled: bool = True
    fail_on: Literal["error", "warning"] = "error"
    allow_missing: list[str] = []
    allow_unexpected: list[str] = []
    check_nan: bool = True


class ReportConfig(_Strict):
    quality: bool = Field(
        False,
        description="after quantizing, the per-layer relative error of each "
        "quantized weight against the checkpoint's original (load --quality)",
    )


class RunConfig(_Strict):
    """One finalization: what to load and how. CLI flags override these values."""

    model_class: str | None = Field(None, description="transformers class name; default: architectures[0]")
    task: Task | None = Field(None, description="picks the Auto class when config.json has no architectures")
    dtype: DType = "auto"
    quantize: QuantizeConfig = QuantizeConfig()
    dequantize: bool = False
    device_map: Literal["cpu", "auto"] = "cpu"
    max_memory: dict[str, str | int] | None = None
    offload_folder: str | None = None
    tie_weights: bool = True
    adapters: list[AdapterConfig] = []
    load_adapters: bool = Field(
        True, description="false leaves the configured adapters off (reported as skipped by request)"
    )
    merge_requantize: bool = False
    runtime: RuntimeConfig = RuntimeConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    trust_remote_code: bool = False
    revision: str | None = Field(
        None, description="hub id only: branch, tag or commit hash (a commit hash means exactly that commit)"
    )
    offline: bool = Field(False, description="hub id only: use the local cache, never download (as HF_HUB_OFFLINE=1)")
    stop_after: str | None = None
    report: ReportConfig = ReportConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("max_memory")
    @classmethod
    def _memory_keys(cls, value):
        if value is None:
            return value
        for key in value:
            if not (key in ("cpu", "disk") or str(key).isdigit() or str(key).startswith("cuda")):
                raise ValueError(f"unknown device {key!r}: use cpu, disk, or a GPU index")
        return value

    @model_validator(mode="after")
    def _cross_field(self):
        if self.dequantize and self.quantize.method != "none":
            raise ValueError("dequantize and quantize.method are exclusive: dequantize reads a bnb checkpoint")
        if self.offload_folder and self.device_map != "auto":
            raise ValueError("offload_folder needs device_map: auto")
        return self


# CLI option names -> config paths, so `qfinal.load(path, quantize="nf4")` means the same as `--quantize nf4`.
OVERRIDE_PATHS = {
    "quantize": ("quantize", "method"),
    "double_quant": ("quantize", "double_quant"),
    "compute_dtype": ("quantize", "compute_dtype"),
    "skip_modules": ("quantize", "skip_modules"),
    "quant_storage": ("quantize", "quant_storage"),
    "int8_threshold": ("quantize", "int8_threshold"),
    "fail_on": ("validate", "fail_on"),
}


def format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def _set_path(data: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        if not isinstance(data.get(part), dict):  # absent, or null in the YAML: the override wins
            data[part] = {}
        data = data[part]
    data[path[-1]] = value


def build_config(file: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Read YAML (if any), apply overrides named like CLI options, and validate everything."""
    data = read_yaml(file) if file is not None else {}
    return config_from_dict(data, str(file) if file else "options", **overrides)


def config_from_dict(data: dict, where: str = "options", **overrides: Any) -> RunConfig:
    """Validate `data` (a config as YAML would give it) with `overrides` applied at their field
    paths: `quantize="nf4"` sets `quantize.method` and keeps the other `quantize` fields."""
    data = copy.deepcopy(data)
    merge_all = overrides.pop("merge_all_adapters", False)
    for name, value in overrides.items():
        if value is None:
            continue
        path = OVERRIDE_PATHS.get(name, (name,))
        _set_path(data, path, value)
    if isinstance(data.get("adapters"), list):
        data["adapters"] = [{"path": a} if isinstance(a, str) else a for a in data["adapters"]]
        if merge_all:
            data["adapters"] = [{**a, "merge": True} if isinstance(a, dict) else a for a in data["adapters"]]
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(err), where=where, hint="see the config reference in README.md") from None


def resolve_config(config: RunConfig | str | Path | None, overrides: dict) -> RunConfig:
    """A RunConfig, a YAML path or nothing, with keyword overrides named like the CLI options."""
    if isinstance(config, RunConfig):
        if overrides:
            return config_from_dict(config.model_dump(by_alias=True, exclude_unset=True), **overrides)
        return config
    return build_config(config, **overrides)


def read_yaml(file: str | Path) -> dict:
    import yaml  # here, not at the top: a load without a config file never needs it (~12 ms)

    path = Path(file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", where=str(path), hint="check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file ({err.__class__.__name__})", where=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        loc = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"YAML syntax error: {problem}", where=loc, hint="fix the YAML syntax") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError("YAML is nested too deeply", where=str(path), hint="fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}", where=str(path))
    return near_the_file(data, path.parent)


def near_the_file(data: dict, folder: Path) -> dict:
    """Adapter paths in a YAML file are relative to that file's folder, not to the working directory,
    so a config works from wherever it is run; absolute paths (and `~`) stay as they are."""
    adapters = data.get("adapters")
    if not isinstance(adapters, list):
        return data

    def place(path):
        if not isinstance(path, str) or not path.strip():
            return path  # the schema reports it
        given = Path(path).expanduser()
        return str(given if given.is_absolute() else folder / given)

    data["adapters"] = [
        place(a)
        if isinstance(a, str)
        else {**a, "path": place(a.get("path"))}
        if isinstance(a, dict) and "path" in a
        else a
        for a in adapters
    ]
    return data
