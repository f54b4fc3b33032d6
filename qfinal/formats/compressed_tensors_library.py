"""compressed-tensors' own decompression of a checkpoint: the reference `qfinal dequantize --verify`
compares OUT with.

transformers cannot be the reference here: its compressed-tensors quantizer has no `dequantize()`,
its default CPU load keeps the weights packed (and fails on asymmetric packed zero points), and its
`dequantize=True` load applies one config group's scheme to every layer. So the model is laid out
as the library lays it out (`apply_quantization_config`, `ModelCompressor.compress_model`), given
the stored tensors as they are, and decompressed by `ModelCompressor.decompress_model`.
"""

from __future__ import annotations

from pathlib import Path

from qfinal.errors import CheckpointError
from qfinal.formats.base import all_stored_tensors


def _install(model, state: dict) -> list[str]:
    """Every stored tensor as the model's own parameter or buffer, dtype kept; the keys the model
    has no place for."""
    import torch

    homeless = []
    modules = dict(model.named_modules())
    for key, tensor in state.items():
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if module is None or not hasattr(module, leaf):
            homeless.append(key)
        elif isinstance(getattr(module, leaf), torch.nn.Parameter):
            setattr(module, leaf, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            setattr(module, leaf, tensor)  # a buffer
    return homeless


def library_reference(model_class, folder: Path, raw_config: dict):
    """SOURCE's model with every quantized weight decompressed by compressed-tensors itself (in the
    scale's dtype, as the library returns it), then cleared of its quantization (qparams, forward)."""
    import torch

    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, QuantizationMetadata, apply_quantization_config
    except ImportError:
        raise CheckpointError(
            "compressed-tensors is not installed: it is the reference --verify compares with",
            where=str(folder),
            hint="pip install 'compressed-tensors>=0.20,<0.21', or dequantize without --verify",
        ) from None
    config = model_class.config_class.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        quant_config = QuantizationConfig.model_validate(raw_config["quantization_config"])
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"the installed compressed-tensors cannot read this quantization_config ({first.strip()})",
            where=str(folder / "config.json"),
            hint="OUT was written by qfinal's own arithmetic; only the library comparison is not possible",
        ) from None
    model = model_class(config).eval()
    apply_quantization_config(model, quant_config, show_progress=False)
    compressor = ModelCompressor(quantization_config=quant_config)
    with torch.no_grad():
        compressor.compress_model(model)
        homeless = _install(model, all_stored_tensors(folder))
        if homeless:
            raise CheckpointError(
                f"compressed-tensors lays out no place for {len(homeless)} stored tensor(s), e.g. {homeless[0]}",
                where=str(folder),
            )
        compressor.decompress_model(model)
    for module in model.modules():  # the plain model: no scales left, the plain forward back
        if hasattr(module, "quantization_scheme"):
            QuantizationMetadata.clear_quantization(module)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model
