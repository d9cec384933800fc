"""effst: fused kernels for efficient spiking transformers (sLIF, block-sparse linear, L1P/DSP)."""
from effst.ops.slif import slif

__version__ = "0.1.0"
__all__ = ["slif", "__version__"]
