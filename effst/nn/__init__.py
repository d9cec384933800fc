"""nn.Modules: spiking neurons (sLIF, PLIF, LIF) and block-sparse linear layers."""
from effst.nn.block_sparse import BlockSparseLinear
from effst.nn.neurons import LIF, PLIF, SLIF, reset

__all__ = ["SLIF", "PLIF", "LIF", "reset", "BlockSparseLinear"]
