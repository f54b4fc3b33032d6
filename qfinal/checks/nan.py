"""nan_inf: NaN or Inf in any floating tensor of the finalized model, quant state included.

The scan runs on every full load, so it is written for speed: two reductions per tensor, and
embedding tables read from their file rather than paged in (see `_all_finite`).
"""

from __future__ import annotations

from qfinal.formats import holds_packed_data, state_tensors
from qfinal.report import Finding

_SCAN_CHUNK = 1 << 20  # bytes read from a file at a time: a multiple of every element size, L2-sized


def _finite_range(values) -> bool:
    import torch

    lo, hi = torch.aminmax(values)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _all_finite(tensor, views=None, buffer: bytearray | None = None) -> bool:
    """min and max propagate NaN and reach ±Inf: two reductions and no boolean temporary, much
    faster than isfinite().all(), which once made up most of a load's overhead over transformers.

    With `views` (a `residency.FileViews`), a tensor that is a never-written view of a mapped file
    and not yet resident is read from the file in chunks, so the scan does not page it in (an
    embedding table, of which a forward pass reads a few rows)."""
    import torch

    if tensor.numel() == 0:
        return True
    flat = tensor.detach().reshape(-1)
    where = views.file_view(flat, unless_resident=True) if views is not None else None
    if where is None:
        return _finite_range(flat)
    from qfinal.checkpoint.residency import read_chunks

    fd, offset = where
    nbytes = flat.numel() * flat.element_size()
    for chunk in read_chunks(fd, offset, nbytes, buffer if buffer is not None else bytearray(_SCAN_CHUNK)):
        if not _finite_range(torch.frombuffer(chunk, dtype=flat.dtype)):
            return False
    return True


def _float_tensors(model):
    """(name, tensor) for every floating parameter, buffer and quant-state tensor, once each."""
    seen = set()
    items = list(model.named_parameters()) + list(model.named_buffers()) + list(state_tensors(model))
    for name, tensor in items:
        if tensor is None or not hasattr(tensor, "is_floating_point") or not tensor.is_floating_point():
            continue
        if tensor.device.type == "meta" or id(tensor) in seen:
            continue
        if holds_packed_data(tensor):
            continue  # packed codes: their bytes are not values
        seen.add(id(tensor))
        yield name, tensor


def _lookup_tables(model) -> set[int]:
    """ids of the tensors a forward pass reads only a few rows of: embedding tables, unless a
    non-embedding module (a tied output head) also uses them, which reads all of them."""
    import torch

    tables, used_whole = set(), set()
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False)]
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            tables.update(id(p) for p in own)
        else:
            used_whole.update(id(p) for p in own)
    return tables - used_whole


def nan_findings(model, prescan=None) -> list[Finding]:
    """nan_inf: NaN or Inf in any floating tensor of the finalized model (quant-state scales included).

    With `prescan` (a `prescan.Prescan` that read the checkpoint files while torch was imported),
    a tensor proven a never-written view of a file span it found clean is not read again.
    Embedding tables are read from their file when they are untouched views of it (see
    `_all_finite`): the forward pass pages in only the rows it looks up. Every other tensor is
    read where it is: the forward pass reads it whole anyway, and reading a file costs a copy."""
    import torch

    from qfinal.checkpoint.residency import FileViews

    out = []
    buffer = bytearray(_SCAN_CHUNK)
    tables = _lookup_tables(model)
    if prescan is not None:
        prescan.stop()
    with torch.no_grad(), FileViews() as views:
        for name, tensor in _float_tensors(model):
            if prescan is not None:
                where = views.locate(tensor)
                if where is not None and prescan.clean(where):
                    continue
            if _all_finite(tensor, views if id(tensor) in tables else None, buffer):
                continue
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            out.append(
                Finding(
                    check="nan_inf",
                    severity="error",
                    key=name,
                    message=f"{nan} NaN and {inf} Inf value(s) in {tensor.numel()} "
                    f"({str(tensor.dtype).removeprefix('torch.')})",
                )
            )
    return out
