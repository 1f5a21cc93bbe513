"""Bad input gets a clear TypeError or ValueError that names the op and the problem."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hvd_qpr.ops as ops
import hvd_qpr.reference as ref
from tests.conftest import random_input


def test_wrong_dtypes_and_types():
    with pytest.raises(
        TypeError, match="quantize: x must be float32, float16 or bfloat16, got torch.float64"
    ):
        ops.quantize(torch.randn(10, dtype=torch.float64))
    with pytest.raises(TypeError, match="got torch.int32"):
        ops.quantize(torch.ones(10, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        ops.quantize([1.0, 2.0])
    with pytest.raises(TypeError, match="bits must be an int, got float"):
        ops.quantize(torch.randn(4), bits=4.0)
    with pytest.raises(TypeError, match="q must be a QuantizedTensor"):
        ops.dequantize(torch.randn(4))
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        ops.dequantize(ops.quantize(torch.randn(4)), dtype=torch.float64)
    with pytest.raises(TypeError, match="stream must be torch.uint8, got torch.float32"):
        ops.elias_decode(torch.randn(40))


def test_bad_arguments():
    x = random_input(100)
    for bits in (0, 1, 9, 16):
        with pytest.raises(ValueError, match=f"bits must be in 2..8, got {bits}"):
            ops.quantize(x, bits)
    with pytest.raises(ValueError, match="bucket_size must be in 1..2\\*\\*31-1, got 0"):
        ops.quantize(x, 4, 0)
    with pytest.raises(ValueError, match=r"norm must be one of \['l2', 'max'\], got 'l1'"):
        ops.quantize(x, 4, norm="l1")
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\), got -1"):
        ops.quantize(x, seed=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_and_inf_are_named(dtype):
    x = random_input(1000, dtype)
    for value, name in ((float("nan"), "NaN"), (float("inf"), r"\+Inf"), (-float("inf"), "-Inf")):
        bad = x.clone()
        bad[700] = value
        bad[900] = value
        for norm in ("max", "l2"):
            first = f"x contains {name} \\(first at flat index 700\\)"
            with pytest.raises(ValueError, match=first):
                ops.quantize(bad, 4, norm=norm)
            with pytest.raises(ValueError, match=f"x contains {name}"):
                ref.quantize(bad, 4, norm=norm)


def test_l2_norm_overflow_and_float16_output_overflow():
    with pytest.raises(ValueError, match="l2 norm of a bucket overflows float32; use norm='max'"):
        ops.quantize(torch.full((64,), 3e38), 4, norm="l2")
    # l2 scales can exceed float16's range: the values stay finite in float32 only
    x = torch.full((512,), 60000.0, dtype=torch.float16)
    q = ops.quantize(x, 2, norm="l2")
    with pytest.raises(ValueError, match="overflows torch.float16 .*dequantize to torch.float32"):
        ops.dequantize(q)
    assert torch.isfinite(ops.dequantize(q, dtype=torch.float32)).all()


def test_inconsistent_quantized_tensor():
    q = ops.quantize(random_input(1000), 4, 128)
    with pytest.raises(ValueError, match="packed must be a 1-D tensor of 500 bytes"):
        ops.dequantize(dataclasses.replace(q, packed=q.packed[:-1]))
    with pytest.raises(ValueError, match="scales must be a 1-D tensor of 8 values"):
        ops.dequantize(dataclasses.replace(q, scales=q.scales[:-1]))
    with pytest.raises(ValueError, match=r"scales\[2\] = -1 is not a finite non-negative number"):
        scales = q.scales.clone()
        scales[2] = -1
        ops.dequantize(dataclasses.replace(q, scales=scales))
    with pytest.raises(ValueError, match="field equal to 15, which no 4-bit level encodes"):
        packed = q.packed.clone()
        packed[3] = 0xF0
        ops.dequantize(dataclasses.replace(q, packed=packed))
    with pytest.raises(ValueError, match="field equal to 15"):
        ops.elias_encode(dataclasses.replace(q, packed=packed))
    with pytest.raises(ValueError, match="packed must be a 1-D tensor"):
        ops.elias_encode(dataclasses.replace(q, bits=5))
    with pytest.raises(ValueError, match="norm must be one of"):
        ops.elias_encode(dataclasses.replace(q, norm="l3"))


def test_unknown_kernel_set():
    with pytest.raises(ValueError, match="unknown kernel set 'sse'; choose auto, avx512, avx2"):
        with ops.kernel_set("sse"):
            pass
    assert ops.active_kernel_set() == ops.available_kernel_sets()[0]
