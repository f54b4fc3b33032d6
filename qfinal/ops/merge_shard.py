"""The per-shard work of `qfinal merge`: one output shard written from the base's tensors and the adapters.

`merge_shard(spec)` is top-level and its spec picklable, so an executor (`ops.executors`) can run it
in this process, a pool or on Ray. Each process builds its `Session` once per job (the base's
headers, each adapter injected by peft into a hollow copy of the base, `adapters.deltas`, its
tensors read per module as it merges) and keeps it for the job's other shards. A shard's tensors
are produced one at a time: a tensor no adapter touches is the base's (cast to the output dtype;
dequantized for a bnb base); a tensor of a merged module comes from that module's merge, adapter
after adapter in the order given (peft's result of `merge_and_unload()` once per adapter, loaded in
turn). A module whose tensors sit in two shards is merged once in each: what each shard keeps is
the same.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from qfinal.checkpoint import writer as _shards
from qfinal.checkpoint.row_slabs import Workspace
from qfinal.errors import CheckpointError


@dataclass(frozen=True)
class MergeJob:
    """What every shard of one merge shares; picklable, and the key of a process's cached Session."""

    base: str  # the base's folder
    confine_to: str  # files must resolve inside it
    adapters: tuple[tuple[str, str | None], ...]  # (folder, name; None: named as `prepare_all` names it)
    dtype: str | None  # output dtype of floating tensors; None: as stored (dense base only)
    config: dict = field(hash=False)  # the base's config.json, read once by the planning
    allow_pickle: bool = False


@dataclass(frozen=True)
class ShardSpec:
    job: MergeJob
    path: str  # the output file (in the run's temporary folder)
    keys: tuple[str, ...]  # the output tensors it holds


@dataclass
class OutTensor:
    """One output tensor as planned: its dtype, shape, and how to make it (bnb: the plan item)."""

    dtype: torch.dtype
    shape: list[int]
    item: object | None = None  # dequantize_plan.PlanItem for a bnb base

    def numel(self) -> int:
        return math.prod(self.shape)

    def shape_bytes(self) -> int:
        return self.numel() * self.dtype.itemsize


class Session:
    """A process's view of one job: the base's tensors by output name, and one merger per adapter."""

    def __init__(self, job: MergeJob):
        from qfinal.checkpoint.heap import keep_heap_flat
        from qfinal.ops.merge_base import open_base

        keep_heap_flat()  # adapters are read per module: their frees would raise glibc's mmap threshold
        self.job = job
        self.base = open_base(job)
        self.mergers = self.base.mergers(job)
        self.unit_keys: dict[str, tuple[str, ...]] = {}
        for merger in self.mergers:
            for path, keys in merger.units.items():
                known = self.unit_keys.setdefault(path, keys)
                if set(known) != set(keys):
                    raise CheckpointError(
                        f"adapters disagree on the tensors of module {path!r}",
                        where=str(merger.prep.spec.path),
                        hint="merge them one at a time",
                    )
        self.unit_of = {key: path for path, keys in self.unit_keys.items() for key in keys}
        self.shapes = {key: out.shape for key, out in self.base.out.items()}
        self.row_merges = self._row_merges()
        self.workspace = Workspace()  # slab buffers, reused: a slab is written before the next is read

    def close(self) -> None:
        self.base.close()

    def _row_merges(self) -> dict[str, tuple[str, list, list]]:
        """Units every adapter merges as a plain LoRA (`adapters.lora_rows`) and no adapter file
        replaces a tensor of: unit path -> (its weight's key, its mergers in merge order, the slabs)."""
        from qfinal.adapters.lora_rows import merge_bounds

        rows: dict[str, tuple[str, list, list]] = {}
        for path, keys in self.unit_keys.items():
            found, deltas, mergers = set(), [], []
            for merger in self.mergers:
                if any(key in merger.overrides for key in keys):
                    break
                if path in merger.units:
                    row = merger.row_delta(path, self.shapes)
                    if row is None:
                        break
                    found.add(row[0])
                    deltas.append(row[1])
                    mergers.append(merger)
            else:
                if len(found) == 1:
                    key = found.pop()
                    bounds = merge_bounds(*self.shapes[key])
                    if all(delta.exact_in(bounds) for delta in deltas):
                        rows[path] = (key, mergers, bounds)
        return rows

    def _row_slabs(self, key: str, path: str | None):
        """(first row, slab) of `key` with the row-wise deltas of its unit's adapters added, each
        adapter's tensors in memory meanwhile (`path` None or not a row unit: the base's slabs)."""
        rows = self.row_merges.get(path)
        if rows is None or rows[0] != key:
            yield from self.base.slabs(key, self.base.slab_bounds(key), self.workspace)
            return
        with ExitStack() as held:
            deltas = []
            for merger in rows[1]:
                held.enter_context(merger.loaded(path))
                deltas.append(merger.row_delta(path, self.shapes)[1])
            for first, slab in self.base.slabs(key, rows[2], self.workspace):
                for delta in deltas:
                    delta.add_to(first, slab, self.workspace)
                yield first, slab

    def pieces(self, keys):
        """(key, byte offset or None, tensor) for `keys` in order, in the output dtype: a large tensor
        in slabs of rows at their offsets (None: the tensor whole). A module peft merges as a whole
        gives its other tensors later, when their turn comes."""
        wanted, pending = set(keys), {}
        for key in keys:
            out = self.base.out[key]
            if key in pending:
                yield key, None, _cast(pending.pop(key), out, key)
                continue
            path = self.unit_of.get(key)
            rows = self.row_merges.get(path)
            overridden = any(key in merger.overrides for merger in self.mergers)
            if (path is None or rows is not None) and not overridden:
                row_bytes = math.prod(out.shape[1:]) * out.dtype.itemsize
                for first, slab in self._row_slabs(key, path):
                    yield key, first * row_bytes, _cast(slab, out, key, whole=False)
                continue
            if path is None:
                yield key, None, _cast(self._start(key), out, key)
                continue
            unit = self._unit(path)
            value = unit.pop(key)
            pending.update((k, v) for k, v in unit.items() if k in wanted)
            yield key, None, _cast(value, out, key)

    def _start(self, key: str) -> torch.Tensor:
        """The tensor before the adapters merge: the last one's file copy of it (an embedding layer
        saved with the adapter replaces the base's as the adapter loads), else the base's."""
        for merger in reversed(self.mergers):
            if key in merger.overrides:
                return merger.overrides[key].clone()
        return self.base.tensor(key)

    def _unit(self, path: str) -> dict[str, torch.Tensor]:
        """A module's tensors after every adapter merged, in order (each on the previous result)."""
        unit: dict[str, torch.Tensor | None] = dict.fromkeys(self.unit_keys[path])
        for merger in self.mergers:
            for k in unit:
                if k in merger.overrides:
                    unit[k] = merger.overrides[k].clone()
            if path in merger.units:
                unit = {k: self.base.tensor(k) if v is None else v for k, v in unit.items()}
                unit = merger.merge_unit(path, unit)
        return {k: self.base.tensor(k) if v is None else v for k, v in unit.items()}


def _cast(value: torch.Tensor, out: OutTensor, key: str, whole: bool = True) -> torch.Tensor:
    if whole and list(value.shape) != list(out.shape):
        raise CheckpointError(f"merged tensor {key!r} has shape {list(value.shape)}, the base {out.shape}")
    return value.to(out.dtype).contiguous()


_SESSION: tuple[MergeJob, Session] | None = None


def session_for(job: MergeJob) -> Session:
    """This process's Session for `job` (the previous job's is closed)."""
    global _SESSION
    if _SESSION is not None and _SESSION[0] == job:
        return _SESSION[1]
    if _SESSION is not None:
        _SESSION[1].close()
        _SESSION = None
    session = Session(job)
    _SESSION = (job, session)
    return session


def release_session() -> None:
    global _SESSION
    if _SESSION is not None:
        _SESSION[1].close()
        _SESSION = None


def merge_shard(spec: ShardSpec) -> None:
    """Write one output shard of the merge (`spec.path`); the executors' per-shard function."""
    from qfinal.ops.executors import advance

    session = session_for(spec.job)
    out = session.base.out
    entries = [(k, out[k].dtype, out[k].shape) for k in spec.keys]
    with _shards.ShardWriter(spec.path, entries, metadata={"format": "pt"}) as writer:
        done = None
        for key, at, tensor in session.pieces(spec.keys):
            if at is None:
                writer.write(key, tensor)
            else:
                writer.write_part(key, at, tensor)
            del tensor
            if key != done:
                done = key
                advance(1)


def outline_shard(spec: ShardSpec) -> None:
    """The shard's header at its full size, its data a hole (a sparse file, no disk, no merge): the
    checkpoint a dry run of `merge --quantize` plans the quantize step from."""
    out = session_for(spec.job).base.out
    header, layout = _shards.safetensors_layout([(k, out[k].dtype, out[k].shape) for k in spec.keys], {"format": "pt"})
    _shards.write_header_stub(spec.path, header, len(header) + max((end for *_x, end in layout.values()), default=0))
