"""torchao checkpoints as stored: what config.json's quant_type says, and which stored tensors make
up each quantized weight, checked from the headers (and the safetensors `__metadata__`) alone.

torchao's `flatten_tensor_state_dict` (what transformers' save_pretrained calls) stores a tensor
subclass `<module>.<param>` as one plain tensor per component, `<module>._<param>_<component>`
(`qdata`, `scale`, `zero_point`, ...), and describes it in the file's `__metadata__`: under the
weight's own name a JSON object with `_type` (the subclass), `_data` (block_size, dtype, ...) and
`_tensor_data_names` (the components stored), plus `tensor_names`, the list of every tensor.
transformers rebuilds the subclass from that metadata and refuses a file without it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from qfinal.formats.base import Scheme, StoredWeight

# (config type, its `_version`) -> the tensor subclass it stores, for the configs qfinal reads.
TENSOR_TYPES = {"Int8WeightOnlyConfig": "Int8Tensor", "IntxWeightOnlyConfig": "IntxUnpackedToInt8Tensor"}
COMPONENTS = ("qdata", "scale", "zero_point", "act_pre_scale", "act_quant_scale", "act_quant_zero_point")
REQUIRED = {"Int8Tensor": ("qdata", "scale"), "IntxUnpackedToInt8Tensor": ("qdata", "scale", "zero_point")}
OPTIONAL = {"Int8Tensor": ("zero_point",), "IntxUnpackedToInt8Tensor": ()}
FLOAT_CODES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_KEY = re.compile(r"^(?P<module>.+)\._(?P<param>\w+?)_(?P<part>" + "|".join(COMPONENTS) + r")$")


@dataclass(frozen=True)
class TorchaoScheme(Scheme):
    """A torchao weight-only scheme: the subclass, its integer width, the group size along a row
    (None: one scale per row), symmetric or not, and the dtype weights dequantize to."""

    config_type: str = ""
    tensor_type: str = ""
    bits: int = 8
    group: int | None = None
    symmetric: bool = True
    dtype: str = "bfloat16"


@dataclass
class TorchaoWeight(StoredWeight):
    """A stored torchao weight: its block (elements per scale, per dimension) and result dtype."""

    block: list[int] = field(default_factory=list)
    dtype: str = "bfloat16"


def component_of(key: str) -> tuple[str, str] | None:
    """(weight name, component) for a stored torchao component key, else None."""
    m = _KEY.match(key)
    return (f"{m['module']}.{m['param']}", m["part"]) if m else None


def _typed(node, what: str) -> tuple[str, dict]:
    """(`_type`, `_data`) of one serialized torchao object."""
    if not isinstance(node, dict) or not isinstance(node.get("_type"), str):
        raise ValueError(f"{what} is not a serialized torchao object")
    data = node.get("_data")
    return node["_type"], data if isinstance(data, dict) else {"_value": data}


def parse_scheme(raw_config: dict) -> TorchaoScheme:
    """The scheme config.json declares; ValueError saying what qfinal does not read."""
    qc = raw_config["quantization_config"]
    quant_type = qc.get("quant_type")
    if not isinstance(quant_type, dict) or set(quant_type) != {"default"}:
        raise ValueError("quant_type must be {'default': <torchao config>} (per-module configs are not read)")
    config_type, data = _typed(quant_type["default"], "quant_type.default")
    if config_type not in TENSOR_TYPES or quant_type["default"].get("_version", 2) < 2:
        raise ValueError(
            f"torchao {config_type} (version {quant_type['default'].get('_version')}) is not read by qfinal: "
            "it reads Int8WeightOnlyConfig and IntxWeightOnlyConfig (unpacked to int8), version 2"
        )
    gran_type, gran = _typed(data.get("granularity"), "granularity")
    dtype = raw_config.get("dtype", raw_config.get("torch_dtype"))
    if dtype not in FLOAT_CODES.values():
        raise ValueError(f"config.json's dtype {dtype!r} is not float32, bfloat16 or float16")
    if config_type == "Int8WeightOnlyConfig":
        if gran_type != "PerRow":
            raise ValueError(f"Int8WeightOnlyConfig granularity {gran_type} is not read (PerRow only)")
        return TorchaoScheme("torchao-int8", config_type=config_type, tensor_type="Int8Tensor", dtype=dtype)
    packing = _typed(data.get("intx_packing_format"), "intx_packing_format")[1].get("_value")
    weight_dtype = _typed(data.get("weight_dtype"), "weight_dtype")[1].get("_value")
    mapping = _typed(data.get("mapping_type"), "mapping_type")[1].get("_value")
    bits = re.fullmatch(r"int([1-8])", str(weight_dtype))
    if packing != "UNPACKED_TO_INT8" or bits is None or mapping not in ("SYMMETRIC", "ASYMMETRIC"):
        raise ValueError(
            f"IntxWeightOnlyConfig with packing {packing}, weight_dtype {weight_dtype}, mapping {mapping} "
            "is not read (UNPACKED_TO_INT8, int1..int8, SYMMETRIC or ASYMMETRIC only)"
        )
    if gran_type == "PerGroup":
        group = gran.get("group_size")
        if not isinstance(group, int) or isinstance(group, bool) or group < 1:
            raise ValueError(f"PerGroup group_size must be a positive integer, not {group!r}")
    elif gran_type == "PerAxis" and gran.get("axis") == 0:
        group = None
    else:
        raise ValueError(f"IntxWeightOnlyConfig granularity {gran_type} {gran} is not read (PerGroup, PerAxis(0))")
    return TorchaoScheme(
        f"torchao-intx-int{bits[1]}",
        config_type=config_type,
        tensor_type="IntxUnpackedToInt8Tensor",
        bits=int(bits[1]),
        group=group,
        symmetric=mapping == "SYMMETRIC",
        dtype=dtype,
    )


def group_components(keys) -> tuple[dict[str, dict[str, str]], list[str]]:
    """(weight name -> {component: stored key}, stored keys that name a component twice)."""
    weights: dict[str, dict[str, str]] = {}
    twice = []
    for key in sorted(keys):
        found = component_of(key)
        if found is None:
            continue
        name, part = found
        if part in weights.setdefault(name, {}):
            twice.append(key)
        weights[name][part] = key
    return weights, twice


def weight_problem(name: str, parts: dict[str, str], headers: dict, scheme: TorchaoScheme) -> str | None:
    """Why one stored weight's components do not fit the scheme, or None."""
    missing = [p for p in REQUIRED[scheme.tensor_type] if p not in parts]
    if missing:
        return f"{name} lacks its {', '.join('_' + name.rsplit('.', 1)[1] + '_' + p for p in missing)}"
    extra = sorted(set(parts) - set(REQUIRED[scheme.tensor_type]) - set(OPTIONAL[scheme.tensor_type]))
    if extra:
        return f"{name} has {', '.join(extra)}, which a {scheme.config_type} weight does not store"
    (q_dtype, shape), (s_dtype, s_shape) = headers[parts["qdata"]], headers[parts["scale"]]
    if q_dtype != "I8":
        return f"{name}: qdata is stored as {q_dtype}, not I8"
    if len(shape) not in (2, 3) or 0 in shape:
        return f"{name}: qdata has shape {list(shape)}, not a 2-D or 3-D weight"
    if s_dtype not in FLOAT_CODES:
        return f"{name}: scale is stored as {s_dtype}, not F32, BF16 or F16"
    want = [*shape[:-1], 1 if scheme.group is None else -(-shape[-1] // scheme.group)]
    if list(s_shape) != want or (scheme.group is not None and shape[-1] % scheme.group):
        grouping = "one per row" if scheme.group is None else f"group size {scheme.group}"
        return f"{name}: scale has shape {list(s_shape)}, a {list(shape)} weight with {grouping} needs {want}"
    if "zero_point" in parts:
        z_dtype, z_shape = headers[parts["zero_point"]]
        allowed = ("I8",) if scheme.tensor_type == "Int8Tensor" else ("I8", *FLOAT_CODES)
        if z_dtype not in allowed or list(z_shape) != list(s_shape):
            return f"{name}: zero_point is {z_dtype} {list(z_shape)}, it must be {' or '.join(allowed)} {want}"
    return None


def stored_weight(name: str, parts: dict[str, str], headers: dict, scheme: TorchaoScheme) -> TorchaoWeight:
    """The StoredWeight of components already checked by `weight_problem`."""
    shape = list(headers[parts["qdata"]][1])
    s_shape = list(headers[parts["scale"]][1])
    block = [q // s for q, s in zip(shape, s_shape)]
    return TorchaoWeight(name, scheme.method, dict(parts), shape, block=block, dtype=scheme.dtype)


def file_metadata(inventory) -> dict[str, str] | None:
    """The `__metadata__` of every safetensors file of `inventory`, merged as transformers merges
    them; None when a file's header was not read (the inventory reports why)."""
    if any(path not in inventory.metadata for path in inventory.files):
        return None
    merged: dict[str, str] = {}
    for path in inventory.files:
        merged.update(inventory.metadata[path])
    return merged


def metadata_problems(metadata: dict[str, str], weights: list[TorchaoWeight], scheme: TorchaoScheme) -> list[str]:
    """Where the `__metadata__` transformers rebuilds each weight from disagrees with the stored
    components and config.json (it would build a different tensor, or refuse the file)."""
    try:
        names = json.loads(metadata["tensor_names"])
        if not isinstance(names, list):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        return ["the safetensors files hold no torchao metadata (`tensor_names`): transformers refuses them"]
    problems = []
    for w in weights:
        try:
            meta = json.loads(metadata[w.name])
            data = meta["_data"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{w.name} has no torchao metadata entry")
            continue
        if w.name not in names:
            problems.append(f"{w.name} is missing from the metadata's tensor_names")
        if meta.get("_type") != scheme.tensor_type:
            problems.append(
                f"{w.name}: metadata says {meta.get('_type')}, {scheme.config_type} stores {scheme.tensor_type}"
            )
        if sorted(meta.get("_tensor_data_names") or []) != sorted(w.parts):
            problems.append(
                f"{w.name}: metadata names components {meta.get('_tensor_data_names')}, stored: {sorted(w.parts)}"
            )
        if list(data.get("block_size") or []) != w.block:
            problems.append(
                f"{w.name}: metadata block_size {data.get('block_size')} disagrees with the stored {w.block}"
            )
        dtype = (data.get("dtype") or {}).get("_data") if isinstance(data.get("dtype"), dict) else None
        if dtype != scheme.dtype:
            problems.append(f"{w.name}: metadata dtype {dtype!r} disagrees with config.json's {scheme.dtype!r}")
        target = (data.get("target_dtype") or {}).get("_data") if isinstance(data.get("target_dtype"), dict) else None
        if scheme.tensor_type == "IntxUnpackedToInt8Tensor" and target != f"int{scheme.bits}":
            problems.append(f"{w.name}: metadata target_dtype {target!r}, config.json says int{scheme.bits}")
    return problems
