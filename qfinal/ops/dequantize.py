"""`qfinal dequantize`: turn a bitsandbytes (nf4 / fp4 / int8) checkpoint back into a plain one.

transformers can dequantize a loaded model (`model.dequantize(dtype)`), but the result cannot be
saved (NotImplementedError), only the quantized layers get the requested dtype, and Conv1D models
(GPT-2) come out in nn.Linear layout so the saved folder would not load. This module works on the
files instead, streaming:

* every input tensor is read on its own with `safe_open(..., backend="pread")`: its bytes are
  read into a buffer that goes with the tensor, nothing stays mapped (at most two input files open);
* each quantized weight is rebuilt with bitsandbytes' own functions, along the exact path
  transformers' `dequantize_and_replace` takes: 4-bit -> `QuantState.from_dict` +
  `dequantize_4bit` (result in the quant state's own dtype, the dtype of the model that was
  quantized), int8 -> `int8_vectorwise_dequant(weight, SCB)` (result in float32); then one
  `.to(dtype)` cast. The result equals `model.dequantize(dtype)`'s weight bit for bit; Conv1D
  weights are then transposed back to the checkpoint's [in, out] layout;
* every other floating tensor is the source tensor cast to `dtype`; other tensors pass unchanged;
* output shards are planned up front from the headers (transformers' greedy split,
  `shards.plan_shards`); each shard's safetensors header is written first, then each tensor's
  bytes as soon as it is computed (`shards.write_safetensors_streaming`), so peak memory depends
  on neither the model nor the shard size: one output tensor plus the source tensors it is made
  of (and their intermediate casts). The files are byte-identical to `save_file`'s.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qfinal.checkpoint import writer as _shards
from qfinal.checkpoint.atomic import atomic_dir, check_output_dir
from qfinal.errors import CheckpointError, ConfigError, OutputError, SourceError
from qfinal.report import Finding
from qfinal.checkpoint.sources import read_config_json, resolve_source

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

_QS_SUFFIXES = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
_4BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
# Files that are weights (or indexes of weights) and must not be copied to OUT.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json",
                   "tf_model.h5.index.json", "flax_model.msgpack.index.json")


@dataclass
class DequantizeResult:
    out: Path
    dtype: str                       # "float16" | "bfloat16" | "float32"
    quant_method: str                # "nf4" | "fp4" | "int8"
    double_quant: bool
    dequantized: list[str] = field(default_factory=list)   # weights rebuilt from bnb data
    cast: list[str] = field(default_factory=list)          # other tensors (cast if floating)
    files: list[str] = field(default_factory=list)         # every file written to OUT
    total_bytes: int = 0             # tensor bytes over all shards (the index's total_size)


# --------------------------------------------------------------------------- small helpers

def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in DTYPES:
            return DTYPES[name]
    raise ConfigError(f"unsupported dtype {dtype!r}", hint="use float16, bfloat16 or float32")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_size(size: int | str) -> int:
    from qfinal.sizes import parse_size as parse

    return parse(size)


def bnb_quantization(config: dict, where: str) -> tuple[str, bool]:
    """(quant_method, double_quant) from config.json; CheckpointError if not a bnb checkpoint."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes":
        found = qc.get("quant_method") if isinstance(qc, dict) else None
        what = ("checkpoint is not bitsandbytes-quantized"
                + (f" (quantization_config.quant_method is {found!r})" if found else
                   " (config.json has no quantization_config)"))
        raise CheckpointError(what, where=where,
                              hint="dequantize only reads bnb nf4/fp4/int8 checkpoints")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        return "int8", False
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        qtype = qc.get("bnb_4bit_quant_type", "fp4")
        if qtype not in ("nf4", "fp4"):
            raise CheckpointError(f"unknown bnb_4bit_quant_type {qtype!r}", where=where)
        return qtype, bool(qc.get("bnb_4bit_use_double_quant", False))
    raise CheckpointError("bitsandbytes quantization_config sets neither load_in_4bit nor load_in_8bit",
                          where=where)


# --------------------------------------------------------------------------- reading the source

class _Source:
    """Key -> file map and headers of a safetensors checkpoint, plus a small LRU of open files."""

    def __init__(self, folder: Path, confine_to: Path):
        self.folder = folder
        self.confine_to = confine_to
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            self.index_file = index
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"unreadable safetensors index ({err})", where=str(index)) from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            self.index_file = None
            files = ["model.safetensors"]
        else:
            raise CheckpointError("no safetensors weights (model.safetensors or its index)",
                                  where=str(folder),
                                  hint="dequantize reads safetensors checkpoints written by save_pretrained")
        self.files = [self._confined(name) for name in files]
        self.key_file: dict[str, Path] = {}
        self.headers: dict[str, tuple[str, list[int]]] = {}
        from safetensors import safe_open

        for path in self.files:
            try:
                with safe_open(path, "pt", backend="pread") as fh:
                    for key in fh.keys():
                        if key in self.key_file:
                            raise CheckpointError(f"tensor {key!r} is stored in two files", where=str(path))
                        sl = fh.get_slice(key)
                        self.key_file[key] = path
                        self.headers[key] = (sl.get_dtype(), list(sl.get_shape()))
            except CheckpointError:
                raise
            except Exception as err:  # safetensors raises SafetensorError / OSError
                raise CheckpointError(f"cannot read safetensors file ({err})", where=str(path)) from None
        self._open: OrderedDict[Path, object] = OrderedDict()

    def _confined(self, name: str) -> Path:
        path = (self.folder / name)
        if not path.is_file():
            raise CheckpointError("weight file named in the index is missing", where=str(path))
        resolved = path.resolve()
        if not resolved.is_relative_to(self.confine_to):
            raise CheckpointError("weight file resolves outside the model folder", where=str(path),
                                  hint="refusing to read files outside the checkpoint")
        return path

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.key_file[key]
        handle = self._open.get(path)
        if handle is None:
            while len(self._open) >= 2:  # bound open files: close the least recently used one
                _p, old = self._open.popitem(last=False)
                old.__exit__(None, None, None)
            # pread, not mmap: each tensor owns the bytes read for it, and no touched input page
            # stays mapped (and counted in RSS) while its file is open.
            handle = safe_open(path, "pt", backend="pread").__enter__()
            self._open[path] = handle
        else:
            self._open.move_to_end(path)
        return handle.get_tensor(key)

    def close(self) -> None:
        while self._open:
            _p, handle = self._open.popitem()
            handle.__exit__(None, None, None)


# --------------------------------------------------------------------------- model layout

_TWO_DOT_IMPORT = re.compile(r"^\s*from\s+\.\.(?!\.)", re.MULTILINE)  # another model's package


def _plainly_without_conv1d(config: dict) -> bool:
    """True when the architecture provably has no Conv1D module, read from transformers' source
    files without importing transformers (importing it and building the skeleton cost about
    1.4 s of a 1.1B dequantize, for an answer that is nearly always "none").

    Provable means: one architecture, no remote code, no sub-model config, and that class is
    defined in its model's own modeling file(s), which never name Conv1D and import nothing from
    another model's package (`from ..x`). Anything else builds the skeleton (`_conv1d_layout`).
    In transformers 5.23 six modeling files name Conv1D: GPT-2, OpenAI GPT, ImageGPT, Decision
    Transformer, CLVP, ConvBERT.
    """
    import importlib.util

    archs, model_type = config.get("architectures"), config.get("model_type")
    if "auto_map" in config or not isinstance(model_type, str) or not model_type:
        return False
    if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str) and archs[0].isidentifier()):
        return False
    for key, value in config.items():
        if key == "quantization_config":
            continue
        if isinstance(value, dict) and ("model_type" in value or key.endswith("_config")
                                        or key in ("encoder", "decoder")):
            return False
    spec = importlib.util.find_spec("transformers")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return False
    package = Path(list(spec.submodule_search_locations)[0]) / "models" / model_type.replace("-", "_")
    sources = sorted(package.glob("modeling_*.py")) if package.is_dir() else []
    if not sources:
        return False
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in sources]
    if any("Conv1D" in text or _TWO_DOT_IMPORT.search(text) for text in texts):
        return False
    defined = re.compile(rf"^class\s+{re.escape(archs[0])}\s*[(:]", re.MULTILINE)
    return any(defined.search(text) for text in texts)


def _conv1d_layout(folder: Path, where: str, config: dict | None = None):
    """(conv1d owner names, expected shapes, base_model_prefix) from the model skeleton built on
    the meta device; with `config` (config.json's dict) and an architecture that provably has no
    Conv1D, (empty, empty, "") without transformers: no layout to change, and no shapes to check
    the quant states against (plain from_pretrained, or --verify, still checks them)."""
    if config is not None and _plainly_without_conv1d(config):
        return set(), {}, ""
    import transformers
    from transformers.pytorch_utils import Conv1D

    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"config.json cannot be parsed by transformers ({first})",
                              where=str(folder / "config.json")) from None
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise CheckpointError(f"model class {archs[0] if archs else None!r} is not in transformers",
                              where=where,
                              hint="config.json 'architectures' must name a transformers model class; "
                                   "it decides each weight's layout (Linear or Conv1D)")
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as err:
        raise CheckpointError(f"cannot build {cls.__name__} from config.json ({err})", where=where) from None
    conv1d = {name for name, mod in model.named_modules() if isinstance(mod, Conv1D)}
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    return conv1d, shapes, prefix


def _lookup(name: str, table, prefix: str):
    """Find `name` in the skeleton's names, allowing for a missing/extra base_model_prefix."""
    if name in table:
        return name
    if prefix:
        if name.startswith(prefix + ".") and name[len(prefix) + 1:] in table:
            return name[len(prefix) + 1:]
        if f"{prefix}.{name}" in table:
            return f"{prefix}.{name}"
    return None


# --------------------------------------------------------------------------- planning

@dataclass
class _Item:
    name: str                     # output tensor name
    kind: str                     # "4bit" | "int8" | "copy"
    parts: dict[str, str]         # role -> source key
    shape: list[int]              # output shape (checkpoint layout)
    dtype: torch.dtype            # output dtype
    transpose: bool = False       # Conv1D: dequantized [out, in] -> stored [in, out]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _plan(src: _Source, dtype: torch.dtype, method: str, conv1d, shapes, prefix: str,
          where: str) -> list[_Item]:
    from bitsandbytes.utils import unpack_tensor_to_dict

    keys = set(src.headers)
    consumed: set[str] = set()
    items: dict[str, _Item] = {}

    # 4-bit weights: one packed-state blob per weight names all its parts.
    for key in sorted(keys):
        suffix = next((s for s in _QS_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        base = key[: -len(suffix)]
        if base not in keys:
            raise CheckpointError(f"4-bit quant state {key!r} has no packed weight {base!r}", where=where)
        parts = {"weight": base, suffix[1:]: key}
        for part in _4BIT_PARTS:
            if f"{base}.{part}" in keys:
                parts[part] = f"{base}.{part}"
        for needed in ("absmax", "quant_map"):
            if needed not in parts:
                raise CheckpointError(f"4-bit weight {base!r} lacks {needed!r}", where=where)
        try:
            blob = unpack_tensor_to_dict(src.get(key))
            shape = list(blob["shape"])
        except Exception as err:
            raise CheckpointError(f"unreadable 4-bit quant state ({err})", where=f"{where}: {key}") from None
        if blob.get("quant_type") not in ("nf4", "fp4"):
            raise CheckpointError(f"unknown quant_type {blob.get('quant_type')!r}", where=f"{where}: {key}")
        items[base] = _Item(base, "4bit", parts, shape, dtype)
        consumed.update(parts.values())

    # int8 weights: <owner>.weight (int8) + <owner>.SCB (+ <owner>.weight_format).
    for key in sorted(keys):
        if not key.endswith(".weight") or src.headers[key][0] != "I8":
            continue
        owner = key[: -len(".weight")]
        scb = next((k for k in (f"{owner}.SCB", f"{key}.SCB") if k in keys), None)
        if scb is None:
            continue
        parts = {"weight": key, "SCB": scb}
        fmt = next((k for k in (f"{owner}.weight_format", f"{key}.weight_format") if k in keys), None)
        if fmt is not None:
            parts["weight_format"] = fmt
        items[key] = _Item(key, "int8", parts, list(src.headers[key][1]), dtype)
        consumed.update(parts.values())

    kinds = {it.kind for it in items.values()}
    expected = "int8" if method == "int8" else "4bit"
    if not items:
        raise CheckpointError(f"config.json says bitsandbytes {method} but no quantized weights were found",
                              where=where)
    if kinds != {expected}:
        raise CheckpointError(f"config.json says bitsandbytes {method} but the weights hold "
                              f"{' and '.join(sorted(kinds))} data", where=where)

    for item in items.values():
        owner = item.name.rsplit(".", 1)[0]
        if _lookup(owner, conv1d, prefix) is not None:
            if len(item.shape) != 2:
                raise CheckpointError(f"Conv1D weight {item.name!r} has shape {item.shape}", where=where)
            item.transpose = True
            item.shape = [item.shape[1], item.shape[0]]
        known = _lookup(item.name, shapes, prefix)
        if known is not None and shapes[known] != item.shape:
            raise CheckpointError(f"dequantized {item.name!r} would have shape {item.shape}, the model "
                                  f"expects {shapes[known]}", where=where)

    # Everything else passes through (floating tensors cast to dtype).
    for key in sorted(keys - consumed):
        st_dtype, shape = src.headers[key]
        try:
            torch_dtype = _shards.torch_dtype_of(st_dtype)
        except ValueError:
            raise CheckpointError(f"unsupported tensor dtype {st_dtype}", where=f"{where}: {key}") from None
        out_dtype = dtype if torch_dtype.is_floating_point else torch_dtype
        items[key] = _Item(key, "copy", {"tensor": key}, list(shape), out_dtype)

    # Output order: source file order, then name, so input files are read one after another.
    file_rank = {path: i for i, path in enumerate(src.files)}
    return sorted(items.values(), key=lambda it: (file_rank[src.key_file[next(iter(it.parts.values()))]],
                                                  it.name))


# --------------------------------------------------------------------------- the arithmetic

def dequantize_4bit_weight(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """What transformers' `dequantize_bnb_weight` returns for a Params4bit loaded from `parts`.

    `parts` holds "weight" (packed data) and the quant-state tensors, keyed by their name after the
    weight's own (absmax, quant_map, nested_*, quant_state.bitsandbytes__nf4|fp4) — the same dict
    `Bnb4bitDeserialize` hands to `Params4bit.from_prequantized`. Result dtype: the quant state's.
    """
    import bitsandbytes.functional as F

    stats = {k: v for k, v in parts.items() if k != "weight"}
    state = F.QuantState.from_dict(stats, torch.device("cpu"))
    return F.dequantize_4bit(parts["weight"], state)


def dequantize_int8_weight(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """What transformers' `dequantize_bnb_weight` returns for an Int8Params: float32."""
    import bitsandbytes.functional as F

    return F.int8_vectorwise_dequant(weight, scb)


class _Scratch:
    """One output buffer, reused for every cast. A cast into warm pages is about twice as fast as
    one into a fresh allocation, whose pages the kernel must first map and zero (on the 1.1B bench,
    1.1B elements: the cast was the largest part of the arithmetic). Its size is the largest
    output tensor; each tensor is written out before the next one is cast into the buffer."""

    def __init__(self) -> None:
        self._bytes: torch.Tensor | None = None

    def take(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if self._bytes is None or self._bytes.numel() < nbytes:
            self._bytes = None  # free the smaller buffer before allocating the larger one
            self._bytes = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return self._bytes[:nbytes].view(dtype).view(shape)


def _cast(value: torch.Tensor, item: _Item, scratch: _Scratch | None) -> torch.Tensor:
    """`value` (transposed for Conv1D) as `item.dtype`, contiguous: bit for bit
    `value.to(dtype).t().contiguous()`, as the cast is element-wise; in `scratch` when given."""
    if item.transpose:
        value = value.t()
    if list(value.shape) != item.shape:
        return value  # _materialize reports the shape
    if value.dtype == item.dtype and value.is_contiguous():
        return value
    if scratch is None:
        return value.to(item.dtype).contiguous()
    return scratch.take(item.shape, item.dtype).copy_(value)


def _materialize(item: _Item, src: _Source, where: str, scratch: _Scratch | None = None) -> torch.Tensor:
    """The output tensor for `item`. With `scratch`, the result may live in its buffer: valid only
    until the next call."""
    if item.kind == "copy":
        return _cast(src.get(item.parts["tensor"]), item, scratch)
    if item.kind == "4bit":
        parts = {role: src.get(key) for role, key in item.parts.items()}
        try:
            value = dequantize_4bit_weight(parts)
        except Exception as err:
            raise CheckpointError(f"cannot dequantize 4-bit weight ({err})", where=f"{where}: {item.name}") from None
    else:
        if "weight_format" in item.parts:
            fmt = src.get(item.parts["weight_format"])
            if fmt.numel() != 1 or int(fmt.item()) != 0:
                raise CheckpointError("int8 weight is not in 'row' format (only row is supported)",
                                      where=f"{where}: {item.name}")
        weight, scb = src.get(item.parts["weight"]), src.get(item.parts["SCB"])
        if weight.dim() != 2 or scb.shape != (weight.shape[0],):
            raise CheckpointError(f"int8 weight {list(weight.shape)} and SCB {list(scb.shape)} do not match",
                                  where=f"{where}: {item.name}")
        value = dequantize_int8_weight(weight, scb)
    # dequantize_and_replace: "dequantized in <quant dtype> and casted to <dtype>".
    value = _cast(value, item, scratch)
    if list(value.shape) != item.shape:
        raise CheckpointError(f"dequantized shape {list(value.shape)} differs from the quant state's "
                              f"{item.shape}", where=f"{where}: {item.name}")
    return value


# --------------------------------------------------------------------------- the command

def _write_config(config: dict, dtype: torch.dtype, path: Path) -> None:
    config = json.loads(json.dumps(config))  # deep copy
    for key in ("quantization_config", "_pre_quantization_dtype", "torch_dtype"):
        config.pop(key, None)
    config["dtype"] = dtype_name(dtype)
    # Sub-configs (e.g. text_config) carry their own dtype: keep them consistent.
    for value in config.values():
        if isinstance(value, dict) and ("dtype" in value or "torch_dtype" in value):
            value.pop("torch_dtype", None)
            value["dtype"] = dtype_name(dtype)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _copy_small_files(folder: Path, confine_to: Path, tmp: Path) -> list[str]:
    copied = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if (name.startswith(".") or name == "config.json" or name in _WEIGHT_INDEXES
                or name.endswith(_WEIGHT_SUFFIXES) or not path.is_file()):
            continue
        if not path.resolve().is_relative_to(confine_to):
            raise CheckpointError("file resolves outside the model folder", where=str(path),
                                  hint="refusing to copy files from outside the checkpoint")
        shutil.copyfile(path, tmp / name)
        copied.append(name)
    return copied


def dequantize_checkpoint(source: Path | str, out: Path, *, dtype: torch.dtype | str = torch.float16,
                          max_shard_size: int | str = "2GB", force: bool = False,
                          progress: Callable[[int, int], None] | None = None) -> DequantizeResult:
    """Write OUT: SOURCE's bnb checkpoint dequantized to `dtype`, loadable by plain `from_pretrained`."""
    dtype = parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    out = Path(out)
    resolved = resolve_source(source)
    folder, where = resolved.folder, resolved.label
    if out.resolve() == folder.resolve():
        raise OutputError("output folder is the source folder", where=str(out),
                          hint="write the dequantized checkpoint somewhere else")
    # The source is checked before OUT: check_output_dir creates OUT's parent, which a refused
    # source must not leave behind.
    config = read_config_json(folder)
    method, double_quant = bnb_quantization(config, where)
    check_output_dir(out, force)  # fail fast; atomic_dir checks again before writing
    # The loader's own checks (duplicate names, index vs shards, confinement, exact layout), which
    # safe_open alone does not make; the first problem is refused with the file and key named.
    from qfinal.checkpoint.inventory import inspect_checkpoint

    inspect_checkpoint(folder, confine_to=resolved.confine_to).raise_for_problems()
    conv1d, shapes, prefix = _conv1d_layout(folder, where, config)
    src = _Source(folder, resolved.confine_to)
    try:
        items = _plan(src, dtype, method, conv1d, shapes, prefix, where)
        by_name = {item.name: item for item in items}
        shards = [[by_name[name] for name in names]
                  for names in _shards.plan_shards(((it.name, it.nbytes) for it in items), max_bytes)]
        names = _shards.shard_file_names(len(shards))
        result = DequantizeResult(out=out, dtype=dtype_name(dtype), quant_method=method,
                                  double_quant=double_quant)
        weight_map: dict[str, str] = {}
        for shard, name in zip(shards, names):
            for item in shard:
                (result.dequantized if item.kind != "copy" else result.cast).append(item.name)
                weight_map[item.name] = name
                result.total_bytes += item.nbytes
        total = len(items)
        done = 0
        scratch = _Scratch()

        def computed(shard: list[_Item]):
            """(name, tensor) for each item of `shard`, computed only when the writer asks."""
            nonlocal done
            for item in shard:
                tensor = _materialize(item, src, where, scratch)
                yield item.name, tensor
                del tensor  # written: drop it before computing the next one
                done += 1
                if progress is not None:
                    progress(done, total)

        with atomic_dir(out, force=force) as tmp:
            for shard, name in zip(shards, names):
                _shards.write_safetensors_streaming(
                    tmp / name, [(item.name, item.dtype, item.shape) for item in shard], computed(shard),
                    metadata={"format": "pt"})
                result.files.append(name)
            if len(shards) > 1:
                _shards.write_index(tmp, weight_map, result.total_bytes)
                result.files.append(_shards.INDEX_FILE)
            _write_config(config, dtype, tmp / "config.json")
            result.files.append("config.json")
            result.files.extend(_copy_small_files(folder, resolved.confine_to, tmp))
    finally:
        src.close()
    result.files.sort()
    return result


# --------------------------------------------------------------------------- verification

def probe_inputs(model) -> dict:
    g = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.config, "vocab_size", 0) or 256)
    ids = torch.randint(0, min(vocab, 256), (2, 8), generator=g)
    kwargs = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids[:, :4]
    return kwargs


def reference_state_dict(model, layout_model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`model` (already `dequantize(dtype)`'ed) as a state dict in `layout_model`'s layout and `dtype`.

    Dequantized Conv1D weights come back as nn.Linear [out, in]: transpose them where the plain
    model has a Conv1D. Tensors transformers left in the load dtype are cast to `dtype`.
    """
    from transformers.pytorch_utils import Conv1D

    conv1d = {n for n, m in layout_model.named_modules() if isinstance(m, Conv1D)}
    ref_modules = dict(model.named_modules())
    state = {}
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if (name.endswith(".weight") and owner in conv1d
                and not isinstance(ref_modules.get(owner), Conv1D)):
            tensor = tensor.t()
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    return state


def compare_state_dicts(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                        dtype: torch.dtype) -> list[Finding]:
    """Keys, bit-exact values and dtypes of OUT (`got`) against the reference (`want`), through the
    shared engine (`qfinal.compare.compare_tensors`): one error finding per offending key."""
    from qfinal.compare.engine import _num, compare_tensors

    diffs = compare_tensors(got, want)
    findings = []
    missing = sorted(t.name for t in diffs if t.status == "only_b")
    extra = sorted(t.name for t in diffs if t.status == "only_a")
    for key in missing:
        findings.append(Finding(check="dequantize_keys", severity="error", key=key,
                                message="in the dequantized reference but not in OUT"))
    for key in extra:
        findings.append(Finding(check="dequantize_keys", severity="error", key=key,
                                message="in OUT but not in the dequantized reference"))
    if not missing and not extra:
        findings.append(Finding(check="dequantize_keys", severity="info",
                                message=f"{len(got)} tensors, same names as the reference"))
    bad_dtype = [k for k, t in got.items() if t.is_floating_point() and t.dtype != dtype]
    for key in bad_dtype:
        findings.append(Finding(check="dequantize_dtype", severity="error", key=key,
                                message=f"{dtype_name(got[key].dtype)}, expected {dtype_name(dtype)}"))
    if not bad_dtype:
        findings.append(Finding(check="dequantize_dtype", severity="info",
                                message=f"all floating tensors are {dtype_name(dtype)}"))
    both = sorted((t for t in diffs if t.status not in ("only_a", "only_b")), key=lambda t: t.name)
    differ = [t for t in both if not t.bit_identical]
    for t in differ:
        if t.status == "shape":
            detail = f"shape {list(t.shape_a)} vs reference {list(t.shape_b)}"
        elif t.status == "dtype":
            detail = f"dtype {t.dtype_a} vs reference {t.dtype_b}"
        else:
            detail = f"max abs difference {_num(t.max_abs)}, rel error {_num(t.rel_error)}"
        findings.append(Finding(check="dequantize_tensors", severity="error", key=t.name,
                                message=f"differs from transformers' dequantize(): {detail}"))
    if not differ:
        findings.append(Finding(check="dequantize_tensors", severity="info",
                                message=f"{len(both)} tensors bit-identical to transformers' dequantize()"))
    return findings


def logits_tolerance(dtype: torch.dtype) -> float:
    """Allowed max |logit difference| / max |logit| between OUT and the exact (float32) dequantization.

    Both run in float32, so only OUT's one rounding of each tensor to `dtype` separates them: each
    weight is off by at most u (unit roundoff: 2^-11 float16, 2^-8 bfloat16, 2^-24 float32). On the
    test models the logits move by about 1u; 16u leaves room for deep models and still catches a
    wrong layout or a wrong quant map, which move logits by O(1).
    """
    u = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}[dtype]
    return 16 * u


def verify_dequantized(source: Path | str, out: Path, dtype: torch.dtype | str) -> list[Finding]:
    """Reload OUT with plain transformers and compare with transformers' own dequantization.

    The reference is SOURCE loaded by transformers and `dequantize(torch.float32)`'ed, then cast
    to `dtype`: bit-identical to `dequantize(dtype)` (the bnb result is float32, or a float16/bfloat16
    quant-state dtype that float32 holds exactly, so the detour through float32 adds no rounding),
    and it gives float32 logits to compare with. It is dequantized before any forward pass: on CPUs
    with AVX512-BF16, bnb repacks 4-bit weights in place on the first eval forward and
    transformers' dequantize() then returns garbage.
    """
    import transformers

    dtype = parse_dtype(dtype)
    resolved = resolve_source(source)
    out = Path(out)
    config = read_config_json(out)
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise SourceError("config.json names no transformers model class", where=str(out))
    findings: list[Finding] = []

    model, info = cls.from_pretrained(out, output_loading_info=True)
    model.eval()
    problems = {k: v for k, v in info.items()
                if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    for kind, keys in problems.items():
        for key in keys:
            findings.append(Finding(check="dequantize_keys", severity="error", key=str(key),
                                    message=f"plain from_pretrained reports it in {kind}"))
    if not problems:
        findings.append(Finding(check="dequantize_keys", severity="info",
                                message="OUT loads with plain from_pretrained: no missing, unexpected "
                                        "or mismatched keys"))
    if "quantization_config" in config or config.get("dtype") != dtype_name(dtype):
        findings.append(Finding(check="dequantize_dtype", severity="error", key="config.json",
                                message=f"config.json dtype is {config.get('dtype')!r}, expected "
                                        f"{dtype_name(dtype)!r}, and it must hold no quantization_config"))

    reference = cls.from_pretrained(resolved.folder).eval()
    reference.dequantize(torch.float32)
    findings += compare_state_dicts(model.state_dict(), reference_state_dict(reference, model, dtype), dtype)

    def logits(m) -> torch.Tensor:  # a bnb reference may sit on the GPU where one is present
        device = next(m.parameters()).device
        return m.float()(**{k: v.to(device) for k, v in probe_inputs(m).items()}).logits.float().cpu()

    with torch.no_grad():
        want = logits(reference)
        del reference
        got = logits(model)
    findings.append(compare_logits(got, want, dtype))
    return findings


def compare_logits(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> Finding:
    """Logits of OUT against the reference's, through the shared engine (`output_metrics`, float64)."""
    from qfinal.compare.engine import output_metrics

    tol = logits_tolerance(dtype)
    if got.shape != want.shape:
        return Finding(check="dequantize_logits", severity="error",
                       message=f"logits shape {list(got.shape)} vs reference {list(want.shape)}")
    metrics = output_metrics(got, want)
    scale = want.abs().max().item() or 1.0
    diff = metrics.logits_max_abs
    ok = diff / scale <= tol
    return Finding(check="dequantize_logits", severity="info" if ok else "error",
                   message=f"logits vs transformers' float32 dequantization: max abs difference "
                           f"{diff:.3g} = {diff / scale:.2g} of max |logit| (tolerance {tol:.2g}); "
                           f"KL {metrics.kl_divergence:.3g}, top-1 agreement {metrics.top1_agreement:.4f}")


# --------------------------------------------------------------------------- command

def run_dequantize(source: Path | str, out: Path | str, *, dtype: str = "float16", max_shard_size: int | str = "2GB",
                   verify: bool = False, force: bool = False, progress_console=None) -> "Report":
    """`qfinal dequantize` as a library call: the streaming write, then (optionally) the proof."""
    import time

    from qfinal.pipeline.context import peak_rss_bytes
    from qfinal.report import ConvertedModule, Report, StageRecord

    report = Report(source=str(source), command="dequantize", dtype=dtype)
    start = time.perf_counter()
    if progress_console is not None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        with Progress("dequantize", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=progress_console, transient=True) as bar:
            task = bar.add_task("tensors", total=None)
            result = dequantize_checkpoint(source, Path(out), dtype=dtype, max_shard_size=max_shard_size,
                                           force=force,
                                           progress=lambda done, total: bar.update(task, completed=done, total=total))
    else:
        result = dequantize_checkpoint(source, Path(out), dtype=dtype, max_shard_size=max_shard_size, force=force)
    report.quantization = result.quant_method + ("+double_quant" if result.double_quant else "")
    report.model_class = (read_config_json(Path(out)).get("architectures") or [None])[0]
    report.stages.append(StageRecord(name="dequantize", seconds=round(time.perf_counter() - start, 6),
                                     peak_rss_bytes=peak_rss_bytes(),
                                     detail=f"{len(result.dequantized)} weight(s) dequantized, {len(result.cast)} "
                                            f"tensor(s) cast, {len(result.files)} file(s) written"))
    report.keys.converted = [ConvertedModule.model_validate({"module": n.rsplit(".", 1)[0],
                                                             "from": report.quantization, "to": dtype})
                             for n in result.dequantized]
    report.extra["dequantize"] = {"out": str(result.out), "files": result.files, "total_bytes": result.total_bytes}
    if verify:
        start = time.perf_counter()
        report.findings.extend(verify_dequantized(source, Path(out), dtype))
        report.checks = sorted({f.check for f in report.findings})
        report.stages.append(StageRecord(name="verify", seconds=round(time.perf_counter() - start, 6),
                                         peak_rss_bytes=peak_rss_bytes(), detail="reloaded with plain transformers"))
    return report
