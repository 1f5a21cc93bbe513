"""Run by horovodrun (see test_horovod.py): the kernels' payloads travel through Horovod's
collectives on Gloo and come back exact.

Checks, on every rank:
1. Elias streams of different lengths, allgathered, decode on every rank to every rank's levels.
2. Packed-sum: levels offset to be non-negative, packed in fields with headroom for the sum of
   all ranks, summed by allreduce(Sum) on int64 words, unpack to the sum of the levels.
3. Quantized values summed after dequantization equal the allreduce of the reference's values.
"""

from __future__ import annotations

import math
import sys

import horovod.torch as hvd
import torch

import hvd_qpr.ops as ops
import hvd_qpr.reference as ref


def main() -> int:
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    n, bits = 10007, 4
    s = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.5 + 0.2 * rank)
    q = ops.quantize(x, bits, 512, "l2", seed=rank)

    # 1. variable-length Elias streams through allgather
    stream = ops.elias_encode(q)
    streams = hvd.allgather(stream, name="streams")
    lengths = hvd.allgather(torch.tensor([stream.numel()]), name="lengths").tolist()
    assert len(set(lengths)) == size or size == 1, lengths
    offset = 0
    decoded = []
    for length in lengths:
        decoded.append(ops.elias_decode(streams[offset : offset + length]))
        offset += length
    assert decoded[rank] == q

    # 2. packed-sum on int64 words: fields wide enough that the sum of `size` fields never carries
    field_bits = math.ceil(math.log2(size * 2 * s + 1))
    field_bits = 1 << math.ceil(math.log2(field_bits))  # 8 or 16: fields never straddle a word
    fields = ref.levels(q) + s
    packed = ops.pack_bits(fields, field_bits)
    words = torch.cat([packed, packed.new_zeros(-packed.numel() % 8)]).view(torch.int64)
    summed = hvd.allreduce(words, op=hvd.Sum, name="packed_sum")
    total = ops.unpack_bits(summed.view(torch.uint8), field_bits, n, torch.int64) - size * s
    expected = torch.stack([ref.levels(d) for d in decoded]).sum(0)
    assert torch.equal(total, expected)

    # 3. dequantized sums agree with the reference on every rank
    mine = ops.dequantize(q).double()
    reduced = hvd.allreduce(mine, op=hvd.Sum, name="values")
    expected_values = sum(ref.dequantize(d).double() for d in decoded)
    assert torch.allclose(reduced, expected_values, rtol=0, atol=1e-9)

    print(f"rank {rank}/{size}: kernels over horovod OK", flush=True)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
