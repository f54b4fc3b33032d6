"""Pickle weights as untrusted input: told by name or content, loaded only with
torch.load(weights_only=True).

A pickle can run arbitrary code when it is loaded, so `inventory.inspect_checkpoint` refuses one
unless --allow-pickle is given, and even then `safe_torch_load` lets torch refuse anything but
tensors. Each refusal is a `CheckpointError` (check `pickle_refused`) naming the file.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

from qfinal.checkpoint.headers import (
    checkpoint_error,
    escape_key,
    file_signature,
    plausible_safetensors,
    zip_holds_pickle,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_pickle_file(path: Path) -> bool:
    """True for pickle weights, by extension or by content signature.

    Signatures: pickle protocol opcode \\x80 + protocol 2..5 at the start (unless the first 8
    bytes also make a plausible safetensors header length: \\x80\\x02 + six zero bytes is a valid
    640-byte header), or a zip whose entries include */data.pkl (torch.save's zip format).
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    sig = file_signature(head)
    if sig == "pickle":
        return not plausible_safetensors(head, size)
    if sig == "zip":
        return zip_holds_pickle(path)
    return False


def safe_torch_load(path: Path) -> dict:
    """Load pickle weights with torch.load(weights_only=True), which refuses arbitrary globals.

    Any refusal or read failure becomes a CheckpointError: the file is untrusted input, so a
    failure is the file's fault, not a qfinal bug. The result must be a str -> Tensor dict.
    """
    import pickle

    import torch

    path = Path(path)
    name = path.name
    hint = "convert the checkpoint to safetensors in a trusted environment, or get a safetensors copy"
    try:
        use_mmap = zipfile.is_zipfile(path)  # mmap needs the zip format
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+?)(?: was|\s|$)", str(err))
        detail = f" (it imports {escape_key(found.group(1)[:200])})" if found else ""
        raise checkpoint_error(
            f"refused: pickle would run code or build objects that "
            f"torch.load(weights_only=True) does not allow{detail}",
            file=name,
            check="pickle_refused",
            hint=hint,
        ) from None
    except Exception as err:  # noqa: BLE001 - any failure to parse untrusted bytes is the file's fault
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise checkpoint_error(
            f"cannot be loaded by torch.load ({type(err).__name__}: {escape_key(first)})",
            file=name,
            check="pickle_refused",
            hint=hint,
        ) from None
    if not isinstance(obj, dict):
        raise checkpoint_error(
            f"holds a {type(obj).__name__}, not a state dict of tensors", file=name, check="pickle_refused", hint=hint
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise checkpoint_error(
                f"state dict entry is a {type(value).__name__}, not a tensor",
                file=name,
                key=str(key),
                check="pickle_refused",
                hint=hint,
            )
    return obj
