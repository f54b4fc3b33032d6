"""What GPTQ and AWQ checkpoints share: int32-packed integer codes beside per-group scales.

Each quantized Linear `m` stores `m.qweight` (int32 words of codes), `m.qzeros` (int32 words of
zero points, one row per group), `m.scales` (one row per group, the model's half dtype) and, for
GPTQ, `m.g_idx` (each input column's group). The formats differ in which dimension is packed and
in what order; `PackedIntFormat` holds the header checks and the registry plumbing they share, and
each format says how one module's tensors must look (`module_problem`) and how it is rebuilt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable

from qfinal.errors import CheckpointError
from qfinal.formats.base import QuantFormat, Read, Scheme, StoredWeight, listing, matched_findings, problem_findings
from qfinal.report import Finding

PACKED = "qweight"
COMPANIONS = ("qzeros", "scales", "g_idx")
HALF_DTYPES = ("F16", "BF16")
CONFIG_WHERE = "config.json:quantization_config"


@dataclass(frozen=True)
class IntScheme(Scheme):
    """An integer scheme: bits per code, input columns per group (-1: one group), zero points."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    desc_act: bool = False
    zero_offset: bool = False  # GPTQ v1: stored zero points are one less than the true ones


@dataclass
class PackedWeight(StoredWeight):
    """A packed weight: its module's stored tensors and the scheme they are decoded with."""

    scheme: IntScheme | None = None


def unpack_int32(packed, bits: int, dim: int, order: list[int] | None = None):
    """Codes of `bits` bits packed low-first into int32 words along `dim` (0: rows, 1: columns),
    the result `32 // bits` times longer along `dim`. `order` is the position of each code in its
    word when the packer interleaved them (AWQ). Arithmetic shift then mask, as the libraries do."""
    import torch

    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    if order is not None:
        shifts = shifts[torch.tensor(order).argsort()]
    mask = (1 << bits) - 1
    if dim == 0:
        codes = torch.bitwise_right_shift(packed.unsqueeze(1), shifts[None, :, None]) & mask
        return codes.reshape(packed.shape[0] * len(shifts), packed.shape[1])
    codes = torch.bitwise_right_shift(packed.unsqueeze(2), shifts[None, None, :]) & mask
    return codes.reshape(packed.shape[0], packed.shape[1] * len(shifts))


def module_parts(headers: dict) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Modules holding a qweight -> {role: stored key}, and the companion tensors of no qweight."""
    modules: dict[str, dict[str, str]] = {}
    for key in headers:
        prefix, _, role = key.rpartition(".")
        if role == PACKED:
            modules[prefix] = {PACKED: key}
    stray = []
    for key in sorted(headers):
        prefix, _, role = key.rpartition(".")
        if role in COMPANIONS:
            (modules[prefix].__setitem__(role, key) if prefix in modules else stray.append(key))
    return modules, stray


def config_int(qc: dict, field: str, allowed: Iterable[int] | None, default=None) -> tuple[int | None, str | None]:
    """An integer field of quantization_config, or why it is not one of `allowed`."""
    value = qc.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int):
        return None, f"{field} must be an integer, not {value!r}"
    allowed = list(allowed) if allowed is not None else None
    if allowed is not None and value not in allowed:
        return None, f"{field} {value} is not one qfinal reads ({' / '.join(map(str, allowed))})"
    return value, None


def group_size_error(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value > 0):
        return f"group_size must be a positive integer or -1, not {value!r}"
    return None


def group_count(in_features: int, group_size: int) -> int:
    """Groups over `in_features` input columns (-1: one group)."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


class PackedIntFormat(QuantFormat):
    """The config reading, header checks and key classification GPTQ and AWQ share."""

    quantized_classes: tuple[str, ...] = ()

    def config_errors(self, qc: dict) -> list[str]:
        """What is wrong with the format's quantization_config fields (those qfinal reads)."""
        raise NotImplementedError

    def read_scheme(self, qc: dict) -> IntScheme:
        """The scheme of a quantization_config `config_errors` finds nothing wrong with."""
        raise NotImplementedError

    def scheme(self, raw_config: dict, where: str) -> IntScheme:
        qc = raw_config["quantization_config"]
        errors = self.config_errors(qc)
        if errors:
            raise CheckpointError(f"{self.name} quantization_config: {errors[0]}", where=where)
        scheme = self.read_scheme(qc)
        return replace(scheme, method=self.label(scheme))

    def module_problem(self, parts: dict[str, str], headers: dict, scheme: IntScheme) -> tuple[str | None, list[int]]:
        """Why one module's stored tensors do not match `scheme` (or None) and its weight's [out, in]."""
        raise NotImplementedError

    def label(self, scheme: IntScheme) -> str:
        zeros = "sym" if scheme.sym else "asym"
        group = "per-channel" if scheme.group_size == -1 else f"group {scheme.group_size}"
        return f"{self.name} int{scheme.bits} {group} {zeros}" + (" act-order" if scheme.desc_act else "")

    def detect(self, raw_config: dict) -> bool:
        qc = raw_config.get("quantization_config")
        return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == self.name

    def is_quant_state_key(self, key: str) -> bool:
        return key.rpartition(".")[2] in COMPANIONS

    def packed_weight_keys(self, tensors: Iterable[str]) -> set[str]:
        return {k for k in tensors if k.rpartition(".")[2] == PACKED}

    def quant_state_findings(
        self, raw_config: dict, inventory, quantized_modules: Iterable[str] | None, key_of: Callable[[str], str | None]
    ) -> list[Finding]:
        """Config fields; every qweight with all its companions, each of the dtype and shape the
        scheme implies; no companion without its qweight, no dense weight beside a qweight; when
        `quantized_modules` is given, each of them holds a qweight."""
        qc = raw_config["quantization_config"]
        headers = {k: (e.dtype, list(e.shape)) for k, e in inventory.tensors.items()}
        problems: list[tuple[str | None, str]] = [(CONFIG_WHERE, e) for e in self.config_errors(qc)]
        if not problems:
            scheme = self.scheme(raw_config, CONFIG_WHERE)
            problems = self._tensor_problems(headers, scheme, quantized_modules, key_of)
        if problems:
            return problem_findings(problems)
        count = len(module_parts(headers)[0])
        return matched_findings(f"({self.label(scheme)}): {count} packed weight(s)")

    def _tensor_problems(self, headers, scheme, quantized_modules, key_of) -> list[tuple[str | None, str]]:
        modules, stray = module_parts(headers)
        problems: list[tuple[str | None, str]] = []
        if not modules:
            problems.append(
                (
                    CONFIG_WHERE,
                    f"quantization_config says quant_method {self.name!r} but no qweight tensors are present",
                )
            )
        if stray:
            problems.append((stray[0], f"{len(stray)} quant-state tensor(s) belong to no qweight: {listing(stray)}"))
        dense = sorted(p + ".weight" for p in modules if p + ".weight" in headers)
        if dense:
            problems.append((dense[0], f"{len(dense)} module(s) store both weight and qweight: {listing(dense)}"))
        for prefix in sorted(modules):
            why, _ = self.module_problem(modules[prefix], headers, scheme)
            if why:
                problems.append((modules[prefix][PACKED], why))
        for module in sorted(set(quantized_modules or ())):
            if key_of(f"{module}.{PACKED}") is None and f"{module}.{PACKED}" not in headers:
                problems.append((f"{module}.{PACKED}", f"quantized module {module} has no qweight"))
        return problems

    def find_weights(self, headers: dict, read: Read, scheme: Scheme, where: str) -> list[StoredWeight]:
        modules, stray = module_parts(headers)
        if stray:
            raise CheckpointError(f"quant-state tensor(s) without a qweight: {listing(stray, 3)}", where=where)
        if not modules:
            raise CheckpointError(
                f"config.json says quant_method {self.name!r} but no qweight tensors were found", where=where
            )
        found = []
        for prefix in sorted(modules):
            parts = modules[prefix]
            why, shape = self.module_problem(parts, headers, scheme)
            if why:
                raise CheckpointError(why, where=f"{where}: {parts[PACKED]}")
            if prefix + ".weight" in headers:
                raise CheckpointError("module stores both weight and qweight", where=f"{where}: {prefix}")
            found.append(PackedWeight(prefix + ".weight", f"{self.name}-int{scheme.bits}", parts, shape, scheme=scheme))
        return found

    def verify_reference(self, model_class, folder):
        """GPTQModel's own dequantization (transformers' load needs optimum / gptqmodel and keeps
        the weights packed, with no dequantize())."""
        from qfinal.formats.int_packing_reference import library_reference

        return library_reference(self, model_class, folder)


def shape_problem(role: str, got: list[int], want: list[int], why: str) -> str | None:
    """A finding message when a stored shape is not the one the scheme implies."""
    if list(got) == list(want):
        return None
    return f"{role} has shape {list(got)}, {why} needs {list(want)}"
