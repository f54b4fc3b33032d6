"""qfinal: take a transformers checkpoint the last mile, and prove it correct.

Importing qfinal is cheap: torch and transformers load only when a model is touched.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load", "validate", "save", "dequantize_checkpoint", "__version__"]


def _quiet_torchao_import() -> None:
    """Once torchao is installed, transformers imports it with any model class: torchao logs each GPU
    kernel it cannot load here and torch a deprecation of torchao's enums, on every command and in
    every worker process. Those records only are dropped, before anything imports either library."""
    import logging

    def drop(logger: str, text: str) -> None:
        logging.getLogger(logger).addFilter(lambda record: text not in str(record.msg))

    drop("torchao", "Failed to load ")
    drop("torch.utils._pytree", "is an Enum subclass and is now natively supported")


_quiet_torchao_import()


def __getattr__(name: str):
    if name == "load":
        from qfinal.ops.load import load

        return load
    if name == "validate":
        from qfinal.ops.validate import validate

        return validate
    if name == "save":
        from qfinal.ops.save import save

        return save
    if name == "dequantize_checkpoint":
        from qfinal.ops.dequantize import dequantize_checkpoint

        return dequantize_checkpoint
    raise AttributeError(name)
