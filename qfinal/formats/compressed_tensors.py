"""compressed-tensors checkpoints (quant_method "compressed-tensors": what llm-compressor writes
and vLLM serves): header checks, streaming dequantization, and why qfinal dequantizes them on load.

Each quantized Linear `M` is stored by its config group's format:
* pack-quantized (int, 1 to 8 bits: W4A16, W8A16): `M.weight_packed` int32 [rows, ceil(cols*bits/32)],
  `M.weight_scale`, `M.weight_shape` ([rows, cols]), `M.weight_zero_point` when asymmetric (packed
  along rows for group / channel), `M.weight_g_idx` for activation-ordered groups;
* naive / int- / float-quantized (W8A8 int8, FP8): `M.weight` int8 or float8_e4m3fn, `M.weight_scale`,
  `M.weight_zero_point` when asymmetric;
plus `M.input_scale` (and zero point) for static activation quantization. Scales are per tensor,
channel ([rows, 1]), group ([rows, cols/group]) or block ([ceil(rows/bh), ceil(cols/bw)]).

The arithmetic is `compressed_tensors_math` (pure torch, bit for bit the library's decompression);
the config is read by `compressed_tensors_config`. compressed_tensors itself is never imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from qfinal.errors import CheckpointError
from qfinal.formats import compressed_tensors_config as cfg
from qfinal.formats import compressed_tensors_math as cmath
from qfinal.formats.base import QuantFormat, Read, Scheme, StoredWeight, listing, matched_findings, problem_findings
from qfinal.report import Finding

METHOD = "compressed-tensors"
STATE_SUFFIXES = (
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "weight_g_idx",
    "weight_global_scale",
    "input_scale",
    "input_zero_point",
    "input_global_scale",
    "output_scale",
    "output_zero_point",
)
SCALE_DTYPES = ("F16", "BF16", "F32")
INT_DTYPES = ("I8", "I16", "I32", "I64")
_WHERE = "config.json:quantization_config"


@dataclass
class CtWeight(StoredWeight):
    """A stored compressed-tensors weight and the group arguments that rebuild it."""

    args: cfg.WeightArgs | None = None
    packed: bool = False


def _split(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def _expected_scale(args: cfg.WeightArgs, rows: int, cols: int | None) -> list[int] | None:
    """The weight_scale shape a [rows, cols] weight needs (None where cols is unknown)."""
    if args.strategy == "tensor":
        return [1]
    if args.strategy == "channel":
        return [rows, 1]
    if cols is None:
        return None
    if args.strategy == "group":
        return [rows, -(-cols // args.group_size)]
    return [-(-rows // args.block[0]), -(-cols // args.block[1])]


def _roles(group: cfg.Group) -> dict[str, bool]:
    """Stored leaf -> required, for a module of `group` (optional leaves map to False)."""
    args = group.weights
    roles = {("weight_packed" if group.format == cfg.PACKED else "weight"): True, "weight_scale": True}
    if group.format == cfg.PACKED:
        roles["weight_shape"] = True
    if not args.symmetric:
        roles["weight_zero_point"] = True
    if args.strategy == "group" and args.actorder in ("group", "dynamic", "True"):
        roles["weight_g_idx"] = True
    if group.input_static:
        roles["input_scale"] = True
        if not group.input_symmetric:
            roles["input_zero_point"] = True
    return roles


def _shape_problem(group: cfg.Group, parts: dict[str, tuple[str, list[int]]], cols: int | None) -> str | None:
    """Why a module's stored tensors do not fit its group, from dtypes and shapes (and `cols`,
    the weight's column count, when known), or None."""
    args, packed = group.weights, group.format == cfg.PACKED
    dtype, shape = parts["weight_packed" if packed else "weight"]
    want = "I32" if packed else ("I8" if args.type == "int" else "F8_E4M3")
    if dtype != want or len(shape) != 2:
        leaf = "weight_packed" if packed else "weight"
        return f"{leaf} is {dtype} {shape}, a {group.format} {args.label} weight is 2-D {want}"
    rows = shape[0]
    if not packed:
        cols = shape[1]
    scale_dtype, scale_shape = parts["weight_scale"]
    if scale_dtype not in SCALE_DTYPES:
        return f"weight_scale is {scale_dtype}, not a float (F16 / BF16 / F32)"
    expected = _expected_scale(args, rows, cols)
    if packed and args.strategy == "group" and cols is None:
        groups = scale_shape[-1] if len(scale_shape) == 2 else 0
        low, high = (
            cmath.packed_width((groups - 1) * args.group_size + 1, args.num_bits),
            cmath.packed_width(groups * args.group_size, args.num_bits),
        )
        if not (len(scale_shape) == 2 and scale_shape[0] == rows and groups and low <= shape[1] <= high):
            return (
                f"weight_packed {shape} and weight_scale {scale_shape} do not fit {args.label} "
                f"({args.num_bits}-bit values, {args.group_size} per group)"
            )
    elif expected is not None and list(scale_shape) != expected and not (expected == [1] and scale_shape == []):
        return f"weight_scale has shape {scale_shape}, a [{rows}, {cols}] {args.label} weight needs {expected}"
    if packed and cols is not None and shape[1] != cmath.packed_width(cols, args.num_bits):
        return (
            f"weight_packed has {shape[1]} int32 column(s), {cols} {args.num_bits}-bit values need "
            f"{cmath.packed_width(cols, args.num_bits)}"
        )
    return _companion_problem(group, parts, rows, cols, scale_shape)


def _companion_problem(group: cfg.Group, parts, rows: int, cols: int | None, scale_shape) -> str | None:
    """weight_shape, weight_zero_point and weight_g_idx against the weight."""
    args = group.weights
    if "weight_shape" in parts:
        dtype, shape = parts["weight_shape"]
        if dtype not in INT_DTYPES or shape != [2]:
            return f"weight_shape is {dtype} {shape}, not the 2 integers [rows, cols]"
    if "weight_zero_point" in parts:
        dtype, shape = parts["weight_zero_point"]
        packed_zp = group.format == cfg.PACKED and args.strategy in ("group", "channel")
        want = [cmath.packed_width(rows, args.num_bits), scale_shape[-1]] if packed_zp else list(scale_shape)
        if dtype not in (("I32",) if packed_zp else INT_DTYPES) or shape != want:
            return f"weight_zero_point is {dtype} {shape}, {args.label} needs {'I32 ' if packed_zp else ''}{want}"
    if "weight_g_idx" in parts:
        dtype, shape = parts["weight_g_idx"]
        if dtype not in INT_DTYPES or len(shape) != 1 or (cols is not None and shape != [cols]):
            return f"weight_g_idx is {dtype} {shape}, not one group index per input column"
    for leaf in ("input_scale", "input_zero_point"):
        if leaf in parts and parts[leaf][0] not in (SCALE_DTYPES if leaf == "input_scale" else INT_DTYPES):
            return f"{leaf} is {parts[leaf][0]}"
    return None


def _modules(headers: dict) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """Module -> {leaf: (dtype, shape)} for every module holding compressed-tensors quant state."""
    state: dict[str, dict] = {}
    for key in headers:
        module, leaf = _split(key)
        if leaf in STATE_SUFFIXES:
            state.setdefault(module, {})
    for key, (dtype, shape) in headers.items():
        module, leaf = _split(key)
        if module in state:
            state[module][leaf] = (dtype, list(shape))
    return state


def _module_problems(module: str, leaves: dict, scheme: cfg.CtScheme) -> tuple[cfg.Group | None, list[str]]:
    """The module's group and what is wrong with its stored tensors (cols unknown: headers only)."""
    if cfg.is_ignored(module, scheme):
        return None, [f"{module} is in quantization_config.ignore but holds quant state ({listing(sorted(leaves))})"]
    group, why = cfg.group_of(module, scheme)
    if group is None:
        return None, [why or f"{module} holds quant state but no config group targets it"]
    roles = _roles(group)
    missing = [leaf for leaf, required in roles.items() if required and leaf not in leaves]
    stray = [leaf for leaf in leaves if leaf in STATE_SUFFIXES + ("weight",) and leaf not in roles]
    problems = []
    if missing:
        problems.append(f"{module} ({group.name}: {group.weights.label}, {group.format}) lacks {', '.join(missing)}")
    if stray:
        problems.append(
            f"{module} ({group.name}: {group.weights.label}) holds {', '.join(sorted(stray))}, "
            "which its scheme does not store"
        )
    if not problems:
        why = _shape_problem(group, leaves, None)
        if why:
            problems.append(f"{module}: {why}")
    return group, problems


class CompressedTensors(QuantFormat):
    name = METHOD

    def dequantizes_on_load(self, raw_config: dict) -> str | None:
        """Always: transformers 5.23 keeps the weights packed until the first forward (and fails on
        asymmetric pack-quantized zero points), and its dequantize=True path applies the first
        config group's scheme to every layer, silently wrong for mixed-scheme checkpoints."""
        return (
            "transformers keeps compressed-tensors weights packed until the first forward, cannot load "
            "asymmetric pack-quantized zero points, and dequantizes mixed-scheme checkpoints with one scheme"
        )

    def detect(self, raw_config: dict) -> bool:
        qc = raw_config.get("quantization_config")
        return isinstance(qc, dict) and qc.get("quant_method") == METHOD

    def scheme(self, raw_config: dict, where: str) -> Scheme:
        scheme, errors = cfg.parse_config(raw_config["quantization_config"])
        if scheme is None:
            raise CheckpointError(f"compressed-tensors quantization_config: {errors[0]}", where=where)
        return scheme

    def is_quant_state_key(self, key: str) -> bool:
        return _split(key)[1] in STATE_SUFFIXES

    def packed_weight_keys(self, tensors: Iterable[str]) -> set[str]:
        """`M.weight` stored as int8 / fp8 beside an `M.weight_scale` (naive / int / float-quantized)."""
        tensors = set(tensors)
        return {k[: -len("_scale")] for k in tensors if k.endswith(".weight_scale") and k[: -len("_scale")] in tensors}

    def quant_state_findings(
        self, raw_config: dict, inventory, quantized_modules: Iterable[str] | None, key_of: Callable[[str], str | None]
    ) -> list[Finding]:
        """Config fields; per module holding quant state: its group, every companion tensor its
        scheme stores (and nothing else), dtypes and shapes; weights a name target names that are
        stored unquantized; when `quantized_modules` is given, each of them holds quant state."""
        headers = {k: (e.dtype, list(e.shape)) for k, e in inventory.tensors.items()}
        scheme, errors = cfg.parse_config(raw_config["quantization_config"])
        problems: list[tuple[str | None, str]] = [(_WHERE, e) for e in errors]
        if scheme is not None:
            problems = self._tensor_problems(scheme, headers, quantized_modules, key_of)
        if problems:
            return problem_findings(problems)
        return matched_findings(f"({scheme.method}): {len(_modules(headers))} quantized weight(s)")

    def _tensor_problems(self, scheme, headers, quantized_modules, key_of) -> list[tuple[str | None, str]]:
        problems: list[tuple[str | None, str]] = []
        modules = _modules(headers)
        if not modules:
            problems.append((_WHERE, "quantization_config says compressed-tensors but no quantized weight is stored"))
        for module in sorted(modules):
            _, found = _module_problems(module, modules[module], scheme)
            problems += [(f"{module}.weight", p) for p in found]
        plain = [
            k
            for k, (dtype, shape) in headers.items()
            if k.endswith(".weight")
            and len(shape) == 2
            and k[: -len(".weight")] not in modules
            and not cfg.is_ignored(k[: -len(".weight")], scheme)
            and cfg.targeted_by_name(k[: -len(".weight")], scheme) is not None
        ]
        if plain:
            problems.append(
                (
                    plain[0],
                    f"{len(plain)} weight(s) a config group names are stored unquantized: {listing(sorted(plain))}",
                )
            )
        for module in sorted(set(quantized_modules or ())):
            ckpt = key_of(f"{module}.weight")
            if ckpt is not None and ckpt[: -len(".weight")] not in modules:
                problems.append((ckpt, f"quantized module {module} holds no compressed-tensors quant state"))
        return problems

    def find_weights(self, headers: dict, read: Read, scheme: Scheme, where: str) -> list[StoredWeight]:
        modules = _modules({k: (d, list(s)) for k, (d, s) in headers.items()})
        found = []
        for module in sorted(modules):
            leaves = modules[module]
            group, problems = _module_problems(module, leaves, scheme)
            if problems:  # each names its module
                raise CheckpointError(problems[0], where=where)
            found.append(self._stored(module, group, leaves, read, where))
        if not found:
            raise CheckpointError("config.json says compressed-tensors but no quantized weight is stored", where=where)
        return found

    def _stored(self, module: str, group: cfg.Group, leaves: dict, read: Read, where: str) -> CtWeight:
        """The weight of `module`, its shape read from weight_shape where packed, all shapes checked."""
        packed = group.format == cfg.PACKED
        parts = {leaf: f"{module}.{leaf}" for leaf in leaves if leaf in _roles(group)}
        if packed:
            shape = [int(v) for v in read(parts["weight_shape"]).reshape(-1).tolist()]
            if len(shape) != 2 or shape[0] != leaves["weight_packed"][1][0] or shape[1] < 1:
                raise CheckpointError(
                    f"weight_shape says {shape}, weight_packed has {leaves['weight_packed'][1][0]} rows",
                    where=f"{where}: {module}",
                )
        else:
            shape = list(leaves["weight"][1])
        why = _shape_problem(group, leaves, shape[1])
        if why:
            raise CheckpointError(why, where=f"{where}: {module}")
        return CtWeight(f"{module}.weight", group.format, parts, shape, args=group.weights, packed=packed)

    def dequantize(self, weight: StoredWeight, read: Read, where: str):
        """In the scale's dtype, as compressed-tensors' decompression returns it (the caller casts)."""
        args, parts, (rows, cols) = weight.args, weight.parts, weight.shape
        try:
            if weight.packed:
                values = cmath.unpack_int32(read(parts["weight_packed"]), args.num_bits, cols)
            else:
                values = read(parts["weight"])
            zero_point = read(parts["weight_zero_point"]) if "weight_zero_point" in parts else None
            if zero_point is not None and weight.packed and args.strategy in ("group", "channel"):
                zero_point = cmath.unpack_int32(zero_point, args.num_bits, rows, packed_dim=0)
            g_idx = read(parts["weight_g_idx"]) if "weight_g_idx" in parts else None
            return cmath.dequantize_values(
                values,
                read(parts["weight_scale"]),
                zero_point,
                [rows, cols],
                args.strategy,
                args.group_size,
                args.block,
                g_idx,
            )
        except (RuntimeError, IndexError) as err:
            raise CheckpointError(
                f"cannot dequantize compressed-tensors weight ({err})", where=f"{where}: {weight.name}"
            ) from None

    def verify_reference(self, model_class, folder):
        """compressed-tensors' own decompression (transformers has no dequantize() for this format)."""
        from qfinal.checkpoint.sources import read_config_json
        from qfinal.formats.compressed_tensors_library import library_reference

        return library_reference(model_class, folder, read_config_json(folder))

    def loaded_method(self, model) -> str | None:
        if any(hasattr(m, "quantization_scheme") for m in model.modules()):
            return METHOD
        return None


COMPRESSED_TENSORS = CompressedTensors()
