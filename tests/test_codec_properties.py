"""Property-based checks of the codec over shapes, block sizes, bit widths and dtypes."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blockquant import ROW, QuantConfig, quantize
from blockquant.kernels.reference import payload_bytes

shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)
blocks = st.one_of(st.integers(4, 300), st.just(ROW))
configs = st.builds(
    QuantConfig,
    bits=st.sampled_from([1, 2, 4, 8]),
    block_size=blocks,
    levels=st.sampled_from(["uniform", "optimal"]),
    rounding=st.sampled_from(["stochastic", "nearest"]),
    meta_dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
)


@settings(max_examples=150, deadline=None)
@given(shape=shapes, cfg=configs, seed=st.integers(0, 2**40), scale=st.floats(1e-3, 1e3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_round_trip_properties(shape, cfg, seed, scale, dtype):
    gen = torch.Generator().manual_seed(seed % 2**31)
    x = (torch.randn(shape, generator=gen) * scale).to(dtype)
    p = quantize(x, cfg, seed=seed, backend="torch")
    y = p.dequantize()
    assert y.shape == x.shape and y.dtype == x.dtype
    n = x.numel()
    g = cfg.block_size_for(x.shape[-1] if x.dim() else 1)
    assert p.block == g
    nb = math.ceil(n / g) if n else 0
    assert p.meta.shape == (2, nb)
    assert p.nbytes == payload_bytes(n, g, cfg.bits) + 2 * nb * p.meta.element_size()
    if n == 0:
        return
    # every decoded value stays inside its block's stored range, which covers the block
    blk = torch.arange(n) // g
    lo = p.meta[0].float()[blk]
    hi = lo + p.meta[1].float()[blk] * (2 ** cfg.bits - 1)
    xf, yf = x.float().reshape(-1), y.float().reshape(-1)
    tol = 1e-2 * xf.abs().max() + 1e-6 if dtype != torch.float32 else 1e-5 * xf.abs().max() + 1e-7
    assert torch.all(yf >= lo - tol) and torch.all(yf <= hi + tol)
    assert torch.all(lo <= xf.reshape(-1) + tol) and torch.all(xf <= hi + tol)
    # an element moves by at most one level spacing (the widest gap of the level set)
    widest = max(b - a for a, b in zip(p_levels(p)[:-1], p_levels(p)[1:]))
    assert torch.all((yf - xf).abs() <= p.meta[1].float()[blk] * widest * 1.001 + tol)
    # codes fit the bit width
    assert int(p.codes().max()) < 2 ** cfg.bits


def p_levels(p):
    from blockquant.levels import optimal_levels, uniform_levels

    c = p.config
    return optimal_levels(c.bits, p.block) if c.levels == "optimal" else uniform_levels(c.bits)
