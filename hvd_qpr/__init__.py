"""hvd_qpr: Quantized Parallel-Restarted SGD for Horovod and PyTorch.

The native kernels (QSGD quantization, bit-packing, Elias coding) are in :mod:`hvd_qpr.ops`;
their pure-PyTorch definitions in :mod:`hvd_qpr.reference`; compressors in
:mod:`hvd_qpr.compression`; how bytes move in :mod:`hvd_qpr.collectives`; the paradigms'
averagers in :mod:`hvd_qpr.averaging` (ring all-reduce), :mod:`hvd_qpr.gossip` (over
:mod:`hvd_qpr.topology`) and :mod:`hvd_qpr.overlap`; the optimizer that wires them in
:mod:`hvd_qpr.optimizer` (README.md, "Architecture").
"""

import importlib

from hvd_qpr import ops
from hvd_qpr.ops import QuantizedTensor

# What needs Horovod is imported on first use, so the kernels (hvd_qpr.ops) work without it.
_LAZY = {
    "Link": "hvd_qpr.collectives",
    "Compression": "hvd_qpr.compression",
    "Compressor": "hvd_qpr.compression",
    "CompressorTraits": "hvd_qpr.compression",
    "ErrorFeedback": "hvd_qpr.compression",
    "Topology": "hvd_qpr.topology",
    "consensus_distance": "hvd_qpr.topology",
    "make_topology": "hvd_qpr.topology",
    "DistributedOptimizer": "hvd_qpr.optimizer",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hvd_qpr' has no attribute {name!r}")


__all__ = [
    "Compression",
    "Compressor",
    "CompressorTraits",
    "DistributedOptimizer",
    "ErrorFeedback",
    "Link",
    "QuantizedTensor",
    "Topology",
    "consensus_distance",
    "make_topology",
    "ops",
]
__version__ = "0.1.0"
