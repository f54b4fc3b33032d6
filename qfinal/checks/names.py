"""The named checks behind `validate`. Names are stable: CI filters, JSON and JUnit use them.

Header checks read only the inventory (safetensors headers + index) and the raw config.json, so
`validate --fast` and the full pipeline share them. Model checks need the finalized model.

Every check returns `Finding`s. A check with no error or warning finding passed; info findings
say what was looked at (and what an allow-list let through).
"""

from __future__ import annotations

CHECKS = (
    "checkpoint_files",
    "safetensors_header",
    "index_consistency",
    "file_confinement",
    "pickle_refused",
    "missing_keys",
    "unexpected_keys",
    "shape_mismatch",
    "dtype_consistency",
    "quantization_config",
    "meta_tensors",
    "tie_audit",
    "nan_inf",
    "adapter_coverage",
)

# Checkpoint-level checks: `inventory.inspect_checkpoint` reports them as `Problem`s.
HEADER_CHECKS = ("checkpoint_files", "safetensors_header", "index_consistency", "file_confinement", "pickle_refused")
# Checks that compare the checkpoint's keys, shapes and dtypes with the model; they need headers.
KEY_CHECKS = (
    "missing_keys",
    "unexpected_keys",
    "shape_mismatch",
    "dtype_consistency",
    "quantization_config",
    "tie_audit",
)
FULL_MODE_CHECKS = tuple(c for c in CHECKS if c != "adapter_coverage")
FAST_MODE_CHECKS = tuple(c for c in CHECKS if c not in ("nan_inf", "meta_tensors", "adapter_coverage"))
