"""The ops' registrations (schemas, fake tensors for torch.compile) pass torch.library.opcheck."""

from __future__ import annotations

import pytest
import torch

import hvd_qpr.ops as ops
from tests.conftest import random_input

STATIC_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_and_dequantize(dtype):
    x = random_input(1025, dtype).view(5, 205)
    torch.library.opcheck(torch.ops.hvd_qpr.quantize.default, (x, 4, 512, 0, 3))
    q = ops.quantize(x, 4)
    args = (q.packed, q.scales, [5, 205], 4, 512, dtype)
    torch.library.opcheck(torch.ops.hvd_qpr.dequantize.default, args)
    out = torch.empty(5, 205, dtype=dtype)
    torch.library.opcheck(
        torch.ops.hvd_qpr.dequantize_out.default,
        (q.packed, q.scales, 512, 4, out),
        test_utils=STATIC_TESTS,
    )
    torch.library.opcheck(
        torch.ops.hvd_qpr.quantize_out.default,
        (x, 4, 512, 0, 3, q.packed.clone(), q.scales.clone()),
        test_utils=STATIC_TESTS,
    )
    torch.library.opcheck(
        torch.ops.hvd_qpr.quantize_scaled_out.default,
        (x, q.scales * 2, 4, 512, 3, q.packed.clone()),
        test_utils=STATIC_TESTS,
    )


def test_pack_and_unpack():
    values = torch.randint(0, 2**11, (1001,), dtype=torch.int32)
    torch.library.opcheck(torch.ops.hvd_qpr.pack_bits.default, (values, 11))
    packed = ops.pack_bits(values, 11)
    torch.library.opcheck(torch.ops.hvd_qpr.unpack_bits.default, (packed, 11, 1001, torch.int32))


def test_elias():
    q = ops.quantize(random_input(700), 3, 128, "l2")
    args = (q.packed, q.scales, [700], 3, 128, 1, torch.float32)
    torch.library.opcheck(torch.ops.hvd_qpr.elias_encode.default, args, test_utils=STATIC_TESTS)
    stream = ops.elias_encode(q)
    torch.library.opcheck(
        torch.ops.hvd_qpr.elias_decode.default, (stream,), test_utils=STATIC_TESTS
    )
