"""What `qfinal quantize` will write, decided before any weight is quantized.

The model is built on the meta device and transformers' bnb quantizer swaps its modules
(pipeline stages meta_init + quantizer_preprocess), so which modules are quantized, which keys
`save_pretrained` keeps (ties, `_keep_in_fp32_modules`, skipped modules) and the dtype each tensor is
cast to are transformers' own decisions. `plan_quantize` turns them into `TensorJob`s (one
checkpoint tensor -> the output tensors made of it) and shards them exactly as `save_pretrained`
does (huggingface_hub's greedy split, in state-dict order); each `ShardSpec` is a picklable unit
of work for `ops.quantize.quantize_shard`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from qfinal.checkpoint.dtypes import TORCH_TO_CODE, element_size
from qfinal.checkpoint.writer import shard_file_names
from qfinal.errors import CheckpointError

BLOCKSIZE = 64  # transformers' Linear4bit never sets another


@dataclass(frozen=True)
class QuantOptions:
    method: str  # "nf4" | "fp4" | "int8"
    double_quant: bool = False
    quant_storage: str = "uint8"


@dataclass
class TensorJob:
    """One checkpoint tensor and the output tensors made of it, (name, dtype name, shape) each."""

    key: str
    kind: str  # "copy", "4bit" or "int8"
    cast: str  # dtype name the loader casts it to first
    transpose: bool = False  # Conv1D: quantized as [out, in]
    outputs: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)
    offset: float | None = None  # double quant: the nested offset (absmax mean), known after a pre-pass


@dataclass
class ShardSpec:
    """Everything one worker needs to write one output shard (plain data: picklable)."""

    file_name: str
    source: str  # the checkpoint folder
    confine_to: str
    options: QuantOptions
    jobs: list[TensorJob]
    names: list[str]  # the output tensors this shard holds
    out_dir: str = ""  # the temporary output folder, set when it exists


def itemsize(dtype: str) -> int:
    """Bytes per element of the torch dtype named `dtype` ("bfloat16" -> 2)."""
    return element_size(TORCH_TO_CODE[dtype])


def nbytes(dtype: str, shape) -> int:
    return math.prod(shape) * itemsize(dtype)


def blob_length(job_shape, cast: str, options: QuantOptions, offset: float | None) -> int:
    """Bytes of the `quant_state.bitsandbytes__*` JSON bnb packs for one weight."""
    info = {
        "quant_type": options.method,
        "blocksize": BLOCKSIZE,
        "dtype": cast.strip("torch."),
        "shape": tuple(job_shape),
    }
    if options.double_quant:
        info.update(nested_blocksize=256, nested_dtype="float32", nested_offset=offset)
    return len(json.dumps(info).encode("utf-8"))


def four_bit_outputs(key: str, shape, cast: str, options: QuantOptions, offset: float | None):
    """The tensors `Linear4bit._save_to_state_dict` writes for a weight of `shape`, in its order."""
    n = math.prod(shape)
    blocks = -(-n // BLOCKSIZE)
    size = itemsize(options.quant_storage)
    packed = (n + 1) // 2
    storage_shape = (packed // size, 1) if size > 1 else (packed, 1)
    out = [(key, options.quant_storage, storage_shape)]
    if options.double_quant:
        out += [
            (f"{key}.absmax", "uint8", (blocks,)),
            (f"{key}.quant_map", "float32", (16,)),
            (f"{key}.nested_absmax", "float32", (-(-blocks // 256),)),
            (f"{key}.nested_quant_map", "float32", (256,)),
        ]
    else:
        out += [(f"{key}.absmax", "float32", (blocks,)), (f"{key}.quant_map", "float32", (16,))]
    length = blob_length(shape, cast, options, offset)
    out.append((f"{key}.quant_state.bitsandbytes__{options.method}", "uint8", (length,)))
    return out


def int8_outputs(key: str, shape):
    module = key.rpartition(".")[0]
    return [
        (key, "int8", tuple(shape)),
        (f"{module}.SCB", "float32", (shape[0],)),
        (f"{module}.weight_format", "uint8", ()),
    ]


def hub_split(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """huggingface_hub's `split_torch_state_dict_into_shards`: greedy in order, and a tensor larger
    than the limit gets a shard of its own, placed before the shard being filled."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, nbytes in sizes:
        if nbytes > max_bytes:
            shards.append([name])
            continue
        if size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def ordered_outputs(keys: list[str], jobs: dict[str, TensorJob]) -> list[tuple[str, str, tuple]]:
    """Every output tensor in the order the quantized model's `state_dict()` lists them: a bnb
    module's extra tensors come after its own parameters (weight, bias)."""
    out: list = []
    pending: dict[str, list] = {}  # module -> quant-state outputs waiting for the module's last key
    modules = [k.rpartition(".")[0] for k in keys]
    for i, key in enumerate(keys):
        job = jobs[key]
        out.append(job.outputs[0])
        module = modules[i]
        if len(job.outputs) > 1:
            pending.setdefault(module, []).extend(job.outputs[1:])
        if module in pending and (i + 1 == len(keys) or modules[i + 1] != module):
            out.extend(pending.pop(module))
    return out


def shard_specs(keys, jobs, max_bytes: int, source, confine_to, options, order):
    """The shards (and total bytes, the index's total_size) of the output, as save_pretrained splits
    them (`order` puts the state dict in save_pretrained's order). A weight whose quant state the
    split puts in another shard is computed for each of them."""
    by_name = {o[0]: o for o in ordered_outputs(keys, jobs)}
    outputs = [by_name[name] for name in order(list(by_name))]
    split = hub_split([(name, nbytes(dt, shape)) for name, dt, shape in outputs], max_bytes)
    owner = {o[0]: job for job in jobs.values() for o in job.outputs}
    specs = []
    for file_name, members in zip(shard_file_names(len(split)), split):
        shard_jobs = {owner[name].key: owner[name] for name in members}
        specs.append(ShardSpec(file_name, str(source), str(confine_to), options, list(shard_jobs.values()), members))
    total = sum(nbytes(dt, shape) for _n, dt, shape in outputs)
    return specs, total


def missing_from_checkpoint(keys: list[str], headers: dict, where: str) -> None:
    """transformers would initialize a key the checkpoint lacks (randomly, for most): not reproducible
    from the files, so refused, naming it."""
    missing = [k for k in keys if k not in headers]
    if missing:
        raise CheckpointError(
            f"the checkpoint has no tensor {missing[0]!r} ({len(missing)} key(s) the model expects are missing)",
            where=where,
            hint="quantize streams checkpoints stored in the model's own key names; "
            "use `qfinal save SRC OUT --quantize ...` for this one",
        )
