"""The Triton kernels compile for real GPUs (sm_80, sm_90) without one, and none spills registers.

``blockquant.kernels.aot`` compiles ahead of time with the ptxas bundled in the triton wheel and
reads each cubin with the bundled cuobjdump. CI compiles the subset :func:`~blockquant.kernels.aot.ci_subset`
(26 specialisations x 2 architectures: every dtype pair, every bit width, optimal levels, nearest
rounding, the multi-chunk sweep and 64-bit sizes); the full matrix (434 x 2) is recorded in
bench/results/triton_aot_full.md (``python -m blockquant.kernels.aot --subset full``).
"""
import os

import pytest

triton = pytest.importorskip("triton")

from blockquant.kernels import aot  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists(aot.cuobjdump()),
                                reason="this triton wheel bundles no NVIDIA toolchain (ptxas, cuobjdump)")


def test_ci_subset_compiles_for_sm80_and_sm90_without_spills():
    rows = aot.compile_cases(aot.ci_subset(), archs=(80, 90), workers=2, timeout=600)
    assert len(rows) == 2 * len(aot.ci_subset())
    assert not aot.problems(rows), "\n".join(aot.problems(rows))
    for r in rows:  # a plausible reading of cuobjdump: some registers, within the hardware's 255
        assert 16 <= r["registers"] <= 255, r


def test_the_subset_reaches_every_path_of_the_full_matrix():
    """Every value of every axis the full matrix varies appears in the CI subset, per kernel."""
    full, ci = aot.full_matrix(), aot.ci_subset()
    for kernel in ("quantize", "dequantize"):
        for axis in ("bits", "optimal", "block", "data", "meta", "sizes") + (("stochastic",) if kernel == "quantize"
                                                                           else ()):
            want = {getattr(c, axis) for c in full if c.kernel == kernel}
            got = {getattr(c, axis) for c in ci if c.kernel == kernel}
            assert got == want, (kernel, axis, want - got)
        pairs = {(c.data, c.meta) for c in ci if c.kernel == kernel}
        assert len(pairs) == 9, (kernel, pairs)


def test_problems_name_failures_and_spills():
    case = aot.ci_subset()[0]
    from dataclasses import asdict

    rows = [{"case": asdict(case), "arch": 90, "error": "CompilationError: boom"},
            {"case": asdict(case), "arch": 80, "error": None, "registers": 255, "local_bytes": 64, "stack_bytes": 64,
             "shared_bytes": 0}]
    found = aot.problems(rows)
    assert "sm_90: CompilationError: boom" in found[0] and "spills (64 B local, 64 B stack)" in found[1]
