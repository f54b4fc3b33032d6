"""FP8 fine-grained block-scaled checkpoints (quant_method "fp8", transformers' FineGrainedFP8).

Each quantized Linear stores `weight` as float8_e4m3fn ("F8_E4M3") and `weight_scale_inv` of shape
[ceil(rows/bh), ceil(cols/bw)] for `weight_block_size` [bh, bw] (one scalar without a block size),
float32 ("float" scale_fmt) or E8M0 exponents ("ue8m0"); static activation quantization adds
`activation_scale`. The value of an element is its fp8 value times its block's scale.

transformers' own dequantization infers the block as rows // scale_rows, which is wrong (silently,
or with an error) when a dimension does not divide by the block size: the last block is partial.
Here each scale is repeated over its full block along both dimensions and the grid cropped to the
weight's shape, so ragged weights are right; for divisible shapes the result equals transformers'
bit for bit (the same float32 product, then one cast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

from qfinal.errors import CheckpointError
from qfinal.formats.base import (
    QuantFormat,
    Read,
    Scheme,
    StoredWeight,
    listing,
    matched_findings,
    problem_findings,
    stored_checkpoint,
)
from qfinal.formats.compressed_tensors_math import expand_blocks
from qfinal.report import Finding

SCALE_SUFFIX = ".weight_scale_inv"
ACTIVATION_SUFFIX = ".activation_scale"
WEIGHT_DTYPE = "F8_E4M3"
SCALE_DTYPES = {"float": ("F32",), "ue8m0": ("U8", "F8_E8M0")}
QUANTIZED_CLASSES = ("FP8Linear", "FP8Experts", "FP8Embedding")
_WHERE = "config.json:quantization_config"


@dataclass(frozen=True)
class Fp8Scheme(Scheme):
    """The fp8 scheme: its block size ([rows, cols], None for one scale per tensor) and scale format."""

    block: tuple[int, int] | None = None
    scale_fmt: str = "float"


@dataclass
class Fp8Weight(StoredWeight):
    """A stored fp8 weight and the block size its scales cover."""

    block: tuple[int, int] | None = None


def _config_errors(qc: dict) -> list[str]:
    """What is wrong with an fp8 quantization_config's own fields."""
    errors = []
    block = qc.get("weight_block_size", [128, 128])
    if block is not None and not (
        isinstance(block, (list, tuple))
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        errors.append(f"weight_block_size must be two positive integers or null, not {block!r}")
    if str(qc.get("activation_scheme", "dynamic")).lower() not in ("dynamic", "static"):
        errors.append(f"activation_scheme must be 'dynamic' or 'static', not {qc.get('activation_scheme')!r}")
    if qc.get("scale_fmt", "float") not in SCALE_DTYPES:
        errors.append(f"scale_fmt must be 'float' or 'ue8m0', not {qc.get('scale_fmt')!r}")
    return errors


def scale_grid(shape: list[int], block: tuple[int, int] | None) -> list[int]:
    """The weight_scale_inv shape a weight of `shape` needs: ceil-div of its last two dims."""
    if block is None:
        return []
    *lead, rows, cols = shape
    return [*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1])]


def _weight_problem(shape: list[int], dtype: str, scale_shape: list[int], scale_dtype: str, scheme) -> str | None:
    """Why a stored (weight, scale) pair does not match the scheme, or None."""
    if dtype != WEIGHT_DTYPE:
        return f"weight with a weight_scale_inv is stored as {dtype}, not {WEIGHT_DTYPE}"
    if scale_dtype not in SCALE_DTYPES[scheme.scale_fmt]:
        want = " or ".join(SCALE_DTYPES[scheme.scale_fmt])
        return f"weight_scale_inv is stored as {scale_dtype}, not {want} (scale_fmt {scheme.scale_fmt!r})"
    if scheme.block is not None and len(shape) < 2:
        return f"weight of shape {shape} cannot be block-scaled"
    want = scale_grid(shape, scheme.block)
    ok = math.prod(scale_shape) == 1 if scheme.block is None else list(scale_shape) == want
    if not ok:
        return (
            f"weight_scale_inv has shape {list(scale_shape)}, a {list(shape)} weight with weight_block_size "
            f"{list(scheme.block) if scheme.block else None} needs {want or [1]}"
        )
    return None


def dequantize_fp8_weight(weight, scale_inv, block: tuple[int, int] | None):
    """float32 values of an fp8 weight: each element times its block's scale (partial last blocks
    included). `scale_inv` may be float32 or E8M0 exponents stored as uint8."""
    import torch

    values = weight.to(torch.float32)
    if scale_inv.dtype == torch.uint8:
        scale = (scale_inv.to(torch.float32) - 127.0).exp2()
    else:
        scale = scale_inv.to(torch.float32)
    if block is None:
        return values * scale.reshape(())
    rows, cols = values.shape[-2:]
    return values * expand_blocks(scale, rows, cols, block)


class FineGrainedFP8(QuantFormat):
    name = "fp8"
    quantized_classes = QUANTIZED_CLASSES

    def dequantizes_on_load(self, raw_config: dict) -> str | None:
        """Always: transformers' FP8 quantizer refuses a machine without a GPU, and its own
        dequantization is silently wrong where a dimension does not divide by the block size."""
        return "transformers' fp8 loader needs a GPU and mis-scales ragged blocks"

    def detect(self, raw_config: dict) -> bool:
        qc = raw_config.get("quantization_config")
        return isinstance(qc, dict) and qc.get("quant_method") == "fp8"

    def scheme(self, raw_config: dict, where: str) -> Scheme:
        qc = raw_config["quantization_config"]
        errors = _config_errors(qc)
        if errors:
            raise CheckpointError(f"fp8 quantization_config: {errors[0]}", where=where)
        block = qc.get("weight_block_size", [128, 128])
        return Fp8Scheme("fp8", block=tuple(block) if block else None, scale_fmt=qc.get("scale_fmt", "float"))

    def is_quant_state_key(self, key: str) -> bool:
        return key.endswith((SCALE_SUFFIX, ACTIVATION_SUFFIX))

    def packed_weight_keys(self, tensors: Iterable[str]) -> set[str]:
        return {k[: -len("_scale_inv")] for k in tensors if k.endswith(SCALE_SUFFIX)}

    def quant_state_findings(
        self, raw_config: dict, inventory, quantized_modules: Iterable[str] | None, key_of: Callable[[str], str | None]
    ) -> list[Finding]:
        """Config fields; every F8_E4M3 weight with a scale of the ceil-div grid shape and dtype; no
        scale without its weight; when `quantized_modules` is given, each of them holds a scale."""
        tensors, qc = inventory.tensors, raw_config["quantization_config"]
        problems: list[tuple[str | None, str]] = [(_WHERE, e) for e in _config_errors(qc)]
        if not problems:
            problems = self._tensor_problems(self.scheme(raw_config, _WHERE), tensors, quantized_modules, key_of)
        if problems:
            return problem_findings(problems)
        count = sum(k.endswith(SCALE_SUFFIX) for k in tensors)
        block = qc.get("weight_block_size", [128, 128])
        return matched_findings(f"(fp8, weight_block_size {block}): {count} scaled weight(s)")

    def _tensor_problems(self, scheme, tensors, quantized_modules, key_of) -> list[tuple[str | None, str]]:
        problems: list[tuple[str | None, str]] = []
        scales = sorted(k for k in tensors if k.endswith(SCALE_SUFFIX))
        fp8 = sorted(k for k, e in tensors.items() if e.dtype == WEIGHT_DTYPE)
        if not fp8:
            problems.append((_WHERE, "quantization_config says fp8 but no F8_E4M3 weights are present"))
        unscaled = [k for k in fp8 if not k.endswith(".weight") or k + "_scale_inv" not in tensors]
        if unscaled:
            problems.append(
                (unscaled[0], f"{len(unscaled)} F8_E4M3 tensor(s) lack weight_scale_inv: {listing(unscaled)}")
            )
        stray = [k for k in scales if k[: -len("_scale_inv")] not in tensors]
        stray += [
            k
            for k in tensors
            if k.endswith(ACTIVATION_SUFFIX) and k[: -len(ACTIVATION_SUFFIX)] + ".weight" not in tensors
        ]
        if stray:
            problems.append((stray[0], f"{len(stray)} scale tensor(s) belong to no stored weight: {listing(stray)}"))
        for key in scales:
            weight = tensors.get(key[: -len("_scale_inv")])
            if weight is not None:
                why = _weight_problem(
                    list(weight.shape), weight.dtype, list(tensors[key].shape), tensors[key].dtype, scheme
                )
                if why:
                    problems.append((key, why))
        for module in sorted(set(quantized_modules or ())):
            ckpt = key_of(f"{module}.weight")
            if ckpt is not None and ckpt + "_scale_inv" not in tensors:
                problems.append((ckpt, f"quantized module {module} lacks its weight_scale_inv"))
        return problems

    def find_weights(self, headers: dict, read: Read, scheme: Scheme, where: str) -> list[StoredWeight]:
        found = []
        for key in sorted(headers):
            if not key.endswith(SCALE_SUFFIX):
                continue
            base = key[: -len("_scale_inv")]
            if base not in headers:
                raise CheckpointError(f"weight_scale_inv {key!r} has no weight {base!r}", where=where)
            (dtype, shape), (scale_dtype, scale_shape) = headers[base], headers[key]
            why = _weight_problem(list(shape), dtype, list(scale_shape), scale_dtype, scheme)
            if why:
                raise CheckpointError(why, where=f"{where}: {base}")
            parts = {"weight": base, "weight_scale_inv": key}
            activation = base[: -len(".weight")] + ACTIVATION_SUFFIX
            if activation in headers:
                parts["activation_scale"] = activation
            found.append(Fp8Weight(base, "fp8", parts, list(shape), block=getattr(scheme, "block", None)))
        unscaled = sorted(k for k, (d, _) in headers.items() if d == WEIGHT_DTYPE and k + "_scale_inv" not in headers)
        if unscaled:
            raise CheckpointError(f"F8_E4M3 tensor(s) without weight_scale_inv: {listing(unscaled, 3)}", where=where)
        if not found:
            raise CheckpointError("config.json says fp8 but no weight_scale_inv tensors were found", where=where)
        return found

    def dequantize(self, weight: StoredWeight, read: Read, where: str):
        """float32, the block scales applied over partial blocks too (the caller casts)."""
        try:
            return dequantize_fp8_weight(
                read(weight.parts["weight"]), read(weight.parts["weight_scale_inv"]), getattr(weight, "block", None)
            )
        except RuntimeError as err:
            raise CheckpointError(f"cannot dequantize fp8 weight ({err})", where=f"{where}: {weight.name}") from None

    def verify_reference(self, model_class, folder):
        """transformers' own FP8 dequantization (its CPU load dequantizes), except the weights with
        a partial last block, which it gets wrong: those are recomputed element by element (each
        element times scale[row // bh, col // bw]), a path independent of `dequantize_fp8_weight`."""
        import torch

        from qfinal.checkpoint.sources import read_config_json

        block = self.scheme(read_config_json(folder), str(folder)).block
        reference = model_class.from_pretrained(folder, dtype=torch.float32).eval()
        if block is None:
            return reference
        inventory, reader = stored_checkpoint(folder)
        with torch.no_grad(), reader:
            for key, entry in inventory.tensors.items():
                if not key.endswith(SCALE_SUFFIX) or len(entry.shape) != 2:
                    continue
                name = key[: -len("_scale_inv")]
                rows, cols = inventory.tensors[name].shape
                if rows % block[0] == 0 and cols % block[1] == 0:
                    continue
                weight, scale = reader.get(name), reader.get(key).to(torch.float32)
                per_element = scale[(torch.arange(rows) // block[0])[:, None], torch.arange(cols) // block[1]]
                reference.get_parameter(name).copy_(weight.to(torch.float32) * per_element)
        return reference

    def loaded_method(self, model) -> str | None:
        if any(type(m).__name__ in QUANTIZED_CLASSES for m in model.modules()):
            return "fp8"
        return None


FP8 = FineGrainedFP8()
