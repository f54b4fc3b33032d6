"""Stage 3: stream the checkpoint into the skeleton along the device map.

transformers' loader reads safetensors lazily (mmap slices) and converts / quantizes tensor by
tensor; accelerate writes the disk-offloaded part. Keys the checkpoint lacks are then moved off
meta and initialized exactly as `from_pretrained` does, so later checks see what users would get.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from qfinal.compat import transformers as _hf
from qfinal.pipeline.context import Context, Outcome
from qfinal.report import MismatchedKey
from qfinal.pipeline.stages.base import BaseStage


def refuse_inconsistent_quant_state(ctx: Context) -> None:
    """A pre-quantized checkpoint whose quant state disagrees with its quantization_config (a
    module without its absmax or quant_state blob, state left over from another method) cannot be
    loaded faithfully: transformers crashes trying to initialize packed bytes at random. Refuse it
    from the headers, before reading data, with the first problem named."""
    if ctx.inventory.format != "safetensors":
        return
    from qfinal.checks import core as checks
    from qfinal.checkpoint.inventory import _error
    from qfinal.checkpoint.sources import read_config_json
    from qfinal.ops.validate import prequantized_modules
    from qfinal.pipeline.stages.validate import checkpoint_lookup

    raw = read_config_json(ctx.source.folder)
    lookup = checkpoint_lookup(ctx.inventory.tensors, ctx.model.base_model_prefix)
    errors = [f for f in checks.quantization_findings(raw, ctx.inventory, prequantized_modules(raw, ctx.report), lookup)
              if f.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise _error(f"the bitsandbytes checkpoint cannot be loaded: {errors[0].message}{more}", file="config.json",
                     check="quantization_config",
                     hint="run `qfinal validate --fast` for every problem; re-export the quantized checkpoint")


def _quantizes_on_load(ctx: Context) -> bool:
    q = ctx.hf_quantizer
    return q is not None and not q.pre_quantized and ctx.inventory.format == "safetensors"


TRIM_EVERY_BYTES = 64 << 20  # about one decoder layer of a 1B model in bf16


class HeapReleaser:
    """Gives glibc's free heap pages back to the kernel after every `every` bytes read.

    Quantizing on load allocates the kernel's fp32 temporaries (and the small tensors' copies)
    through malloc and keeps the small packed results: these end up between the freed blocks, so
    the heap cannot shrink from its top, and from run to run it kept hundreds of MB the process
    never used again (main arena 0.8 GB in one run, 1.7 GB in the next: same nf4 load of the 1.1B
    bench checkpoint, peak RSS 1400-2270 MiB). `malloc_trim(0)` returns the free pages in the middle
    of the heap as well; once per ~64 MB read it held that peak at 1365-1411 MiB in every run with
    no measurable cost (before every read: +1 s). It changes no allocator setting. Outside glibc it
    does nothing.
    """

    def __init__(self, every: int | None = None):
        import ctypes

        try:
            self._trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):
            self._trim = None
        self.every = TRIM_EVERY_BYTES if every is None else every
        self.pending = 0

    def before_read(self, nbytes: int) -> None:
        """Called as each tensor is read: the temporaries of the ones before it are freed by now."""
        if self._trim is None:
            return
        if self.pending >= self.every:
            self.release()
            self.pending = 0
        self.pending += nbytes

    def release(self) -> None:
        self._trim(0)


# Tensors of at least this many bytes are mapped (their own mapping), smaller ones copied with pread:
# a mapping costs a few system calls and an entry in the process's map table (vm.max_map_count),
# and the unquantized small tensors (norms, biases) stay alive with the model.
MAP_AT_LEAST = 1 << 20


class TensorSlice:
    """One checkpoint tensor, read when transformers' loader indexes it (`slice[...]`).

    A tensor of MAP_AT_LEAST bytes or more gets a private mapping of just its own pages, which
    goes when the tensor does: quantized, it is freed and unmapped, and no shard page stays in RSS
    (one whole-shard mapping, as safetensors makes, stays alive while any unquantized leaf of that
    shard does). Mapping reads the page cache in place; a `preadv` into a new buffer copied every
    byte and faulted in fresh memory: nf4 load of the 1.1B bench checkpoint 22.8-25.7 s / 1.36 GB
    with the copy, 21.6-22.3 s / 1.11 GB mapped (bench/README "sixth performance pass"). Smaller
    tensors are read with one `preadv`. transformers loads synchronously when it quantizes on the
    fly: one tensor is read, quantized and freed at a time, in its main thread. The bytes are the
    file's, so the tensor equals safetensors' bit for bit.
    """

    __slots__ = ("fd", "offset", "shape", "dtype", "st_dtype", "file", "nbytes", "heap")

    def __init__(self, fd: int, offset: int, shape, dtype, st_dtype: str, file: str, nbytes: int,
                 heap: HeapReleaser | None = None):
        self.fd, self.offset, self.shape, self.dtype, self.st_dtype = fd, offset, list(shape), dtype, st_dtype
        self.file, self.nbytes, self.heap = file, nbytes, heap

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return self.st_dtype

    def _truncated(self):
        from qfinal.errors import CheckpointError

        return CheckpointError("file ended before the tensor's data (truncated while loading?)", where=self.file)

    def _mapped(self):
        import math
        import mmap
        import os

        import torch

        if os.fstat(self.fd).st_size < self.offset + self.nbytes:  # a page past the end would be a SIGBUS
            raise self._truncated()
        start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(self.fd, self.offset + self.nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        # the tensor holds the mapping: unmapped when the tensor (and every view of it) is freed
        return torch.frombuffer(mapping, dtype=self.dtype, count=math.prod(self.shape),
                                offset=self.offset - start).reshape(self.shape)

    def _read(self):
        import os

        import torch

        tensor = torch.empty(self.shape, dtype=self.dtype)
        if tensor.numel():
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], self.offset + done)
                if n <= 0:
                    raise self._truncated()
                done += n
        return tensor

    def __getitem__(self, index):
        if self.heap is not None:
            self.heap.before_read(self.nbytes)
        tensor = self._mapped() if self.nbytes and self.nbytes >= MAP_AT_LEAST else self._read()
        return tensor if index is Ellipsis else tensor[index]


@contextmanager
def read_tensor_by_tensor(files: list[str]):
    """Lazy `TensorSlice`s for every tensor: each is read, quantized and freed.

    Quantizing on load touches every page of the bf16 shards once; with safetensors' whole-file
    mappings those pages stay in the process's RSS until the file is closed, and the unquantized
    leaves (embeddings, norms, the head) keep every shard's mapping alive. On a 1.1B Llama
    (bench/README.md) this took the peak RSS from 3.8 GB to about 1.1 GB for nf4, the packed output
    bit-identical.
    """
    import os
    import struct

    from qfinal.checkpoint.inventory import read_safetensors_header
    from qfinal.checkpoint.writer import torch_dtype_of

    fds, state, heap = [], {}, HeapReleaser()
    try:
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            fds.append(fd)
            (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            entries, _meta = read_safetensors_header(Path(file))
            for key, entry in entries.items():
                state[key] = TensorSlice(fd, 8 + header_len + entry.start, entry.shape,
                                         torch_dtype_of(entry.dtype), entry.dtype, file, entry.nbytes, heap)
        yield state
    finally:
        for fd in fds:  # the mappings outlive their descriptor
            os.close(fd)


class CheckpointDispatch(BaseStage):
    name = "checkpoint_dispatch"

    def check(self, config) -> None:
        """Prove the offload folder usable by writing to it (or to its nearest existing ancestor):
        os.access() says yes to root everywhere, and to a regular file sitting where a folder goes."""
        import os
        import tempfile

        from qfinal.errors import OutputError

        if not config.offload_folder:
            return
        folder = config.offload_folder
        probe = os.path.abspath(folder)
        while not os.path.lexists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise OutputError(f"offload folder cannot be created: {probe} is not a folder", where=folder,
                              hint="choose a writable offload_folder")
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as err:
            raise OutputError(f"offload folder is not writable ({err.strerror or type(err).__name__})",
                              where=folder, hint="choose a writable offload_folder") from None

    def run(self, ctx: Context) -> Outcome:
        cfg = ctx.config
        model = ctx.model
        device_map = ctx.device_map
        if device_map is not None:
            device_map = _hf.get_device_map(model, device_map, cfg.max_memory, ctx.hf_quantizer)
        ctx.device_map = device_map
        if device_map and "disk" in device_map.values() and not cfg.offload_folder:
            from qfinal.errors import ConfigError

            raise ConfigError("the device map offloads to disk but no offload_folder is set",
                              where="offload_folder", hint="set offload_folder or raise max_memory")
        ctx.load_config = _hf.LoadStateDictConfig(
            pretrained_model_name_or_path=str(ctx.source.folder),
            ignore_mismatched_sizes=True,  # qfinal reports mismatches as findings instead of raising
            sharded_metadata=ctx.inventory.sharded_metadata,
            device_map=device_map,
            disk_offload_folder=cfg.offload_folder,
            dtype=ctx.dtype,
            dtype_plan=_hf.dtype_plan(model, ctx.dtype),
            hf_quantizer=ctx.hf_quantizer,
            weights_only=True,
            weight_mapping=_hf.weight_conversions(model, ctx.hf_quantizer),
            use_safetensors=ctx.inventory.format == "safetensors",
        )
        files = [str(p) for p in ctx.inventory.files]
        if ctx.hf_quantizer is not None and ctx.hf_quantizer.pre_quantized:
            refuse_inconsistent_quant_state(ctx)
        if ctx.inventory.format == "pickle":
            # transformers' torch.load(weights_only=True) raises UnpicklingError on a payload; check each
            # file first so the refusal is a CheckpointError that names the file.
            from qfinal.checkpoint.inventory import safe_torch_load

            for path in ctx.inventory.files:
                safe_torch_load(path)
        if _quantizes_on_load(ctx) and not (device_map and "disk" in device_map.values()):
            with read_tensor_by_tensor(files) as state:
                ctx.loading_info, ctx.disk_offload_index = _hf.load_checkpoint_into(model, files, ctx.load_config,
                                                                                    state)
        else:
            ctx.loading_info, ctx.disk_offload_index = _hf.load_checkpoint_into(model, files, ctx.load_config)
        _hf.materialize_missing(model, ctx.loading_info, ctx.load_config)

        keys = ctx.report.keys
        keys.mismatched = [MismatchedKey(key=k, checkpoint_shape=list(a), model_shape=list(b))
                           for k, a, b in sorted(ctx.loading_info.mismatched_keys)]
        if device_map:
            ctx.report.placement = {k: str(v) for k, v in device_map.items()}
        where = Counter(str(v) for v in (device_map or {"": "cpu"}).values())
        placed = ", ".join(f"{n} on {d}" for d, n in sorted(where.items()))
        return Outcome("ran", f"{len(files)} file(s) read; modules placed: {placed}")
