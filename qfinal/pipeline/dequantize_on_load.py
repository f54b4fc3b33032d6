"""Loading a checkpoint whose format transformers cannot load faithfully here: its quantized
weights are rebuilt by the format itself, one at a time, as the loader asks for them.

The loader is given a state dict of lazy entries: every stored tensor that is not quant state as
it is on disk (`TensorSlice`), and every quantized weight as a `DequantizedSlice` that reads its
stored tensors, dequantizes them with the format's own arithmetic (the same call
`qfinal dequantize` makes) and casts once to the load dtype. The model is built without a
quantizer, so the result is a plain model holding exactly the weights `qfinal dequantize` would
write, and memory holds one quantized weight's inputs at a time on top of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from qfinal.errors import CheckpointError
from qfinal.formats.base import QuantFormat, Scheme, StoredWeight


@dataclass
class DequantizedSlice:
    """One quantized weight as the loader sees a stored tensor: shape and dtype known up front,
    the values computed when it is indexed. `transpose`: the module is a Conv1D ([in, out])."""

    fmt: QuantFormat
    weight: StoredWeight
    state: dict  # stored key -> TensorSlice
    dtype: object  # torch.dtype the weight is cast to
    st_dtype: str  # its safetensors code, as get_dtype() reports it
    transpose: bool
    where: str

    def get_shape(self) -> list[int]:
        shape = list(self.weight.shape)
        return shape[::-1] if self.transpose else shape

    def get_dtype(self) -> str:
        return self.st_dtype

    def __getitem__(self, index):
        value = self.fmt.dequantize(self.weight, lambda key: self.state[key][...], self.where)
        if self.transpose:
            value = value.t()
        value = value.to(self.dtype).contiguous()
        if list(value.shape) != self.get_shape():
            raise CheckpointError(
                f"dequantized shape {list(value.shape)} differs from the quant state's {self.get_shape()}",
                where=f"{self.where}: {self.weight.name}",
            )
        return value if index is Ellipsis else value[index]


def dense_state(
    fmt: QuantFormat, scheme: Scheme, state: dict, dtype, model, where: str
) -> tuple[dict, list[StoredWeight]]:
    """`state` (stored key -> lazy tensor) as the plain checkpoint it encodes for `model`: quant
    state gone, each quantized weight a `DequantizedSlice` (Conv1D ones in the [in, out] layout).
    Also returns the weights the format found."""
    from transformers.pytorch_utils import Conv1D

    from qfinal.checkpoint.dtypes import safetensors_dtype
    from qfinal.checks.keys import checkpoint_lookup

    conv1d = {name for name, module in model.named_modules() if isinstance(module, Conv1D)}
    in_conv1d = checkpoint_lookup(conv1d, model.base_model_prefix)

    headers = {key: (entry.get_dtype(), list(entry.get_shape())) for key, entry in state.items()}
    weights = fmt.find_weights(headers, lambda key: state[key][...], scheme, where)
    consumed = {key for weight in weights for key in weight.parts.values()}
    dense = {key: entry for key, entry in state.items() if key not in consumed}
    code = safetensors_dtype(dtype)
    for weight in weights:
        transpose = in_conv1d(weight.name.rsplit(".", 1)[0]) is not None
        dense[weight.name] = DequantizedSlice(fmt, weight, state, dtype, code, transpose, where)
    return dense, weights


def find_stored_weights(fmt: QuantFormat, inventory, raw: dict, where: str) -> list[StoredWeight]:
    """Every quantized weight of a safetensors inventory, as `qfinal dequantize` finds them: from
    the headers, reading only the small quant-state blobs the format needs. CheckpointError names
    the first weight whose stored state cannot be used."""
    from qfinal.checkpoint.reader import TensorReader

    headers = {key: (entry.dtype, list(entry.shape)) for key, entry in inventory.tensors.items()}
    with TensorReader.for_inventory(inventory, max_open=0) as reader:
        return fmt.find_weights(headers, reader.get, fmt.scheme(raw, where), where)


def dense_inventory(ctx):
    """The checkpoint's inventory as the plain checkpoint it encodes, for header-only key checks:
    quant-state tensors gone, each quantized weight under its own name with its dequantized shape.
    The inventory itself when nothing is dequantized on load, or when the quant state is too
    broken to say (the quantization_config check reports why)."""
    import dataclasses

    fmt, inventory = ctx.dequantizing_format, ctx.inventory
    if fmt is None or inventory.format != "safetensors":
        return inventory
    try:
        weights = find_stored_weights(fmt, inventory, ctx.config_json(), str(ctx.source.folder))
    except CheckpointError:
        return inventory
    consumed = {key for weight in weights for key in weight.parts.values()}
    tensors = {key: entry for key, entry in inventory.tensors.items() if key not in consumed}
    for weight in weights:
        stored = inventory.tensors[next(iter(weight.parts.values()))]
        tensors[weight.name] = dataclasses.replace(stored, name=weight.name, shape=tuple(weight.shape))
    return dataclasses.replace(inventory, tensors=tensors)
