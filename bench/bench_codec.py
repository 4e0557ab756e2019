"""Codec microbenchmarks (pytest-benchmark): quantize and dequantize per backend and size.

Not part of the test suite (``pytest.ini`` collects ``tests/`` only, and
disables benchmarks). Run explicitly::

    pytest bench/bench_codec.py --benchmark-enable -q                       # CPU
    TRITON_INTERPRET=0 pytest bench/bench_codec.py --benchmark-enable -q    # CUDA machine

Each case reports GB/s = (bytes read + bytes written) / median time and the
whole run is written to ``bench/results/codec_<device>.json`` together with
the machine, torch and triton versions. Cases that cannot run are recorded
with the reason they were skipped. Without ``--benchmark-enable`` every case
runs once as a smoke test and no results file is written.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import List, Optional

import pytest
import torch

from blockquant.bench.machine import machine_info
from blockquant.kernels import available_backends, get_backend, native
from blockquant.kernels.reference import payload_bytes
from blockquant.levels import optimal_levels

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The Triton interpreter runs programs one by one in Python (~100x slower than
# the reference), so on CPU it is only measured at this size.
INTERPRETER_MAX_N = 1 << 16


@dataclasses.dataclass(frozen=True)
class CodecCase:
    op: str             # "quantize" or "dequantize"
    backend: str        # "torch" or "triton"
    n: int              # float32 elements
    bits: int
    block: int
    levels: str         # "uniform" or "optimal"
    meta_dtype: str = "bfloat16"

    @property
    def id(self) -> str:
        return f"{self.op}-{self.backend}-n{self.n}-int{self.bits}-G{self.block}-{self.levels}"

    def level_values(self):
        return optimal_levels(self.bits, self.block) if self.levels == "optimal" else None

    def bytes_moved(self) -> int:
        """Input read + payload and metadata written (quantize), or the reverse (dequantize)."""
        nb = -(-self.n // self.block)
        meta_bytes = 2 * nb * torch.finfo(getattr(torch, self.meta_dtype)).bits // 8
        return 4 * self.n + payload_bytes(self.n, self.block, self.bits) + meta_bytes


@dataclasses.dataclass
class CaseResult:
    case: CodecCase
    device: str
    median_s: Optional[float] = None
    gbps: Optional[float] = None
    rounds: int = 0
    skipped: Optional[str] = None


def _cases() -> List[CodecCase]:
    sizes = [1 << 20, 1 << 24, 1 << 26] if DEVICE.type == "cuda" else [1 << 16, 1 << 20, 1 << 22]
    shapes = [(2, 1024, "uniform"), (2, 1024, "optimal"), (2, 16, "uniform"), (8, 256, "uniform")]
    return [CodecCase(op, backend, n, bits, block, levels)
            for op in ("quantize", "dequantize")
            for backend in ("torch", "native", "triton")
            for n in sizes
            for bits, block, levels in shapes]


CASES = _cases()
_RESULTS: List[CaseResult] = []


def _skip_reason(case: CodecCase) -> Optional[str]:
    if case.backend not in available_backends(DEVICE):
        why = ("the compiled CPU codec runs on CPU tensors only" if DEVICE.type != "cpu"
               else f"the compiled CPU codec is unavailable: {native.unavailable_reason()}")
        return (f"backend {case.backend!r} cannot run on {DEVICE.type} here ("
                + (why if case.backend == "native" else "triton missing, or TRITON_INTERPRET unset for CPU") + ")")
    if case.backend == "triton" and DEVICE.type == "cuda" and INTERPRETED:
        return "TRITON_INTERPRET=1 would time the interpreter, not the GPU kernels; rerun with TRITON_INTERPRET=0"
    if case.backend == "triton" and DEVICE.type == "cpu" and case.n > INTERPRETER_MAX_N:
        return f"the Triton CPU interpreter is only timed up to n = {INTERPRETER_MAX_N} (it is not a fast path)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _write_results(request):
    yield
    measured = [r for r in _RESULTS if r.median_s is not None]
    if not measured:
        return  # benchmarks disabled: nothing was timed, keep the last results file
    rows = []
    for r in _RESULTS:
        row = dataclasses.asdict(r.case)
        row.update(id=r.case.id, device=r.device, bytes=r.case.bytes_moved(), median_s=r.median_s,
                   gbps=r.gbps, rounds=r.rounds, skipped=r.skipped)
        rows.append(row)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"codec_{DEVICE.type}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine_info(DEVICE), "gbps_definition": "(bytes read + bytes written) / median time",
                   "cases": rows}, f, indent=2)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_codec_throughput(benchmark, case: CodecCase):
    result = CaseResult(case, str(DEVICE))
    _RESULTS.append(result)
    reason = _skip_reason(case)
    if reason is not None:
        result.skipped = reason
        pytest.skip(reason)

    backend = get_backend(DEVICE, case.backend)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(case.n, generator=gen, device=DEVICE)
    levels = case.level_values()
    meta_dtype = getattr(torch, case.meta_dtype)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    if case.op == "quantize":
        def run():
            out = backend.quantize(x, case.block, case.bits, meta_dtype, levels, True, 1234)
            sync()
            return out
    else:
        payload, meta = backend.quantize(x, case.block, case.bits, meta_dtype, levels, True, 1234)

        def run():
            out = backend.dequantize(payload, meta, case.n, case.block, case.bits, levels, torch.float32)
            sync()
            return out

    rounds = 3 if case.backend == "triton" and DEVICE.type == "cpu" else 10
    out = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    # a benchmark that returns garbage measures nothing: check the shape of what came back
    if case.op == "quantize":
        assert out[0].numel() == payload_bytes(case.n, case.block, case.bits)
    else:
        assert out.shape == (case.n,)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        result.median_s = stats.stats.median
        result.rounds = len(stats.stats.data)
        result.gbps = case.bytes_moved() / result.median_s / 1e9
        benchmark.extra_info.update(gbps=result.gbps, bytes=case.bytes_moved())
