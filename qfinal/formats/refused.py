"""Quantization methods qfinal refuses, with the reason: transformers loads their checkpoints
wrong without a word, and qfinal cannot read them yet.

Each is a `QuantFormat` that detects its quant_method so that every command says why instead of
going ahead: `load` and full `validate` refuse before a weight is read (`load_refusal`),
`validate --fast` reports an error finding, `dequantize` exits 2 with one line. It claims no stored
tensor as its quant state, so the key checks still list what transformers would drop.
"""

from __future__ import annotations

from typing import Callable, Iterable

from qfinal.errors import CheckpointError
from qfinal.formats.base import QuantFormat, Read, Scheme, StoredWeight
from qfinal.report import Finding

HQQ_REASON = (
    "transformers 5.23 cannot load pre-quantized HQQ checkpoints: with hqq installed it builds plain "
    "nn.Linear modules, drops every W_q/scale/zero tensor as unexpected and leaves the weights at their "
    "random initialization without an error (without hqq it raises ImportError); qfinal does not read "
    "HQQ yet"
)


class RefusedFormat(QuantFormat):
    """A quant_method detected only to be refused with `reason`."""

    readable = False

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason

    def load_refusal(self, raw_config: dict) -> str | None:
        return self.reason

    def detect(self, raw_config: dict) -> bool:
        qc = raw_config.get("quantization_config")
        return isinstance(qc, dict) and qc.get("quant_method") == self.name

    def scheme(self, raw_config: dict, where: str) -> Scheme:
        raise CheckpointError(self.reason, where=where)

    def is_quant_state_key(self, key: str) -> bool:
        return False

    def quant_state_findings(
        self, raw_config: dict, inventory, quantized_modules: Iterable[str] | None, key_of: Callable[[str], str | None]
    ) -> list[Finding]:
        return [
            Finding(
                check="quantization_config",
                severity="error",
                key="config.json:quantization_config",
                message=f"quant_method {self.name!r}: {self.reason}",
            )
        ]

    def find_weights(self, headers: dict, read: Read, scheme: Scheme, where: str) -> list[StoredWeight]:
        raise CheckpointError(f"{self.name} checkpoint: {self.reason}", where=where)

    def dequantize(self, weight: StoredWeight, read: Read, where: str):
        raise CheckpointError(f"{self.name} checkpoint: {self.reason}", where=where)


HQQ = RefusedFormat("hqq", HQQ_REASON)
