"""effst: fused kernels for efficient spiking transformers (sLIF, block-sparse linear, L1P/DSP)."""
from effst.ops.slif import slif
from effst import models, nn, prune
from effst.convert import convert

__version__ = "0.1.0"
__all__ = ["slif", "convert", "models", "nn", "prune", "__version__"]
