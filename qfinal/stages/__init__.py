"""One module per pipeline stage, in the order they run."""

from .adapter_load import AdapterLoad
from .checkpoint_dispatch import CheckpointDispatch
from .meta_init import MetaInit
from .postprocess import Postprocess
from .quantizer_preprocess import QuantizerPreprocess
from .runtime import Runtime
from .tie_weights import TieWeights
from .validate import Validate

STAGES = [MetaInit, QuantizerPreprocess, CheckpointDispatch, Postprocess, TieWeights, AdapterLoad,
          Runtime, Validate]
