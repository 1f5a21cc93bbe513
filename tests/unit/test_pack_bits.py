"""pack_bits / unpack_bits against the reference, every field width and integer dtype."""

from __future__ import annotations

import pytest
import torch

import hvd_qpr.ops as ops
import hvd_qpr.reference as ref

INT_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def _fits(dtype: torch.dtype, bits: int) -> bool:
    return {torch.uint8: 8, torch.int16: 15}.get(dtype, 63) >= bits


@pytest.mark.parametrize("n", [1, 7, 8, 511, 513, 100003])
@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_matches_reference(kernel_set, n, dtype):
    g = torch.Generator().manual_seed(n)
    for bits in range(1, 17):
        if not _fits(dtype, bits):
            continue
        values = torch.randint(0, 2**bits, (n,), generator=g).to(dtype)
        packed = ops.pack_bits(values, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
        assert torch.equal(packed, ref.pack_bits(values, bits)), bits
        for out_dtype in INT_DTYPES:
            if _fits(out_dtype, bits):
                back = ops.unpack_bits(packed, bits, n, out_dtype)
                assert back.dtype == out_dtype
                assert torch.equal(back, values.to(out_dtype)), (bits, out_dtype)
        assert torch.equal(ops.unpack_bits(packed, bits, n), ref.unpack_bits(packed, bits, n))


def test_layout_is_lsb_first():
    assert ops.pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [0b111001]
    assert ops.pack_bits(torch.tensor([5, 1]), 3).tolist() == [0b001101]
    assert ops.pack_bits(torch.tensor([0xABC]), 12).tolist() == [0xBC, 0x0A]


def test_unpack_from_offsets_and_longer_buffers(kernel_set):
    values = torch.randint(0, 32, (1001,), generator=torch.Generator().manual_seed(1))
    packed = ops.pack_bits(values, 5)
    padded = torch.cat([packed, torch.full((9,), 255, dtype=torch.uint8)])
    assert torch.equal(ops.unpack_bits(padded, 5, 1001), values.int())
    assert torch.equal(ops.unpack_bits(packed, 5, 999), values[:999].int())


def test_noncontiguous_and_multidimensional_input():
    values = torch.randint(0, 8, (40, 30), generator=torch.Generator().manual_seed(2))
    view = values.t()[::3]
    assert torch.equal(ops.pack_bits(view, 3), ref.pack_bits(view.contiguous(), 3))


def test_errors():
    with pytest.raises(ValueError, match=r"values must be in \[0, 2\*\*3\)"):
        ops.pack_bits(torch.tensor([1, 8]), 3)
    with pytest.raises(ValueError, match=r"values must be in \[0, 2\*\*3\)"):
        ops.pack_bits(torch.tensor([-1, 2], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="field_bits must be in 1..16"):
        ops.pack_bits(torch.tensor([1]), 17)
    with pytest.raises(ValueError, match="field_bits must be in 1..16"):
        ops.unpack_bits(torch.zeros(4, dtype=torch.uint8), 0, 1)
    with pytest.raises(TypeError, match="values must be uint8, int16, int32 or int64"):
        ops.pack_bits(torch.tensor([1.0]), 3)
    with pytest.raises(TypeError, match="packed must be torch.uint8, got torch.int32"):
        ops.unpack_bits(torch.zeros(4, dtype=torch.int32), 3, 1)
    with pytest.raises(ValueError, match="at least 2 bytes"):
        ops.unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 5)
    with pytest.raises(ValueError, match="do not fit"):
        ops.unpack_bits(torch.zeros(4, dtype=torch.uint8), 9, 2, torch.uint8)
    with pytest.raises(TypeError, match="dtype must be one of"):
        ops.unpack_bits(torch.zeros(4, dtype=torch.uint8), 3, 2, torch.float32)
