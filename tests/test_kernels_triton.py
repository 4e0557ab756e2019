"""The fused Triton codec against the PyTorch reference.

Nearest rounding is deterministic, so payload, metadata and decode must be
bit-identical to the reference. Stochastic rounding uses a different random
stream (Philox via ``tl.rand``), so it is checked by its statistics: unbiased,
with the per-element variance ``(x - a)(b - x)`` of rounding between the two
neighbouring levels ``a <= x <= b``.

On CPU the kernels run in Triton's interpreter (the root conftest sets
TRITON_INTERPRET=1 where there is no CUDA device); the CUDA variants run the
compiled kernels, and fail if they would run through the interpreter.
"""
import math
import os

import pytest
import torch

import blockquant
from blockquant import ROW, QuantConfig
from blockquant.kernels import blockwise as bw
from blockquant.kernels import reference
from blockquant.levels import optimal_levels
from codec_utils import check_launcher_rejects_bad_arguments, per_element_bounds, theoretical_variance

pytestmark = [
    pytest.mark.skipif(not bw.HAS_TRITON, reason="triton is not installed"),
    # the interpreter warns when it evaluates masked-off lanes (e.g. 0/0 in padding)
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

CUDA = pytest.param("cuda", id="cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])
CPU = pytest.param("cpu", id="cpu", marks=[pytest.mark.skipif(
    not bw.triton_supports("cpu"), reason="TRITON_INTERPRET=1 was not set before triton was imported")])

DTYPE_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _assert_compiled_kernels():
    """The Triton kernels are JIT-compiled for the GPU, not wrapped by the CPU interpreter."""
    from triton.runtime.jit import JITFunction

    assert os.environ.get("TRITON_INTERPRET", "0") != "1" and not bw._INTERPRET_AT_IMPORT, (
        "TRITON_INTERPRET=1 is set on a machine with a CUDA device: the CUDA tests would run the interpreter; "
        "unset it (the root conftest.py only sets it where there is no GPU)")
    for kernel in (bw._quantize_kernel, bw._dequantize_kernel):
        assert type(kernel) is JITFunction, f"{type(kernel).__name__} is not a compiled triton.jit kernel"


@pytest.fixture(autouse=True)
def _cuda_cases_run_compiled(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("device") == "cuda":
        _assert_compiled_kernels()

# (n, G, chunk override): chunk=None uses the launcher's default tiling
SIZES = [
    pytest.param(1000, 64, None, id="n1000-G64"),          # n not a multiple of G
    pytest.param(37, 64, None, id="n37-G64"),              # n < G
    pytest.param(1003, 5, None, id="n1003-G5"),            # tiny G, not a power of two, codes straddle bytes
    pytest.param(700, 300, None, id="n700-G300"),          # G not a power of two
    pytest.param(2500, 1000, 256, id="n2500-G1000-chunk256"),  # G larger than the tile: chunked sweeps
    pytest.param(160, 16, None, id="row-n160-G16"),        # row mode with 16 columns
]


def _levels(kind, bits, block):
    return optimal_levels(bits, block) if kind == "optimal" else None


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of the raw bytes (NaN patterns and signed zeros included)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _test_input(n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3 + 1
    x[::7] = 0.0  # exact zeros and repeated values exercise the rounding edges
    return x.to(dtype).to(device)


def _check_nearest_identical(x, block, bits, levels, meta_dtype, chunk=None):
    n = x.numel()
    ref_p, ref_m = reference.quantize_torch(x, block, bits, meta_dtype, levels, False, 0)
    tri_p, tri_m = bw.quantize_triton(x, block, bits, meta_dtype, levels, False, 0, _chunk=chunk)
    assert _bits_equal(tri_p, ref_p), "payload differs from the reference"
    assert _bits_equal(tri_m, ref_m), f"metadata differs: {(tri_m != ref_m).sum().item()} entries"
    ref_d = reference.dequantize_torch(ref_p, ref_m, n, block, bits, levels, x.dtype)
    tri_d = bw.dequantize_triton(ref_p, ref_m, n, block, bits, levels, x.dtype, _chunk=chunk)
    assert _bits_equal(tri_d, ref_d), f"decode differs in {(tri_d != ref_d).sum().item()} elements"


# ---------------------------------------------------------------- nearest rounding: bit-identical


@pytest.mark.parametrize("n,block,chunk", SIZES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("meta_dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: "meta_" + DTYPE_ID[d])
@pytest.mark.parametrize("levels", ["uniform", "optimal"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8], ids=lambda b: f"int{b}")
def test_nearest_bit_identical_cpu(bits, levels, meta_dtype, x_dtype, n, block, chunk):
    if not bw.triton_supports("cpu"):
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    x = _test_input(n, x_dtype, "cpu")
    _check_nearest_identical(x, block, bits, _levels(levels, bits, block), meta_dtype, chunk)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("meta_dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: "meta_" + DTYPE_ID[d])
@pytest.mark.parametrize("case", ["tiny", "negative-tiny", "wide-range", "zeros"])
def test_nearest_bit_identical_edge_values(case, meta_dtype, device):
    """Values where directed metadata rounding is delicate: subnormals, sign changes, wide ranges."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(600, generator=g)
    x = {
        "tiny": base * 1e-6,                                  # fp16 metadata becomes subnormal
        "negative-tiny": -base.abs() * 1e-7,                  # round-down steps through -0
        "wide-range": base * torch.logspace(-4, 4, 600),      # blocks of very different scale
        "zeros": torch.zeros(600),
    }[case].to(device)
    for bits in (1, 2, 8):
        for block in (3, 64):
            _check_nearest_identical(x, block, bits, _levels("optimal", bits, block), meta_dtype)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_nearest_bit_identical_max_block_size(device):
    """G = 65536 (the largest block size) with a short tail block, default tiling."""
    x = _test_input(70_001, torch.float32, device)
    _check_nearest_identical(x, 65536, 2, _levels("optimal", 2, 65536), torch.bfloat16)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("bits", [1, 2, 4, 8], ids=lambda b: f"int{b}")
def test_nearest_bit_identical_g1(bits, device):
    """G = 1: every element its own block (all codes 0, step 0, exact decode)."""
    x = _test_input(300, torch.float32, device)
    _check_nearest_identical(x, 1, bits, None, torch.float32)
    out = bw.dequantize_triton(*bw.quantize_triton(x, 1, bits, torch.float32, None, True, 9),
                               300, 1, bits, None, torch.float32)
    assert torch.equal(out, x)


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("levels", ["uniform", "optimal"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8], ids=lambda b: f"int{b}")
def test_nearest_bit_identical_cuda_large(bits, levels, device):
    """Compiled kernels at realistic sizes, several tilings (many blocks per program, chunked)."""
    for n, block in ((1_000_003, 1024), (1_000_003, 16), (300_001, 5), (1_000_003, 10_000)):
        for x_dtype in (torch.float32, torch.bfloat16):
            for meta_dtype in (torch.float16, torch.bfloat16):
                x = _test_input(n, x_dtype, device)
                _check_nearest_identical(x, block, bits, _levels(levels, bits, block), meta_dtype)


@pytest.mark.parametrize("device", [CUDA])
def test_cuda_kernels_are_compiled_and_cached(device):
    _assert_compiled_kernels()
    x = _test_input(10_000, torch.float32, device)
    payload, meta = bw.quantize_triton(x, 1024, 2, torch.bfloat16, None, False, 0)
    bw.dequantize_triton(payload, meta, x.numel(), 1024, 2, None, torch.float32)
    torch.cuda.synchronize()
    for kernel in (bw._quantize_kernel, bw._dequantize_kernel):
        caches = getattr(kernel, "device_caches", None)  # triton >= 3.0; older versions: the type check above
        if caches is not None:
            assert len(caches[torch.cuda.current_device()][0]) >= 1, "the launch did not compile a GPU binary"


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("levels", ["uniform", "optimal"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8], ids=lambda b: f"int{b}")
def test_cuda_codes_match_the_cpu_reference(bits, levels, device):
    """GPU codes and metadata equal the CPU reference's (and so the compiled CPU codec's), bit for bit."""
    for n, block in ((100_003, 1024), (30_001, 16), (7_001, 5)):
        for x_dtype, meta_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                    (torch.float16, torch.float32)):
            x = _test_input(n, x_dtype, "cpu")
            lv = _levels(levels, bits, block)
            ref_p, ref_m = reference.quantize_torch(x, block, bits, meta_dtype, lv, False, 0)
            gpu_p, gpu_m = bw.quantize_triton(x.to(device), block, bits, meta_dtype, lv, False, 0)
            assert _bits_equal(gpu_p.cpu(), ref_p) and _bits_equal(gpu_m.cpu(), ref_m)
            gpu_d = bw.dequantize_triton(gpu_p, gpu_m, n, block, bits, lv, x_dtype)
            assert _bits_equal(gpu_d.cpu(), reference.dequantize_torch(ref_p, ref_m, n, block, bits, lv, x_dtype))


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_public_api_matches_reference(device):
    """blockquant.quantize with backend='triton' on a non-contiguous 2-D input, row mode and projection."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 40, generator=g).to(device).t()  # non-contiguous
    for cfg in (QuantConfig(bits=2, block_size=ROW, rounding="nearest"),
                QuantConfig(bits=4, block_size=100, levels="optimal", rounding="nearest",
                            meta_dtype=torch.bfloat16),
                QuantConfig(bits=2, block_size=64, rp_ratio=4, rounding="nearest")):
        a = blockquant.quantize(x, cfg, seed=11, backend="torch")
        b = blockquant.quantize(x, cfg, seed=11, backend="triton")
        assert _bits_equal(a.payload, b.payload) and _bits_equal(a.meta, b.meta), cfg.short()
        assert _bits_equal(a.dequantize(), b.dequantize()), cfg.short()
        assert b.dequantize().shape == x.shape


# ---------------------------------------------------------------- stochastic rounding: statistics


def _copies(values: torch.Tensor, copies: int) -> torch.Tensor:
    """``copies`` back-to-back replicas of a block-aligned vector: identical blocks, independent noise."""
    return values.repeat(copies)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("levels", ["uniform", "optimal"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8], ids=lambda b: f"int{b}")
def test_stochastic_unbiased_and_variance(bits, levels, device):
    """K identical blocks in one call: their decodes are K independent draws for each position.

    The mean of K draws has standard error sqrt(var / K); every position must
    lie within 5 standard errors plus 6 draws' worth of the level gap (b - a) / K.
    The slack covers rare roundings (x next to a level): the count of draws that
    go the unlikely way is then Poisson-like and skewed, and the normal bound
    alone is too tight (seen: 11 such draws in 3000 where 2.4 were expected). The
    empirical variance summed over positions must match sum (x - a)(b - x)
    within 5% (its relative standard error here is about 1%).
    """
    block, copies = 64, 2000
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(2 * block, generator=g) * 2 + 0.3).to(device)
    lv = _levels(levels, bits, block)
    xs = _copies(x, copies)
    payload, meta = bw.quantize_triton(xs, block, bits, torch.float16, lv, True, seed=1234)
    # every copy got the same metadata: the draws differ only through the rounding noise
    assert torch.equal(meta.view(2, copies, 2)[:, 1:], meta.view(2, copies, 2)[:, :1].expand(2, copies - 1, 2))
    dec = bw.dequantize_triton(payload, meta, xs.numel(), block, bits, lv, torch.float32)
    draws = dec.view(copies, -1).double().cpu()
    mean, var = draws.mean(0), draws.var(0)

    cfg = QuantConfig(bits=bits, block_size=block, levels=levels, meta_dtype=torch.float16)
    packed = blockquant.quantize(x.cpu(), cfg, seed=0, backend="torch")
    assert torch.equal(packed.meta, meta[:, :2].cpu())  # same metadata as the reference
    theory = theoretical_variance(x.cpu(), packed)
    a, b = per_element_bounds(x.cpu(), packed)
    bound = 5 * torch.sqrt(theory / copies) + 6 * (b - a) / copies + 1e-6
    err = (mean - x.cpu().double()).abs()
    assert torch.all(err <= bound), f"worst |bias| / bound = {(err / bound).max():.3g}"
    ratio = var.sum() / theory.sum()
    assert abs(ratio - 1) < 0.05, f"empirical/theoretical variance = {ratio:.4f}"


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_stochastic_unbiased_over_seeds(device):
    """The same tensor under many seeds (what training sees): mean decode -> x."""
    seeds, block, bits = 100, 32, 2
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(96, generator=g) - 0.5).to(device)
    lv = _levels("optimal", bits, block)
    acc = torch.zeros(96, dtype=torch.float64)
    for s in range(seeds):
        p, m = bw.quantize_triton(x, block, bits, torch.float32, lv, True, seed=s * 7919 + (s << 40))
        acc += bw.dequantize_triton(p, m, 96, block, bits, lv, torch.float32).double().cpu()
    mean = acc / seeds
    cfg = QuantConfig(bits=bits, block_size=block, levels="optimal", meta_dtype=torch.float32)
    packed = blockquant.quantize(x.cpu(), cfg, seed=0, backend="torch")
    a, b = per_element_bounds(x.cpu(), packed)
    # 5 standard errors plus a few draws of slack for near-level elements (see the test above)
    bound = 5 * torch.sqrt(theoretical_variance(x.cpu(), packed) / seeds) + 4 * (b - a) / seeds + 1e-6
    err = (mean - x.cpu().double()).abs()
    assert torch.all(err <= bound), f"worst |bias| / bound = {(err / bound).max():.3g}"
    # the average error is a much tighter check: a systematic bias of 1% of a level gap would fail it
    assert err.mean() <= 2 * (torch.sqrt(theoretical_variance(x.cpu(), packed) / seeds)).mean() + 1e-6


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_seeds_repeat_and_differ(device):
    x = _test_input(4096, torch.float32, device)
    args = (256, 2, torch.bfloat16, None, True)
    a1, m1 = bw.quantize_triton(x, *args, seed=42)
    a2, m2 = bw.quantize_triton(x, *args, seed=42)
    b, mb = bw.quantize_triton(x, *args, seed=43)
    c, _ = bw.quantize_triton(x, *args, seed=42 + (1 << 40))  # high seed bits matter too
    assert torch.equal(a1, a2) and torch.equal(m1, m2)
    assert torch.equal(m1, mb)  # metadata does not depend on the seed
    # with 4096 elements two seeds agree on every byte with negligible probability
    assert not torch.equal(a1, b) and not torch.equal(a1, c)
    assert (a1 != b).float().mean() > 0.2


# ---------------------------------------------------------------- constant blocks and bad input


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("levels", ["uniform", "optimal"])
@pytest.mark.parametrize("bits", [1, 2, 8], ids=lambda b: f"int{b}")
def test_constant_blocks_decode_exactly(bits, levels, x_dtype, device):
    """A block whose values are all equal has step 0 and decodes to the constant, under any seed.

    Metadata in the input's own dtype (or fp32) holds every input value exactly.
    """
    block = 50
    x = torch.cat([torch.full((block,), v) for v in (-3.25, 0.0, 1e-3, 7.0, -1e4)]).to(x_dtype).to(device)
    lv = _levels(levels, bits, block)
    for meta_dtype in {torch.float32, x_dtype}:
        for stochastic in (True, False):
            p, m = bw.quantize_triton(x, block, bits, meta_dtype, lv, stochastic, seed=5)
            assert torch.all(m[1] == 0)
            out = bw.dequantize_triton(p, m, x.numel(), block, bits, lv, x_dtype)
            assert _bits_equal(out, x)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("meta_dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: "meta_" + DTYPE_ID[d])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_input_raises(bad, meta_dtype, device):
    x = _test_input(3000, torch.float32, device)
    x[2100] = bad
    for block, chunk in ((16, None), (1000, 128)):
        _, meta = bw.quantize_triton(x, block, 2, meta_dtype, None, True, 3, _chunk=chunk)
        finite = torch.isfinite(meta).all(0).cpu()
        assert not finite[2100 // block], "the block holding the bad value must get non-finite metadata"
        assert finite.sum() == finite.numel() - 1, "only that block is affected"
    cfg = QuantConfig(bits=2, block_size=64, meta_dtype=meta_dtype)
    with pytest.raises(ValueError, match="non-finite"):
        blockquant.quantize(x, cfg, backend="triton")


def test_nan_only_block_raises():
    """A block made entirely of NaN (min/max that skip NaN would see an empty block)."""
    if not bw.triton_supports("cpu"):
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    x = torch.randn(256)
    x[64:128] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        blockquant.quantize(x, QuantConfig(bits=4, block_size=64), backend="triton")


def test_launcher_rejects_bad_arguments():
    if not bw.triton_supports("cpu"):
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    check_launcher_rejects_bad_arguments(bw.quantize_triton, bw.dequantize_triton)


def test_triton_supports_devices():
    assert bw.triton_supports("cuda") == bw.HAS_TRITON
    assert bw.triton_supports("cpu") == (bw.HAS_TRITON and bw._INTERPRET_AT_IMPORT)
    assert not bw.triton_supports("meta")


@pytest.mark.parametrize("block,bits", [(1, 2), (5, 2), (16, 2), (1024, 2), (65536, 2), (1000, 8), (7, 1)])
def test_tiling_covers_any_block_size(block, bits):
    """The launch tile is a power of two and either holds whole blocks or chunks one block."""
    for dev in ("cpu", "cuda"):
        bb, cb, per, one = bw._tile_shape(block, bits, torch.device(dev))
        assert per == 8 // bits
        for v in (bb, cb, per):
            assert v & (v - 1) == 0
        if one:
            assert cb * per >= block
        else:
            assert bb == 1 and cb * per < block
    assert math.isclose(bw._split_seed((1 << 62) - 1)[0], 0x7FFFFFFF)


def test_compiled_check_rejects_the_interpreter():
    """The assertion the CUDA cases run first: it fails whenever the kernels are interpreted."""
    if bw._INTERPRET_AT_IMPORT:
        with pytest.raises(AssertionError, match="TRITON_INTERPRET=1"):
            _assert_compiled_kernels()
    else:
        _assert_compiled_kernels()


@pytest.mark.parametrize("cuda,env,expect", [
    (False, {}, "1"),                                          # CPU-only machine: interpreter on
    (True, {}, None),                                          # GPU machine: compiled kernels
    (True, {"BLOCKQUANT_TEST_INTERPRET": "1"}, "1"),           # forced on
    (False, {"BLOCKQUANT_TEST_INTERPRET": "0"}, None),         # forced off
    (True, {"TRITON_INTERPRET": "0"}, "0"),                    # an explicit setting is kept
], ids=["cpu", "gpu", "forced-on", "forced-off", "explicit"])
def test_root_conftest_switches_the_interpreter_on_only_without_cuda(cuda, env, expect, monkeypatch):
    import importlib.util

    for name in ("TRITON_INTERPRET", "BLOCKQUANT_TEST_INTERPRET"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conftest.py")
    spec = importlib.util.spec_from_file_location("root_conftest_under_test", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert os.environ.get("TRITON_INTERPRET") == expect
