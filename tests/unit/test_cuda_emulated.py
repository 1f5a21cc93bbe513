"""The CUDA kernels, run on the CPU and compared bit for bit with the CPU ops.

tests/native/cuda_emu.h emulates the CUDA thread model: every thread of a block is a fiber, and a
warp collective completes only when all 32 lanes of the warp reach it (a warp with lanes that have
left, or that wait in different collectives, aborts the run). tests/native/cuda_emu_driver.cpp
launches the kernels of csrc/cuda/*.cuh on it the way the host code in csrc/cuda/*.cu does, built
with AddressSanitizer and UBSan and with every buffer at its exact size, so a read or write out of
bounds fails the run. Every batch runs twice, lanes and blocks in forward and in reverse order, and
must give the same bytes both times: a result that depends on the order threads run in is a race.

This is what runs the CUDA code on machines without a GPU (CI, this project's development
machine). tests/gpu/test_cuda_kernels.py runs the same comparisons on a real GPU.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.cpp_extension import include_paths, library_paths

from hvd_qpr import ops
from tests.sanitized_build import build_sanitized

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
INT_TYPES = {torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}


@pytest.fixture(scope="module")
def emulator_binary(tmp_path_factory) -> Path:
    torch_lib = library_paths()[0]
    return build_sanitized(
        [ROOT / "tests" / "native" / "cuda_emu_driver.cpp"],
        tmp_path_factory.mktemp("cuda_emu") / "cuda_emu_driver",
        [
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wno-unknown-pragmas",  # nvcc's #pragma unroll
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *(f"-isystem{p}" for p in include_paths()),
            f"-L{torch_lib}",
            "-lc10",
            f"-Wl,-rpath,{torch_lib}",
        ],
    )


class Batch:
    """Jobs for the driver: inputs written as raw files, outputs named by the job, run in both
    orders; `out(name, dtype)` then reads an output of the forward run."""

    def __init__(self, binary: Path, workdir: Path):
        self.binary = binary
        self.workdir = workdir
        self.lines: list[str] = []
        self.inputs = 0

    def put(self, t: torch.Tensor) -> str:
        self.inputs += 1
        path = self.workdir / f"in{self.inputs}.bin"
        t.contiguous().view(torch.uint8).numpy().tofile(path)
        return str(path)

    def add(self, *words) -> int:
        self.lines.append(" ".join(str(w) for w in words))
        return len(self.lines) - 1

    def run(self) -> list[str]:
        results = {}
        for order in ("forward", "reverse"):
            out = self.workdir / order
            out.mkdir(exist_ok=True)
            jobs = self.workdir / f"jobs_{order}"
            jobs.write_text("".join(line.replace("OUT/", f"{out}/") + "\n" for line in self.lines))
            done = subprocess.run(
                [str(self.binary), order, str(jobs)], capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, done.stderr[-4000:]
            status = done.stdout.splitlines()
            assert len(status) == len(self.lines), done.stdout + done.stderr[-4000:]
            files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
            results[order] = (status, files)
        assert results["forward"][0] == results["reverse"][0]
        forward, reverse = results["forward"][1], results["reverse"][1]
        assert forward.keys() == reverse.keys()
        differ = [name for name in forward if forward[name] != reverse[name]]
        assert not differ, f"outputs depend on the order threads run in: {differ}"
        return results["forward"][0]

    def out(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        raw = np.fromfile(self.workdir / "forward" / name, dtype=np.uint8)
        return torch.from_numpy(raw.copy()).view(dtype)


@pytest.fixture
def batch(emulator_binary, tmp_path) -> Batch:
    return Batch(emulator_binary, tmp_path)


def fresh(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * torch.rand(n, generator=g) * 3).to(dtype)


def quantize_cases():
    """(numel, dtype, bits, bucket, norm, misaligned): every width and norm at odd sizes; buckets
    512 and 8 take the fused warp kernel at most widths, 511, 37 and 1 the two-kernel path, as
    does a packed buffer that is not word-aligned. The 16-bit dtypes differ only in loading."""
    for n in (1, 511, 513):
        for bits in range(2, 9):
            for bucket in (512, 511, 37, 8, 1):
                for norm in ("max", "l2"):
                    yield n, torch.float32, bits, bucket, norm, False
            yield n, torch.float32, bits, 512, "l2", True
            for dtype in (torch.float16, torch.bfloat16):
                for bucket, norm in ((512, "max"), (37, "l2")):
                    yield n, dtype, bits, bucket, norm, False
    for bits in (2, 3, 4, 8):
        yield 100_003, torch.float32, bits, 512, "max", False
        yield 100_003, torch.float32, bits, 511, "l2", False
    for dtype in (torch.float16, torch.bfloat16):
        yield 100_003, dtype, 4, 512, "l2", False


def test_quantize_is_bit_identical_to_the_cpu(batch):
    cases = list(quantize_cases())
    inputs = {}
    for i, (n, dtype, bits, bucket, norm, misaligned) in enumerate(cases):
        if (n, dtype) not in inputs:
            inputs[n, dtype] = batch.put(fresh(n, dtype, n + len(inputs)))
        norm_code = 0 if norm == "max" else 1
        batch.add(
            "quantize", DTYPES[dtype], bits, bucket, norm_code, 1000 + i, n, int(misaligned),
            inputs[n, dtype], f"OUT/p{i}", f"OUT/s{i}",
        )  # fmt: skip
    assert set(batch.run()) == {"ok"}
    for i, (n, dtype, bits, bucket, norm, _) in enumerate(cases):
        x = fresh(n, dtype, n + list(inputs).index((n, dtype)))
        cpu = ops.quantize(x, bits, bucket, norm, seed=1000 + i)
        assert torch.equal(batch.out(f"s{i}", torch.float32), cpu.scales), cases[i]
        assert torch.equal(batch.out(f"p{i}", torch.uint8), cpu.packed), cases[i]


def test_quantize_against_given_scales_matches_the_cpu(batch):
    cases = []
    for n in (1, 511, 513, 100_003):
        x = fresh(n, torch.float32, 7)
        nb = -(-n // 512)
        peaks = torch.cat([x.abs(), x.new_zeros(nb * 512 - n)]).view(nb, 512).amax(1)
        shared = peaks * 1.5
        for bits in (2, 4, 8):
            for misaligned in (0, 1):
                i = len(cases)
                cases.append((x, shared, bits))
                batch.add(
                    "quantize", "f32", bits, 512, 2, 3, n, misaligned, batch.put(x), f"OUT/p{i}",
                    batch.put(shared),
                )  # fmt: skip
    assert set(batch.run()) == {"ok"}
    for i, (x, shared, bits) in enumerate(cases):
        cpu = ops.quantize(x, bits, 512, seed=3, scales=shared)
        assert torch.equal(batch.out(f"p{i}", torch.uint8), cpu.packed), i


def test_dequantize_is_bit_identical_to_the_cpu(batch):
    cases = []
    for n in (1, 511, 513, 100_003):
        x = fresh(n, torch.float32, 11 + n)
        for bits in range(2, 9) if n < 100_000 else (2, 4, 8):
            for bucket in (512, 37, 3) if n < 100_000 else (512,):
                q = ops.quantize(x, bits, bucket, seed=5 + bits)
                packed, scales = batch.put(q.packed), batch.put(q.scales)
                for dtype in DTYPES:
                    for misaligned in (0, 1) if n == 513 else (0,):  # 1: no vector stores
                        i = len(cases)
                        cases.append((q, dtype))
                        batch.add("dequantize", DTYPES[dtype], bits, bucket, n, misaligned,
                                  packed, scales, f"OUT/d{i}")  # fmt: skip
    assert set(batch.run()) == {"ok"}
    for i, (q, dtype) in enumerate(cases):
        assert torch.equal(batch.out(f"d{i}", dtype), ops.dequantize(q, dtype)), i


def test_pack_and_unpack_bits_match_the_cpu(batch):
    cases = []
    for field_bits in range(1, 17):
        for n in (1, 511, 513, 20_011):
            for dtype in INT_TYPES:
                if field_bits >= 8 * dtype.itemsize:
                    continue  # values must fit the (signed) type
                g = torch.Generator().manual_seed(n * 17 + field_bits)
                values = torch.randint(0, 2**field_bits, (n,), generator=g).to(dtype)
                packed = ops.pack_bits(values, field_bits)
                i = len(cases)
                cases.append((values, packed))
                t = INT_TYPES[dtype]
                batch.add("pack", t, field_bits, n, batch.put(values), f"OUT/p{i}")
                batch.add("unpack", t, field_bits, n, batch.put(packed), f"OUT/u{i}")
    assert set(batch.run()) == {"ok"}
    for i, (values, packed) in enumerate(cases):
        assert torch.equal(batch.out(f"p{i}", torch.uint8), packed), i
        assert torch.equal(batch.out(f"u{i}", values.dtype), values), i


def test_elias_streams_are_identical_and_decode_across_devices(batch):
    cases = []
    for n, shape in ((1, "-"), (511, "511"), (513, "27x19"), (100_003, "100003")):
        for bits in range(2, 9):
            for norm, bucket in (("max", 512), ("l2", 37)):
                x = fresh(n, torch.float32, 21 + bits).view(() if shape == "-" else (n,))
                if shape == "27x19":
                    x = x.view(27, 19)
                q = ops.quantize(x, bits, bucket, norm, seed=bits)
                cpu_stream = ops.elias_encode(q)
                i = len(cases)
                cases.append((q, cpu_stream))
                batch.add(
                    "encode", bits, bucket, 0 if norm == "max" else 1, "f32", shape,
                    batch.put(q.packed), batch.put(q.scales), f"OUT/e{i}",
                )  # fmt: skip
                batch.add("decode", batch.put(cpu_stream), f"OUT/p{i}", f"OUT/s{i}")
    # A gap of 2^22 or more (a code too long for one 57-bit read): spikes among values that
    # quantize to level 0.
    n, bucket = 2**22 + 2**20 + 77, 2**22 + 2**20
    x = fresh(n, torch.float32, 5) * 1e-12
    x[torch.tensor([3, 1000, n - 5, n - 1])] = torch.tensor([2.0, -1.0, -3.0, 1.5])
    q = ops.quantize(x, 8, bucket, seed=9)  # the gap of 2^22 leads to the longest level code
    cases.append((q, ops.elias_encode(q)))
    i = len(cases) - 1
    batch.add("encode", 8, bucket, 0, "f32", str(n), batch.put(q.packed), batch.put(q.scales),
              f"OUT/e{i}")  # fmt: skip
    batch.add("decode", batch.put(cases[-1][1]), f"OUT/p{i}", f"OUT/s{i}")
    # Entries of 57 bits, the most one read of the decoder's window guarantees (a gap of 2^21 and
    # the longest 8-bit level code), at eight bit alignments: bucket j starts with j short entries.
    bucket = 2**21 + 64
    x = fresh(8 * bucket, torch.float32, 6) * 1e-12
    for j in range(8):
        x[j * bucket : j * bucket + j] = 0.5
        x[(j + 1) * bucket - 1] = -3.0  # the bucket's largest: level -127
    q = ops.quantize(x, 8, bucket, seed=10)
    cases.append((q, ops.elias_encode(q)))
    i = len(cases) - 1
    batch.add("encode", 8, bucket, 0, "f32", str(x.numel()), batch.put(q.packed),
              batch.put(q.scales), f"OUT/e{i}")  # fmt: skip
    batch.add("decode", batch.put(cases[-1][1]), f"OUT/p{i}", f"OUT/s{i}")
    assert set(batch.run()) == {"ok"}
    for i, (q, cpu_stream) in enumerate(cases):
        emulated = batch.out(f"e{i}", torch.uint8)
        assert torch.equal(emulated, cpu_stream), i
        assert ops.elias_decode(emulated) == q, i  # encoded by the CUDA code, decoded on the CPU
        assert torch.equal(batch.out(f"p{i}", torch.uint8), q.packed), i
        assert torch.equal(batch.out(f"s{i}", torch.float32), q.scales), i


def test_corrupt_streams_are_refused_as_the_cpu_refuses_them(batch):
    """Random byte changes, truncations, extensions and flipped code bits: the CUDA decoder
    refuses a stream exactly when the CPU decoder does (naming elias_decode), else decodes the
    same fields, and never reads or writes out of bounds (AddressSanitizer)."""
    g = torch.Generator().manual_seed(99)
    streams = []
    for bits, bucket in ((4, 256), (2, 37), (8, 512)):
        x = fresh(3001, torch.float32, bits)
        streams.append(ops.elias_encode(ops.quantize(x, bits, bucket, seed=1)))
    cases = []
    for trial in range(900):
        stream = streams[trial % len(streams)]
        s = stream.clone()
        kind = (trial // len(streams)) % 4
        if kind == 0:
            pos = torch.randint(0, s.numel(), (3,), generator=g)
            s[pos] = torch.randint(0, 256, (3,), generator=g, dtype=torch.uint8)
        elif kind == 1:
            s = s[: int(torch.randint(0, s.numel(), (1,), generator=g))]
        elif kind == 2:
            s = torch.cat([s, torch.randint(0, 256, (5,), generator=g, dtype=torch.uint8)])
        else:  # one bit of the code section: the header and tables stay valid
            header = 32 + 8 + 8 * (-(-3001 // (256, 37, 512)[trial % 3]))
            pos = int(torch.randint(header, s.numel(), (1,), generator=g))
            s[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
        try:
            expected = ops.elias_decode(s)
        except ValueError:
            expected = None
        cases.append(expected)
        batch.add("decode", batch.put(s), f"OUT/p{trial}", f"OUT/s{trial}")
    status = batch.run()
    refused = 0
    for trial, (expected, line) in enumerate(zip(cases, status, strict=True)):
        if expected is None:
            assert line.startswith("error: elias_decode"), (trial, line)
            refused += 1
        else:
            assert line == "ok", (trial, line)
            assert torch.equal(batch.out(f"p{trial}", torch.uint8), expected.packed), trial
    assert refused > 100 and len(cases) - refused > 30, refused  # both outcomes were exercised


def test_padding_of_an_empty_tensor_is_checked(batch):
    """A stream of no values may still carry code bits: nonzero padding after them is refused
    as on the CPU, zero padding accepted."""
    stream = ops.elias_encode(ops.quantize(torch.empty(0), 4, 512, seed=1))
    for last in (0xF8, 0x00):
        s = torch.cat([stream, torch.tensor([last], dtype=torch.uint8)])
        s[24:32] = torch.tensor([3, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)  # code_bits = 3
        try:
            ops.elias_decode(s)
            cpu = "ok"
        except ValueError as e:
            cpu = str(e)
        assert ("padding" in cpu) == (last != 0), cpu
        batch.add("decode", batch.put(s), f"OUT/p{last}", f"OUT/s{last}")
    refused, accepted = batch.run()
    assert refused.startswith("error: elias_decode") and "padding" in refused, refused
    assert accepted == "ok"


def test_errors_are_recorded_on_the_device_not_raised(batch):
    """A non-finite bucket gets a NaN scale and invalid fields (no exception: the op does not
    synchronize); dequantize turns them into NaN; a value above a given scale invalidates its
    bucket; the Elias encoder refuses both, where it synchronizes anyway."""
    x = fresh(2048, torch.float32, 1)
    x[600] = float("nan")
    x[1800] = float("inf")
    given = torch.full((4,), 1e-3)
    for misaligned in (0, 1):
        batch.add("quantize", "f32", 4, 512, 0, 1, 2048, misaligned, batch.put(x),
                  f"OUT/p{misaligned}", f"OUT/s{misaligned}")  # fmt: skip
        batch.add("quantize", "f32", 4, 512, 2, 1, 2048, misaligned,
                  batch.put(x.nan_to_num(0.0, 0.0, 0.0)), f"OUT/g{misaligned}",
                  batch.put(given))  # fmt: skip
    assert set(batch.run()) == {"ok"}
    scales = batch.out("s0", torch.float32)
    assert torch.isnan(scales[[1, 3]]).all() and torch.isfinite(scales[[0, 2]]).all()
    assert torch.equal(batch.out("s1", torch.float32).view(torch.int32), scales.view(torch.int32))
    assert torch.equal(batch.out("p1", torch.uint8), batch.out("p0", torch.uint8))
    invalid = 0xFF  # two all-ones 4-bit fields a byte
    packed = batch.out("p0", torch.uint8).view(4, 256)
    assert (packed[[1, 3]] == invalid).all() and (packed[[0, 2]] != invalid).any()
    assert (batch.out("g0", torch.uint8) == invalid).all()
    assert torch.equal(batch.out("g1", torch.uint8), batch.out("g0", torch.uint8))

    second = Batch(batch.binary, batch.workdir / "second")
    second.workdir.mkdir()
    packed_path, scales_path = second.put(batch.out("p0", torch.uint8)), second.put(scales)
    second.add("dequantize", "f32", 4, 512, 2048, 0, packed_path, scales_path, "OUT/d")
    valid = second.put(ops.quantize(x.nan_to_num(0.0, 0.0, 0.0), 4, 512, seed=1).packed)
    finite = second.put(scales.nan_to_num(1.0))
    second.add("encode", 4, 512, 0, "f32", "2048", packed_path, finite, "OUT/e0")
    second.add("encode", 4, 512, 0, "f32", "2048", valid, scales_path, "OUT/e1")
    second.add("encode", 4, 512, 0, "f32", "2048", packed_path, scales_path, "OUT/e2")
    status = second.run()
    assert status[0] == "ok"
    out = second.out("d", torch.float32).view(4, 512)
    assert torch.isnan(out[[1, 3]]).all() and torch.isfinite(out[[0, 2]]).all()
    assert status[1].startswith("error: elias_encode") and "invalid field" in status[1]
    assert status[2].startswith("error: elias_encode") and "not a finite" in status[2]
    assert "not a finite" in status[3]  # both wrong: the scales are reported, as on the CPU
