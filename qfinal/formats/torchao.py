"""torchao weight-only checkpoints (quant_method "torchao"): int8 weight-only (`Int8WeightOnlyConfig`,
one scale per row) and intx (`IntxWeightOnlyConfig`, int1..int8 unpacked to int8, per group or per
row), as transformers' save_pretrained writes them (layout: `formats/torchao_state.py`).

A weight's value is torchao's `dequantize_affine`: the int8 codes cast to the weight's dtype, minus
the zero point cast the same way, times the scale (in the wider of the two dtypes), cast to the
weight's dtype once: `weight.dequantize()` of the loaded tensor subclass, bit for bit. Written in
plain torch, so `qfinal dequantize` needs no torchao. transformers loads these checkpoints
faithfully on the CPU but cannot dequantize the model (`model.dequantize()` raises
NotImplementedError): `dequantize_in_memory` does it here.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator

from qfinal.errors import CheckpointError
from qfinal.formats.base import (
    QuantFormat,
    Read,
    Scheme,
    StoredWeight,
    finish_dequantized,
    listing,
    matched_findings,
    problem_findings,
)
from qfinal.formats.torchao_state import (
    component_of,
    file_metadata,
    group_components,
    metadata_problems,
    parse_scheme,
    stored_weight,
    weight_problem,
)
from qfinal.report import Finding

_WHERE = "config.json:quantization_config"


def dequantize_affine(qdata, scale, zero_point, block: list[int], dtype):
    """torchao's `_dequantize_affine_no_dtype_check` for integer codes, in `dtype`: the same
    operations on the same dtypes, the scales broadcast over their blocks."""
    grouped, reduced = [], []
    for size, b in zip(qdata.shape, block):
        grouped += [size // b, b]
        reduced += [size // b, 1]
    out = qdata.to(dtype, copy=True).view(grouped)
    if zero_point is not None:
        out = out - zero_point.reshape(reduced).to(dtype)
    out = out * scale.reshape(reduced)
    return out.view(qdata.shape).to(dtype)


def _torchao_tensors(model) -> Iterator[tuple[str, str, object, object]]:
    """(module name, parameter name, module, tensor) for each torchao tensor subclass parameter.
    Without torchao imported no model can hold one, and it is not imported here."""
    if "torchao" not in sys.modules:
        return
    from torchao.utils import TorchAOBaseTensor

    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if isinstance(param, TorchAOBaseTensor):
                yield module_name, param_name, module, param


def _method_of(tensor) -> str:
    target = getattr(tensor, "target_dtype", None)
    name = str(target).removeprefix("torch.") if target is not None else "int8"
    return "torchao-int8" if type(tensor).__name__ == "Int8Tensor" else f"torchao-intx-{name}"


class TorchAO(QuantFormat):
    name = "torchao"
    quantized_classes = ()  # transformers keeps nn.Linear; the weight becomes a tensor subclass

    def load_refusal(self, raw_config: dict) -> str | None:
        """None for the schemes qfinal reads: transformers' torchao quantizer rebuilds them on the CPU
        bit for bit (tests/test_format_torchao.py). Other torchao configs are not checked."""
        try:
            parse_scheme(raw_config)
        except (ValueError, KeyError) as err:
            return f"{err}; qfinal cannot check that it loads faithfully"
        return None

    def detect(self, raw_config: dict) -> bool:
        qc = raw_config.get("quantization_config")
        return isinstance(qc, dict) and qc.get("quant_method") == "torchao"

    def scheme(self, raw_config: dict, where: str) -> Scheme:
        try:
            return parse_scheme(raw_config)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"torchao quantization_config: {err}", where=where) from None

    def is_quant_state_key(self, key: str) -> bool:
        found = component_of(key)
        return found is not None and found[1] != "qdata"

    def packed_weight_keys(self, tensors: Iterable[str]) -> set[str]:
        return {k for k in tensors if (c := component_of(k)) is not None and c[1] == "qdata"}

    def quant_state_findings(
        self, raw_config: dict, inventory, quantized_modules: Iterable[str] | None, key_of: Callable[[str], str | None]
    ) -> list[Finding]:
        """Config; every weight with all its components, of consistent dtypes and shapes; no stray
        component; a plain weight beside its components; the metadata transformers rebuilds from."""
        try:
            scheme = parse_scheme(raw_config)
        except (ValueError, KeyError) as err:
            return problem_findings([(_WHERE, f"torchao quantization_config: {err}")])
        headers = {k: (e.dtype, list(e.shape)) for k, e in inventory.tensors.items()}
        problems, weights = self._header_problems(headers, scheme, quantized_modules, key_of)
        if not problems and inventory.format == "safetensors":
            metadata = file_metadata(inventory)
            if metadata is not None:
                problems = [(_WHERE, p) for p in metadata_problems(metadata, weights, scheme)]
        if problems:
            return problem_findings(problems)
        grouping = "per row" if scheme.group is None else f"group {scheme.group}"
        return matched_findings(f"({scheme.method}, {grouping}, {scheme.dtype}): {len(weights)} quantized weight(s)")

    def _header_problems(self, headers, scheme, quantized_modules, key_of):
        problems: list[tuple[str | None, str]] = []
        grouped, twice = group_components(headers)
        if twice:
            problems.append((twice[0], f"components stored twice: {listing(twice)}"))
        weights = []
        for name, parts in grouped.items():
            why = weight_problem(name, parts, headers, scheme)
            if why:
                problems.append((next(iter(parts.values())), why))
            else:
                weights.append(stored_weight(name, parts, headers, scheme))
        shadowed = sorted(name for name in grouped if name in headers)
        if shadowed:
            problems.append(
                (shadowed[0], f"plain tensor(s) stored beside their torchao components: {listing(shadowed)}")
            )
        if not grouped:
            problems.append((_WHERE, "quantization_config says torchao but no `_<param>_qdata` tensors are present"))
        for module in sorted(set(quantized_modules or ())):
            if key_of(f"{module}._weight_qdata") is None and key_of(f"{module}.weight") is not None:
                problems.append((key_of(f"{module}.weight"), f"quantized module {module} lacks its _weight_qdata"))
        return problems, weights

    def find_weights(self, headers: dict, read: Read, scheme: Scheme, where: str) -> list[StoredWeight]:
        grouped, twice = group_components(headers)
        if twice:
            raise CheckpointError(f"torchao components stored twice: {listing(twice, 3)}", where=where)
        found = []
        for name, parts in grouped.items():
            why = weight_problem(name, parts, headers, scheme)
            if why:
                raise CheckpointError(why, where=f"{where}: {name}")
            if name in headers:
                raise CheckpointError(f"{name} is stored both plain and as torchao components", where=where)
            found.append(stored_weight(name, parts, headers, scheme))
        if not found:
            raise CheckpointError("config.json says torchao but no `_<param>_qdata` tensors were found", where=where)
        return found

    def dequantize(self, weight: StoredWeight, read: Read, where: str):
        """In the weight's own dtype (config.json's), as torchao's dequantize() (the caller casts)."""
        import torch

        zero = weight.parts.get("zero_point")
        try:
            return dequantize_affine(
                read(weight.parts["qdata"]),
                read(weight.parts["scale"]),
                read(zero) if zero else None,
                weight.block,
                getattr(torch, weight.dtype),
            )
        except RuntimeError as err:
            raise CheckpointError(
                f"cannot dequantize torchao weight ({err})", where=f"{where}: {weight.name}"
            ) from None

    def loaded_method(self, model) -> str | None:
        return next((_method_of(t) for *_, t in _torchao_tensors(model)), None)

    def state_tensors(self, model) -> Iterator[tuple[str, object]]:
        """The scales and zero points inside each torchao weight (NaN checks see them)."""
        for module_name, param_name, _module, tensor in _torchao_tensors(model):
            for part in ("scale", "zero_point"):
                value = getattr(tensor, part, None)
                if value is not None:
                    yield f"{module_name}._{param_name}_{part}", value

    def holds_packed_data(self, tensor) -> bool:
        return "torchao" in sys.modules and type(tensor).__module__.startswith("torchao.")

    def held_bytes(self, tensor) -> int | None:
        """The subclass's own components (qdata, scale, zero point), as it flattens itself."""
        if not self.holds_packed_data(tensor):
            return None
        parts = (getattr(tensor, attr, None) for attr in tensor.__tensor_flatten__()[0])
        return sum(p.numel() * p.element_size() for p in parts if p is not None)

    def planned_sizes(self, inventory) -> dict[str, int] | None:
        """transformers rebuilds each torchao weight from its stored components unchanged (same
        shapes and dtypes), so it holds exactly their bytes."""
        sizes: dict[str, int] = {}
        for key, entry in inventory.tensors.items():
            found = component_of(key)
            if found:
                sizes[found[0]] = sizes.get(found[0], 0) + entry.nbytes
        return sizes or None

    def dequantize_in_memory(self, model, dtype, original_classes: dict[str, str]) -> str:
        """Each torchao weight replaced by its `dequantize()` (transformers raises
        NotImplementedError here), the quantization config removed as transformers' dequantize
        removes it, then one dtype for every floating tensor."""
        import torch

        count = 0
        for _name, param_name, module, tensor in list(_torchao_tensors(model)):
            setattr(module, param_name, torch.nn.Parameter(tensor.dequantize(), requires_grad=False))
            count += 1
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        return f"{count} torchao weight(s) dequantized to {str(dtype).removeprefix('torch.')}; " + (
            finish_dequantized(model, dtype, original_classes)
        )

    def describe_method(self, hf_quantizer) -> str:
        if hf_quantizer is None:
            return "none"
        quant_type = getattr(hf_quantizer.quantization_config, "quant_type", None)
        return f"torchao ({type(quant_type).__name__})"

    def converted_and_skipped(self, model, original_classes: dict[str, str], hf_quantizer, user_skips):
        converted, skipped = [], []
        quantized = {name for name, *_ in _torchao_tensors(model)}
        for name, module in model.named_modules():
            before = original_classes.get(name)
            if before is None:
                continue
            if name in quantized:
                converted.append({"module": name, "from": before, "to": f"{before} (torchao weight)"})
            elif before == "Linear":
                skipped.append({"module": name, "reason": "not converted by the torchao quantizer"})
        return converted, skipped


TORCHAO = TorchAO()
