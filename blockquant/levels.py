"""Variance-minimising quantization levels (i-Exact's model, any bit width).

A block of ``d`` values is normalised to ``[0, L-1]`` (``L = 2**bits``) by its
own minimum and maximum. i-Exact models the normalised values as a normal
``N((L-1)/2, sigma_d**2)`` clipped to ``[0, L-1]``, with
``sigma_d = ((L-1)/2) / |Phi^-1(1/d)|`` so that the expected extremes of ``d``
draws land on the block ends. Stochastic rounding between neighbouring levels
``a < b`` has variance ``(x - a)(b - x)``; we choose the ``L - 2`` inner levels
(kept symmetric about the centre) that minimise its expectation. Mass beyond
the ends sits exactly on a level and adds no variance.
"""
from __future__ import annotations

import functools
import math
import statistics
from typing import Tuple

import torch

_SQRT2 = math.sqrt(2.0)


def _phi(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _Phi(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(z / _SQRT2))


def block_sigma(bits: int, d: int) -> float:
    """Standard deviation of the clipped-normal model for a block of ``d`` values."""
    half = ((1 << bits) - 1) / 2.0
    if d <= 2:
        # Phi^-1(1/2) = 0: with two values or fewer both sit on the block ends,
        # so the inner levels never matter; any finite spread will do
        return half
    # plain Python (Wichura's AS241, double precision): no tensor read back, nothing for dynamo to break on
    q = abs(statistics.NormalDist().inv_cdf(1.0 / d))
    return half / q


def expected_variance(levels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Expected stochastic-rounding variance for sorted ``levels`` spanning ``[0, L-1]``.

    Closed form of ``sum_k  integral_{l_k}^{l_k+1} (x - l_k)(l_k+1 - x) phi(x; mu, sigma) dx``
    with ``mu`` the centre of the range. Differentiable in ``levels``.
    """
    levels = levels.to(torch.float64)
    mu = (levels[-1] + levels[0]) / 2.0
    a, b = levels[:-1], levels[1:]
    za, zb = (a - mu) / sigma, (b - mu) / sigma
    m0 = _Phi(zb) - _Phi(za)
    dphi = _phi(za) - _phi(zb)
    m1 = mu * m0 + sigma * dphi
    m2 = (mu * mu + sigma * sigma) * m0 + 2.0 * mu * sigma * dphi + sigma * sigma * (za * _phi(za) - zb * _phi(zb))
    return (-m2 + (a + b) * m1 - a * b * m0).sum()


def uniform_levels(bits: int) -> Tuple[float, ...]:
    return tuple(float(k) for k in range(1 << bits))


@functools.lru_cache(maxsize=None)
def optimal_levels(bits: int, block_size: int) -> Tuple[float, ...]:
    """The ``2**bits`` levels on ``[0, 2**bits - 1]`` minimising expected rounding variance.

    For INT2 the levels are ``(0, alpha, 3 - alpha, 3)``; ``alpha`` agrees with
    i-Exact's numerically integrated optimum (e.g. 1.139 at ``block_size=1024``).
    For 1 bit there are no inner levels and the result is ``(0, 1)``.
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"optimal_levels: bits must be one of (1, 2, 4, 8); got {bits!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"optimal_levels: block_size must be a positive integer; got {block_size!r}")
    L = 1 << bits
    top = float(L - 1)
    if L == 2:
        return (0.0, 1.0)
    sigma = block_sigma(bits, block_size)
    n_free = L // 2  # gaps in the lower half plus the middle gap
    # Parametrise gap widths by softmax logits so levels stay sorted and span [0, L-1].
    logits = torch.zeros(n_free, dtype=torch.float64, requires_grad=True)

    def levels_from(lg: torch.Tensor) -> torch.Tensor:
        # L - 1 gaps (always odd): the lower half and the middle gap, mirrored
        gaps = torch.cat([lg, lg[:-1].flip(0)])
        w = torch.softmax(gaps, 0) * top
        return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w, 0)])

    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = expected_variance(levels_from(logits), sigma)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    lv = levels_from(logits.detach())
    lv[0], lv[-1] = 0.0, top
    # exact symmetry removes round-off drift
    lv = (lv + (top - lv.flip(0))) / 2.0
    return tuple(float(v) for v in lv)


def variance_reduction(bits: int, block_size: int) -> float:
    """Relative change of expected variance, optimal vs uniform levels (negative = better)."""
    sigma = block_sigma(bits, block_size)
    u = expected_variance(torch.tensor(uniform_levels(bits)), sigma)
    o = expected_variance(torch.tensor(optimal_levels(bits, block_size)), sigma)
    return float(o / u - 1.0)
