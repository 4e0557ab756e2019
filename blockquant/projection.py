"""Seeded Rademacher random projection (EXACT), regenerated from its seed, never stored."""
from __future__ import annotations

import math

import torch


def projected_dim(in_dim: int, ratio: int) -> int:
    """Columns kept by a projection with ``ratio``: ``ceil(in_dim / ratio)``."""
    return max(1, -(-int(in_dim) // int(ratio)))


def stored_width(width: int, ratio: int) -> int:
    """Columns the codec stores for rows of ``width`` under a projection of ``ratio``.

    The one rule deciding whether a tensor is projected: ``projected_dim(width, ratio)`` when
    ``ratio > 1``, ``width > 1`` and that is fewer columns than ``width``; otherwise ``width``
    itself (stored unprojected). :func:`blockquant.quantize`, the chunking of large tensors and
    the byte formula (:func:`blockquant.packed.packed_nbytes`) all ask this function.
    """
    width, ratio = int(width), int(ratio)
    if ratio > 1 and width > 1:
        r = projected_dim(width, ratio)
        if r < width:
            return r
    return width


def rademacher(in_dim: int, out_dim: int, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """``in_dim x out_dim`` matrix of ``+-1/sqrt(out_dim)`` drawn from ``seed``.

    ``E[P @ P.T] = I``, so ``(x @ P) @ P.T`` is an unbiased estimate of ``x``.
    The same ``(seed, device)`` always gives the same matrix.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    signs = torch.randint(0, 2, (in_dim, out_dim), generator=gen, device=device, dtype=torch.int8)
    return (signs.to(dtype) * 2 - 1) * (1.0 / math.sqrt(out_dim))
