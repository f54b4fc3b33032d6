"""One module per pipeline stage, in the order they run."""

from qfinal.pipeline.stages.adapter_load import AdapterLoad
from qfinal.pipeline.stages.checkpoint_dispatch import CheckpointDispatch
from qfinal.pipeline.stages.meta_init import MetaInit
from qfinal.pipeline.stages.postprocess import Postprocess
from qfinal.pipeline.stages.quantizer_preprocess import QuantizerPreprocess
from qfinal.pipeline.stages.runtime import Runtime
from qfinal.pipeline.stages.tie_weights import TieWeights
from qfinal.pipeline.stages.validate import Validate

STAGES = [MetaInit, QuantizerPreprocess, CheckpointDispatch, Postprocess, TieWeights, AdapterLoad, Runtime, Validate]
