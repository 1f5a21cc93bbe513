"""hvd_qpr: Quantized Parallel-Restarted SGD for Horovod and PyTorch.

The native kernels (QSGD quantization, bit-packing, Elias coding) are in :mod:`hvd_qpr.ops`;
their pure-PyTorch definitions in :mod:`hvd_qpr.reference`.
"""

from hvd_qpr import ops
from hvd_qpr.ops import QuantizedTensor

__all__ = ["QuantizedTensor", "ops"]
__version__ = "0.1.0"
