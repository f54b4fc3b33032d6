"""Stage 3: stream the checkpoint into the skeleton along the device map.

transformers' loader reads safetensors lazily (mmap slices) and converts / quantizes tensor by
tensor; accelerate writes the disk-offloaded part. Keys the checkpoint lacks are then moved off
meta and initialized exactly as `from_pretrained` does, so later checks see what users would get.
"""

from __future__ import annotations

from collections import Counter

from qfinal.checkpoint.reader import read_tensor_by_tensor
from qfinal.compat import transformers as _hf
from qfinal.formats.bnb_kernel import kernels_for_load
from qfinal.pipeline.context import Context, Outcome
from qfinal.pipeline.stages.base import BaseStage
from qfinal.report import MismatchedKey


def refuse_inconsistent_quant_state(ctx: Context) -> None:
    """A pre-quantized checkpoint whose quant state disagrees with its quantization_config (a
    module without its absmax or quant_state blob, state left over from another method) cannot be
    loaded faithfully: transformers crashes trying to initialize packed bytes at random. Refuse it
    from the headers, before reading data, with the first problem named."""
    if ctx.inventory.format != "safetensors":
        return
    from qfinal.checkpoint.headers import checkpoint_error
    from qfinal.checks.keys import checkpoint_lookup
    from qfinal.checks.quant import prequantized_modules, quantization_findings

    raw = ctx.config_json()
    lookup = checkpoint_lookup(ctx.inventory.tensors, ctx.model.base_model_prefix)
    errors = [
        f
        for f in quantization_findings(raw, ctx.inventory, prequantized_modules(raw, ctx.report), lookup)
        if f.severity == "error"
    ]
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise checkpoint_error(
            f"the bitsandbytes checkpoint cannot be loaded: {errors[0].message}{more}",
            file="config.json",
            check="quantization_config",
            hint="run `qfinal validate --fast` for every problem; re-export the quantized checkpoint",
        )
    _refuse_unusable_stored_weights(ctx, raw)


def _unloadable(fmt, err, hint: str):
    """A format's CheckpointError about its stored weights, named as the header checks name theirs
    (validate reports it)."""
    from qfinal.checkpoint.headers import checkpoint_error

    return checkpoint_error(
        f"the {fmt.name} checkpoint cannot be loaded: {err.what}",
        file=err.where,
        check="quantization_config",
        hint=hint,
    )


def _refuse_unusable_stored_weights(ctx: Context, raw: dict) -> None:
    """Each stored weight as `qfinal dequantize` reads it (its small quant-state blobs read): state
    transformers cannot unpack leaves the weight to a random init of packed bytes (a crash), and
    state that does not fit the weight makes bitsandbytes read out of bounds."""
    from qfinal.errors import CheckpointError
    from qfinal.formats import format_for
    from qfinal.pipeline.dequantize_on_load import find_stored_weights

    fmt = format_for(raw)
    if fmt is None:
        return
    try:
        find_stored_weights(fmt, ctx.inventory, raw, str(ctx.source.folder))
    except CheckpointError as err:
        raise _unloadable(fmt, err, "re-export the quantized checkpoint") from None


def _quantizes_on_load(ctx: Context) -> bool:
    q = ctx.hf_quantizer
    return q is not None and not q.pre_quantized and ctx.inventory.format == "safetensors"


def refuse_what_transformers_loads_wrong(ctx: Context) -> None:
    """Before any weight is read: a format whose checkpoints transformers would load wrong here is
    refused with the reason (header-only `validate --fast` and `plan` never get this far)."""
    from qfinal.errors import CheckpointError
    from qfinal.formats import format_for

    fmt = format_for(ctx.config_json())
    refusal = fmt.load_refusal(ctx.config_json()) if fmt is not None else None
    if refusal:
        hint = "re-export the model in a format qfinal reads; `qfinal validate --fast` lists them"
        if fmt.readable:
            hint = "write a plain checkpoint with `qfinal dequantize SRC OUT` and load OUT; " + hint.split("; ")[1]
        raise CheckpointError(
            f"{fmt.name} checkpoint: {refusal}", where=str(ctx.source.folder / "config.json"), hint=hint
        )


def _load_dequantizing(ctx: Context, files: list[str]):
    """Load a checkpoint whose format qfinal dequantizes itself (`pipeline.dequantize_on_load`):
    each quantized weight rebuilt as the loader reads it; the report lists them as converted."""
    from qfinal.errors import CheckpointError
    from qfinal.pipeline.dequantize_on_load import dense_state
    from qfinal.report import ConvertedModule

    if ctx.inventory.format != "safetensors":
        raise CheckpointError(
            f"a {ctx.dequantizing_format.name} checkpoint must be stored as safetensors",
            where=str(ctx.source.folder),
        )
    fmt, raw, where = ctx.dequantizing_format, ctx.config_json(), str(ctx.source.folder)
    progress = ctx.on_progress and (lambda done, total: ctx.on_progress(done, total, "bytes read"))
    with read_tensor_by_tensor(files, progress) as state:
        try:
            scheme = fmt.scheme(raw, where)
            dense, weights = dense_state(fmt, scheme, state, ctx.dtype, ctx.model, where)
        except CheckpointError as err:
            hint = "run `qfinal validate --fast` for every problem; re-export the quantized checkpoint"
            raise _unloadable(fmt, err, hint) from None
        loaded = _hf.load_checkpoint_into(ctx.model, files, ctx.load_config, dense)
    dtype = str(ctx.dtype).removeprefix("torch.")
    ctx.report.keys.converted = [
        ConvertedModule.model_validate({"module": w.name.rsplit(".", 1)[0], "from": scheme.label, "to": dtype})
        for w in weights
    ] + ctx.report.keys.converted
    return loaded


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
            raise OutputError(
                f"offload folder cannot be created: {probe} is not a folder",
                where=folder,
                hint="choose a writable offload_folder",
            )
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as err:
            raise OutputError(
                f"offload folder is not writable ({err.strerror or type(err).__name__})",
                where=folder,
                hint="choose a writable offload_folder",
            ) from None

    def run(self, ctx: Context) -> Outcome:
        refuse_what_transformers_loads_wrong(ctx)
        cfg = ctx.config
        model = ctx.model
        device_map = ctx.device_map
        if device_map is not None:
            device_map = _hf.get_device_map(model, device_map, cfg.max_memory, ctx.hf_quantizer)
        ctx.device_map = device_map
        if device_map and "disk" in device_map.values() and not cfg.offload_folder:
            from qfinal.errors import ConfigError

            raise ConfigError(
                "the device map offloads to disk but no offload_folder is set",
                where="offload_folder",
                hint="set offload_folder or raise max_memory",
            )
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
            from qfinal.checkpoint.pickles import safe_torch_load

            for path in ctx.inventory.files:
                safe_torch_load(path)
        if ctx.dequantizing_format is not None:
            ctx.loading_info, ctx.disk_offload_index = _load_dequantizing(ctx, files)
        elif _quantizes_on_load(ctx) and not (device_map and "disk" in device_map.values()):
            progress = ctx.on_progress and (lambda done, total: ctx.on_progress(done, total, "bytes read"))
            # bitsandbytes' quantize_4bit and int8_vectorwise_quant are qfinal's in here (byte-identical)
            with read_tensor_by_tensor(files, progress) as state, kernels_for_load():
                ctx.loading_info, ctx.disk_offload_index = _hf.load_checkpoint_into(
                    model, files, ctx.load_config, state
                )
        else:
            ctx.loading_info, ctx.disk_offload_index = _hf.load_checkpoint_into(model, files, ctx.load_config)
        _hf.materialize_missing(model, ctx.loading_info, ctx.load_config)

        keys = ctx.report.keys
        keys.mismatched = [
            MismatchedKey(key=k, checkpoint_shape=list(a), model_shape=list(b))
            for k, a, b in sorted(ctx.loading_info.mismatched_keys)
        ]
        if device_map:
            ctx.report.placement = {k: str(v) for k, v in device_map.items()}
        where = Counter(str(v) for v in (device_map or {"": "cpu"}).values())
        placed = ", ".join(f"{n} on {d}" for d, n in sorted(where.items()))
        return Outcome("ran", f"{len(files)} file(s) read; modules placed: {placed}")
