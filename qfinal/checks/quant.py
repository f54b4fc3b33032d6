"""quantization_config: config.json's quantization_config against the quant state actually stored.

Which format a checkpoint is in is decided by `qfinal.formats.format_for`; that format checks its
own state. Here: the cases no format owns (no quantization_config, or one qfinal does not read).
"""

from __future__ import annotations

from typing import Callable, Iterable

from qfinal.formats import FORMATS, format_for, supported_methods
from qfinal.formats.base import listing
from qfinal.report import Finding, Report


def prequantized_modules(raw_config: dict, report: Report) -> list[str] | None:
    """Modules whose checkpoint weights must carry quant state: those the quantizer converted, when
    config.json declares a quantization_config qfinal reads (a pre-quantized checkpoint)."""
    if format_for(raw_config) is None:
        return None
    return [c.module for c in report.keys.converted]


def quantization_findings(
    raw_config: dict,
    inventory,
    quantized_modules: Iterable[str] | None = None,
    key_of: Callable[[str], str | None] | None = None,
) -> list[Finding]:
    """quantization_config: config.json's quantization_config against the tensors actually present.

    Globally: quant state without a quantization_config (packed bytes would load as weights), the
    wrong kind of state for the declared format. Per module, when `quantized_modules` (the modules
    the quantizer converted) is given: each holds its weight and complete state, and no state
    belongs to a module the quantizer keeps in full precision. `key_of` maps a model key to the
    checkpoint key (base-model prefix differences).
    """
    tensors = inventory.tensors
    if not tensors:
        return []
    key_of = key_of or (lambda k: k if k in tensors else None)
    qc = raw_config.get("quantization_config")
    if qc is None:
        return _undeclared_state(tensors)
    fmt = format_for(raw_config)
    if fmt is None:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        return [
            Finding(
                check="quantization_config",
                severity="info",
                message=f"quant_method {method!r} is not checked by qfinal ({supported_methods()} only)",
            )
        ]
    return fmt.quant_state_findings(raw_config, inventory, quantized_modules, key_of)


def _undeclared_state(tensors) -> list[Finding]:
    """Quant state stored without a quantization_config: transformers would load it as weights."""
    for fmt in FORMATS.values():
        states = sorted(k for k in tensors if fmt.is_quant_state_key(k))
        if states:
            return [
                Finding(
                    check="quantization_config",
                    severity="error",
                    key="config.json:quantization_config",
                    message=f"the checkpoint holds {fmt.name} quant state ({len(states)} tensor(s), e.g. "
                    f"{listing(states, 3)}) but config.json has no quantization_config: "
                    "transformers would load packed bytes as weights",
                )
            ]
    return [
        Finding(
            check="quantization_config",
            severity="info",
            message="no quantization_config and no quant state in the checkpoint",
        )
    ]
