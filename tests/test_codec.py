"""The block-wise codec: unbiasedness, variance, round trips, sizes, errors.

Every property is checked on each backend that can run here (the PyTorch
reference always; the compiled CPU codec where a C compiler built it; Triton
on CPU tensors through its interpreter).
"""
import math

import pytest
import torch

import blockquant
from blockquant import ROW, QuantConfig, quantize
from blockquant.kernels import reference
from blockquant.kernels import get_backend
from codec_utils import BACKEND_PARAMS, per_element_bounds, theoretical_variance

REPLICAS, SEEDS = 50, 8  # 400 stochastic draws per element, in 8 calls


def _draws(x, cfg, backend):
    """Decode ``REPLICAS`` copies of ``x`` quantized together, for ``SEEDS`` seeds.

    The copies sit side by side in one tensor, so block boundaries (and the
    bracketing levels) differ between copies; each draw is still unbiased with
    its own known variance. Returns draws ``(SEEDS * REPLICAS, n)`` and the
    per-draw theoretical variance of the same shape (float64).
    """
    big = x.reshape(-1).repeat(REPLICAS)
    draws, theory = [], None
    for s in range(SEEDS):
        p = quantize(big, cfg, seed=1000 + s, backend=backend)
        draws.append(p.dequantize().to(torch.float64).view(REPLICAS, -1))
        if theory is None:  # no projection: the metadata does not depend on the seed
            theory = theoretical_variance(big, p).view(REPLICAS, -1)
    return torch.cat(draws), theory.repeat(SEEDS, 1)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("levels", ["uniform", "optimal"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_unbiased_over_seeds(bits, levels, backend):
    torch.manual_seed(0)
    x = torch.randn(3, 70) * 2 + 0.5  # 210 elements: blocks of 64 fall across copies, short tail block
    cfg = QuantConfig(bits=bits, block_size=64, levels=levels, meta_dtype=torch.float16)
    draws, var = _draws(x, cfg, backend)
    k = draws.shape[0]
    mean = draws.mean(0)
    se = torch.sqrt(var.sum(0)) / k  # standard error of the mean of independent draws
    err = (mean - x.reshape(-1).double()).abs()
    # 5 standard errors per element, plus fp32 decode round-off
    assert torch.all(err <= 5 * se + 1e-5), f"max err {err.max():.3g}, max 5se {(5 * se).max():.3g}"
    # the average error over all elements is a much tighter check of bias
    assert err.mean() <= 1.5 * se.mean() + 1e-6


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("levels", ["uniform", "optimal"])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_variance_matches_theory(bits, levels, backend):
    torch.manual_seed(1)
    x = torch.randn(256)
    cfg = QuantConfig(bits=bits, block_size=32, levels=levels, meta_dtype=torch.float32)
    draws, var = _draws(x, cfg, backend)
    mse = (draws - x.double()).pow(2).sum()
    ratio = mse / var.sum()
    # ~100k draws: the relative standard error of this ratio is well under 1%
    assert 0.96 < ratio < 1.04, ratio


@pytest.mark.parametrize("d,expected", [(64, -0.063), (1024, -0.197)])
def test_optimal_levels_reduce_variance_on_clipped_normal_data(d, expected):
    """On normal data cut in blocks of d, optimal levels lower the exact expected variance
    by about the ALGORITHM.md table's amount (sample extremes vary, so allow a band)."""
    torch.manual_seed(2)
    x = torch.randn(200 * d)
    var = {}
    for levels in ("uniform", "optimal"):
        cfg = QuantConfig(bits=2, block_size=d, levels=levels, meta_dtype=torch.float32)
        var[levels] = theoretical_variance(x, quantize(x, cfg, seed=0, backend="torch")).sum()
    change = float(var["optimal"] / var["uniform"] - 1)
    assert expected - 0.04 < change < expected + 0.04, change
    assert change < 0


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("g", [1, 3, 4, 5, 16, 17, 64, 1000])
def test_pack_unpack_bit_exact(bits, g):
    gen = torch.Generator().manual_seed(bits * 1000 + g)
    codes = torch.randint(0, 2 ** bits, (7, g), generator=gen, dtype=torch.uint8)
    packed = reference.pack_codes(codes, bits)
    assert packed.shape == (7, math.ceil(g * bits / 8))
    assert torch.equal(reference.unpack_codes(packed, bits, g), codes)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_nearest_rounding_codes_and_decode(bits, backend):
    torch.manual_seed(3)
    x = torch.randn(5, 77)
    cfg = QuantConfig(bits=bits, block_size=50, rounding="nearest", meta_dtype=torch.float32)
    p = quantize(x, cfg, backend=backend)
    codes = p.codes()
    assert codes.numel() == x.numel() and int(codes.max()) < 2 ** bits
    # decode is exactly lo + step * code, block by block
    blk = torch.arange(x.numel()) // 50
    expect = p.meta[0][blk] + p.meta[1][blk] * codes.float()
    assert torch.equal(p.dequantize().reshape(-1), expect)
    # nearest rounding lands on the closer of the two bracketing levels
    a, b = per_element_bounds(x, p)
    err = (p.dequantize().reshape(-1).double() - x.reshape(-1).double()).abs()
    assert torch.all(err <= (b - a) / 2 + 1e-6)
    # deterministic: a different seed changes nothing
    assert torch.equal(quantize(x, cfg, seed=123, backend=backend).payload, p.payload)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (1,), (), (2, 3, 5), (1025,), (4, 257)],
                         ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_shapes_round_trip(shape, backend):
    torch.manual_seed(4)
    x = torch.randn(shape)
    cfg = QuantConfig(bits=8, block_size=16)
    p = quantize(x, cfg, seed=0, backend=backend)
    y = p.dequantize()
    assert y.shape == x.shape and y.dtype == x.dtype
    if x.numel():
        # stochastic rounding moves an element by less than one level step of its block
        step = p.meta[1].float()[torch.arange(x.numel()) // 16]
        assert torch.all((y - x).reshape(-1).abs() <= step * 1.001 + 1e-7)
    else:
        assert p.nbytes == 0


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("meta", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dtypes_and_constant_blocks(dtype, meta, backend):
    x = torch.empty(4, 32, dtype=dtype)
    x[0] = 0.0
    x[1] = 1.5
    x[2] = -2.0
    x[3] = torch.linspace(-1, 1, 32)
    cfg = QuantConfig(bits=2, block_size=32, meta_dtype=meta)
    p = quantize(x, cfg, seed=5, backend=backend)
    y = p.dequantize()
    assert y.dtype == dtype and y.shape == x.shape
    # constant blocks (values representable in every metadata dtype) decode exactly
    assert torch.equal(y[:3], x[:3])
    assert torch.all(y[3] >= -1.0 - 1e-2) and torch.all(y[3] <= 1.0 + 1e-2)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_float64_is_encoded_through_float32_unbiased_and_decodes_to_float64(backend):
    torch.manual_seed(0)
    x = torch.randn(3, 70, dtype=torch.float64) * 2 + 0.5
    cfg = QuantConfig(bits=2, block_size=64, meta_dtype=torch.float16)
    p, p32 = quantize(x, cfg, seed=7, backend=backend), quantize(x.float(), cfg, seed=7, backend=backend)
    assert p.dtype == torch.float64 and p.dequantize().dtype == torch.float64 and "float64" in repr(p)
    # the same codes and bytes as the float32 input: nothing of float64's width is stored
    assert p.nbytes == p32.nbytes and torch.equal(p.payload, p32.payload) and torch.equal(p.meta, p32.meta)
    assert torch.equal(p.dequantize(), p32.dequantize().double())
    draws, var = _draws(x, cfg, backend)
    k = draws.shape[0]
    se = torch.sqrt(var.sum(0)) / k
    err = (draws.mean(0) - x.reshape(-1)).abs()
    # unbiased up to the float32 rounding of the input (2^-24 relative) and fp32 decode round-off
    assert torch.all(err <= 5 * se + 1e-5) and err.mean() <= 1.5 * se.mean() + 1e-6


def test_left_matmul_equals_the_product_with_the_decoded_tensor():
    """``a @ x_hat`` without decoding a projected tensor to full width: the same product, in ``a``'s dtype."""
    x, a = torch.randn(40, 64), torch.randn(5, 40, dtype=torch.float64)
    for cfg in (QuantConfig(bits=2, block_size=64), QuantConfig(bits=2, block_size=ROW, rp_ratio=8)):
        p = quantize(x, cfg, seed=1, backend="torch")
        got = p.left_matmul(a)
        assert got.dtype == torch.float64 and got.shape == (5, 64)
        torch.testing.assert_close(got, a @ p.dequantize().double(), rtol=1e-5, atol=1e-5)
    # a 3-D tensor is read as [-1, last dim]
    p3 = quantize(x.view(4, 10, 64), QuantConfig(bits=4), seed=2, backend="torch")
    torch.testing.assert_close(p3.left_matmul(a.float()), a.float() @ p3.dequantize().view(40, 64))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_constant_block_decodes_exactly_with_fp32_metadata(backend):
    x = torch.full((3, 40), 0.1234567)
    p = quantize(x, QuantConfig(bits=2, block_size=ROW, meta_dtype=torch.float32), backend=backend)
    assert torch.equal(p.dequantize(), x)


def test_metadata_rounding_covers_the_block():
    """lo is rounded down and step up, so the stored range contains every element."""
    torch.manual_seed(6)
    x = torch.randn(64, 33) * 100 + 1000.0
    for meta in (torch.float16, torch.bfloat16):
        p = quantize(x, QuantConfig(bits=2, block_size=33, meta_dtype=meta), backend="torch")
        lo = p.meta[0].float()
        hi = lo + 3 * p.meta[1].float()
        blocks = x.reshape(-1, 33)
        assert torch.all(lo <= blocks.min(1).values)
        assert torch.all(hi >= blocks.max(1).values * (1 - 1e-6))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_non_contiguous_inputs_match_contiguous(backend):
    torch.manual_seed(7)
    base = torch.randn(40, 30)
    for view in (base.t(), base[::2, 1::3], base.unsqueeze(0).expand(2, 40, 30)):
        cfg = QuantConfig(bits=2, block_size=24)
        a = quantize(view, cfg, seed=9, backend=backend)
        b = quantize(view.contiguous(), cfg, seed=9, backend=backend)
        assert torch.equal(a.payload, b.payload) and torch.equal(a.meta, b.meta)
        assert a.dequantize().shape == view.shape


# Triton's interpreter computes the block ranges with numpy, which warns about the inf - inf this test feeds it
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises(bad, backend):
    x = torch.randn(100)
    x[37] = bad
    with pytest.raises(ValueError, match="1 non-finite value"):
        quantize(x, QuantConfig(), backend=backend)


def test_metadata_overflow_raises_and_suggests_fix():
    x = torch.tensor([1e5, -1e5, 3.0, 4.0])
    with pytest.raises(ValueError, match="does not fit the torch.float16 block metadata; use"):
        quantize(x, QuantConfig(block_size=4, meta_dtype=torch.float16), backend="torch")
    # bf16 metadata has the range
    quantize(x, QuantConfig(block_size=4, meta_dtype=torch.bfloat16), backend="torch")


def test_bad_input_types():
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64 tensor; got torch.int64"):
        quantize(torch.arange(10), QuantConfig())
    with pytest.raises(TypeError, match="got torch.complex64"):
        quantize(torch.zeros(3, dtype=torch.complex64), QuantConfig())
    with pytest.raises(TypeError, match="expects a torch.Tensor; got list"):
        quantize([1.0, 2.0], QuantConfig())
    with pytest.raises(TypeError, match="expects a QuantConfig; got dict"):
        quantize(torch.zeros(3), {"bits": 2})
    with pytest.raises(ValueError, match="unknown blockquant backend 'cuda-magic'"):
        quantize(torch.zeros(3), QuantConfig(), backend="cuda-magic")


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("g", [4, 5, 64, 1024, ROW])
@pytest.mark.parametrize("meta", [torch.float16, torch.float32], ids=str)
def test_nbytes_formula(bits, g, meta):
    x = torch.randn(37, 100)
    p = quantize(x, QuantConfig(bits=bits, block_size=g, meta_dtype=meta), seed=0, backend="torch")
    G = 100 if g == ROW else g
    n = x.numel()
    nb = math.ceil(n / G)
    if G * bits % 8 == 0:
        payload = math.ceil(n * bits / 8)  # no padding at all
    else:  # each block starts on a byte: stated padding
        payload = (nb - 1) * math.ceil(G * bits / 8) + math.ceil((n - (nb - 1) * G) * bits / 8)
    itemsize = meta.itemsize if hasattr(meta, "itemsize") else torch.tensor([], dtype=meta).element_size()
    meta_bytes = 2 * nb * itemsize
    assert p.nbytes == payload + meta_bytes
    # the buffers are exactly that large: no hidden oversized storage behind a view
    assert p.payload.untyped_storage().nbytes() == payload


def test_int2_block1024_fp16_under_2_05_bits_per_element():
    x = torch.randn(1 << 20)
    p = quantize(x, QuantConfig(bits=2, block_size=1024, meta_dtype=torch.float16), backend="torch")
    assert p.nbytes * 8 / x.numel() < 2.05


def test_repr_shows_the_essentials():
    p = quantize(torch.randn(10, 20), QuantConfig(bits=4, block_size=64), seed=0, backend="torch")
    r = repr(p)
    for part in ("bits=4", "block_size=64", "shape=(10, 20)", "dtype=torch.float32", f"nbytes={p.nbytes}"):
        assert part in r


def test_seed_reproducibility_and_default_seed():
    x = torch.randn(500)
    cfg = QuantConfig(bits=2, block_size=64)
    a = quantize(x, cfg, seed=11, backend="torch")
    b = quantize(x, cfg, seed=11, backend="torch")
    c = quantize(x, cfg, seed=12, backend="torch")
    assert torch.equal(a.payload, b.payload) and not torch.equal(a.payload, c.payload)
    torch.manual_seed(0)
    d = quantize(x, cfg, backend="torch")
    torch.manual_seed(0)
    e = quantize(x, cfg, backend="torch")
    assert d.seed == e.seed and torch.equal(d.payload, e.payload)


# --------------------------------------------------------------- projection
def test_projection_is_regenerated_not_stored():
    x = torch.randn(50, 64)
    cfg = QuantConfig(bits=2, block_size=ROW, rp_ratio=8)
    p = quantize(x, cfg, seed=3, backend="torch")
    assert p.proj_dims == (64, 8)
    assert p.stored_shape == (50, 8)
    assert torch.equal(p.projection(), p.projection())
    # nothing of the size of P (64 x 8 floats) is held
    assert p.nbytes == 50 * 8 * 2 // 8 + 2 * 50 * 2
    # ratio >= D: no projection at all
    assert quantize(torch.randn(4, 3), QuantConfig(rp_ratio=8), backend="torch").proj_dims is not None
    assert quantize(torch.randn(4, 1), QuantConfig(rp_ratio=8), backend="torch").proj_dims is None


def test_projection_expectation_is_identity():
    d, r = 32, 4
    acc = torch.zeros(d, d, dtype=torch.float64)
    trials = 2000
    for s in range(trials):
        p = blockquant.projection.rademacher(d, r, s, "cpu").double()
        acc += p @ p.t()
    acc /= trials
    # entries of P P^T are +-1/r averages: off-diagonal mean has s.e. 1/sqrt(r * trials)
    assert torch.allclose(torch.diagonal(acc), torch.ones(d, dtype=torch.float64))
    off = acc - torch.diag(torch.diagonal(acc))
    assert off.abs().max() < 6 / math.sqrt(r * trials)


def test_projected_dequantize_unbiased():
    torch.manual_seed(8)
    x = torch.randn(6, 16)
    cfg = QuantConfig(bits=2, block_size=ROW, rp_ratio=4, meta_dtype=torch.float32)
    trials = 3000
    acc = torch.zeros_like(x, dtype=torch.float64)
    acc2 = torch.zeros_like(acc)
    for s in range(trials):
        y = quantize(x, cfg, seed=s, backend="torch").dequantize().double()
        acc += y
        acc2 += y * y
    mean = acc / trials
    se = ((acc2 / trials - mean ** 2) / trials).sqrt()
    assert torch.all((mean - x.double()).abs() <= 5 * se + 1e-6)


def test_backend_selection(monkeypatch):
    assert get_backend(torch.device("cpu"), "torch").name == "torch"
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "torch")
    assert get_backend(torch.device("cpu")).name == "torch"
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown blockquant backend 'nope'"):
        get_backend(torch.device("cpu"))
