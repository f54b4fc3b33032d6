"""The base of `qfinal merge`, read tensor by tensor: a dense safetensors checkpoint, or a bnb one
whose quantized weights are dequantized as `qfinal dequantize` does (bit for bit transformers'
`model.dequantize(dtype)`, Conv1D back in its [in, out] layout).

`open_base(job)` returns a `Base`: every output tensor's name, dtype and shape from the headers
(`out`, in file order), `files` (each input shard's output tensors: the output keeps the input's
sharding, one output shard per input shard), `tensor(key)` (the base's tensor in the output dtype,
owned, so a merge may change it in place) and `mergers(job)` (the adapters, each injected by peft
into a hollow copy of this base's model class).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qfinal.adapters.peft_types import streaming_merge_refusal
from qfinal.checkpoint.dtypes import element_size, torch_dtype_of
from qfinal.checkpoint.row_slabs import read_row_slabs, rows_per_slab, slab_bounds
from qfinal.errors import CheckpointError, ConfigError
from qfinal.ops.dequantize import DTYPES, materialize
from qfinal.ops.dequantize_plan import SourceReader, plan_items, stored_format
from qfinal.ops.merge_shard import MergeJob, OutTensor


class Base:
    def __init__(self, job: MergeJob):
        self.folder = Path(job.base)
        self.where = str(self.folder)
        self.config = job.config
        self.src = SourceReader(self.folder, Path(job.confine_to))
        self.fmt = self.scheme = None
        if self.config.get("quantization_config") is not None:
            self.fmt, self.scheme = stored_format(self.config, self.where)
        self.quantization = None
        self.out: dict[str, OutTensor] = {}
        self.files: list[tuple[str, list[str]]] = []
        try:
            if self.fmt is None:
                self._plan_dense(job.dtype)
            else:
                self._plan_bnb(job.dtype)
        except BaseException:
            self.src.close()
            raise
        self.dtype = self._model_dtype(job.dtype)

    def _plan_dense(self, dtype: str | None) -> None:
        want = DTYPES[dtype] if dtype else None
        by_file: dict[Path, list[str]] = {path: [] for path in self.src.paths}
        for key in sorted(self.src.headers):
            st_dtype, shape = self.src.headers[key]
            try:
                stored = torch_dtype_of(st_dtype)
            except ValueError:
                raise CheckpointError(f"unsupported tensor dtype {st_dtype}", where=f"{self.where}: {key}") from None
            self.out[key] = OutTensor(want if want is not None and stored.is_floating_point else stored, list(shape))
            by_file[self.src.files[key]].append(key)
        self.files = [(path.name, keys) for path, keys in by_file.items() if keys]

    def _plan_bnb(self, dtype: str | None) -> None:
        from qfinal.compat.transformers_layout import conv1d_layout

        scheme = self.scheme
        self.quantization = scheme.method + ("+double_quant" if scheme.double_quant else "")
        conv1d, shapes, prefix = conv1d_layout(self.folder, self.where, self.config)
        want = DTYPES[dtype or "float16"]
        items = plan_items(self.src, want, self.fmt, scheme, conv1d, shapes, prefix, self.where)
        by_file: dict[Path, list[str]] = {path: [] for path in self.src.paths}
        for item in items:
            self.out[item.name] = OutTensor(item.dtype, list(item.shape), item)
            by_file[self.src.files[next(iter(item.parts.values()))]].append(item.name)
        self.files = [(path.name, keys) for path, keys in by_file.items() if keys]

    def _model_dtype(self, dtype: str | None) -> torch.dtype:
        """The dtype transformers loads the model in: `dtype`, else config.json's (dtype="auto")."""
        if dtype:
            return DTYPES[dtype]
        if self.fmt is not None:
            return torch.float16
        named = self.config.get("dtype") or self.config.get("torch_dtype")
        return DTYPES.get(str(named).removeprefix("torch."), torch.float32)

    def tensor(self, key: str) -> torch.Tensor:
        """The base's tensor `key` in its output dtype and layout; owned by the caller."""
        out = self.out[key]
        if out.item is None:
            value = self.src.get(key)
            return value if value.dtype == out.dtype else value.to(out.dtype)
        return materialize(out.item, self.src, self.where)  # src.get and dequantize give fresh tensors

    def slab_bounds(self, key: str) -> list[tuple[int, int]]:
        """Row slabs in which to copy the base's tensor `key` (`checkpoint.row_slabs`)."""
        out = self.out[key]
        stored = self.src.headers[key][0] if out.item is None and key in self.src.headers else None
        widest = max(out.dtype.itemsize, element_size(stored) if stored else 4)
        return slab_bounds(out.shape[0] if out.shape else 1, rows_per_slab(out.shape, widest))

    def slabs(self, key: str, bounds, workspace):
        """(first row, slab) for each (start, end) of `bounds` of the base's tensor `key` in its output
        dtype, the caller's to change until it asks for the next: a dense tensor is read a slab at a
        time into `workspace`'s buffers (`checkpoint.row_slabs.Workspace`), a dequantized one whole
        (its slabs are row views)."""
        out = self.out[key]
        if out.item is None and (len(bounds) > 1 or out.shape):
            stored = torch_dtype_of(self.src.headers[key][0])
            path = str(self.src.files[key])
            for first, slab in read_row_slabs(path, key, stored, out.shape, bounds, workspace):
                if slab.dtype != out.dtype:
                    slab = workspace.take("cast", out.dtype, slab.shape).copy_(slab)
                yield first, slab
        elif len(bounds) == 1:
            yield 0, self.tensor(key)
        else:
            whole = self.tensor(key)
            for first, end in bounds:
                yield first, whole[first:end]

    def mergers(self, job: MergeJob) -> list:
        """One `AdapterMerger` per adapter of `job`, in order, on this base's model class and dtype."""
        from qfinal.adapters.deltas import AdapterMerger
        from qfinal.adapters.prepare import AdapterSpec, prepare_all

        hf_config, model_class = self.model_class()
        specs = [AdapterSpec(path=path, name=name, merge=True) for path, name in job.adapters]
        prepared = prepare_all(specs, job.allow_pickle, read=False)
        for prep in prepared:  # before any adapter is injected
            _refuse_streaming(prep)
        return [AdapterMerger(p, model_class, hf_config, self.dtype, self.out) for p in prepared]

    def model_class(self):
        import transformers

        from qfinal.compat.transformers_layout import architecture_class

        try:
            hf_config = transformers.AutoConfig.from_pretrained(self.folder)
        except Exception as err:  # transformers rejects the config
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"config.json cannot be parsed by transformers ({first})", where=self.where) from None
        if getattr(hf_config, "quantization_config", None) is not None:
            del hf_config.quantization_config  # the merged model is a plain one
        name, cls = architecture_class(hf_config)
        if cls is None:
            raise ConfigError(
                f"model class {name!r} is not in transformers",
                where=self.where,
                hint="config.json 'architectures' names the model peft merges into",
            )
        return hf_config, cls

    def close(self) -> None:
        self.src.close()


def _refuse_streaming(prep) -> None:
    """An adapter peft cannot merge into a hollow base (`peft_types.streaming_merge_refusal`)."""
    why = streaming_merge_refusal(str(prep.config.get("peft_type")))
    if why is not None:
        raise ConfigError(
            f"adapter '{prep.name}' cannot be merged shard by shard: {why}",
            where=str(prep.spec.path),
            hint="merge it in memory: qfinal save BASE OUT --adapter DIR --merge",
        )


def open_base(job: MergeJob) -> Base:
    return Base(job)
