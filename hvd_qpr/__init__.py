"""hvd_qpr: Quantized Parallel-Restarted SGD for Horovod and PyTorch.

The native kernels (QSGD quantization, bit-packing, Elias coding) are in :mod:`hvd_qpr.ops`;
their pure-PyTorch definitions in :mod:`hvd_qpr.reference`; compressors in
:mod:`hvd_qpr.compression`; the optimizer in :mod:`hvd_qpr.optimizer`, with gossip topologies in
:mod:`hvd_qpr.gossip` and Overlap-Local-SGD in :mod:`hvd_qpr.overlap`.
"""

from hvd_qpr import ops
from hvd_qpr.collectives import Link
from hvd_qpr.compression import Compression, Compressor, CompressorTraits, ErrorFeedback
from hvd_qpr.gossip import Topology, consensus_distance, make_topology
from hvd_qpr.ops import QuantizedTensor
from hvd_qpr.optimizer import DistributedOptimizer

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
