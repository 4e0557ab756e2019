"""Rounding and dropout seeds under ``torch.distributed``: independent per rank, reproducible.

Every seed blockquant draws (stochastic rounding, random projection, dropout
masks) comes from ``blockquant.packed.draw_seed``: one draw from PyTorch's
default CPU generator, passed through :func:`rank_seed` with this process's
rank. Seed every rank with the same ``torch.manual_seed(user_seed)`` (the usual
data-parallel recipe, so that every rank builds the same initial weights) and

* each rank's rounding noise is independent of the others' (distinct seeds),
  so averaging gradients across ranks averages the noise down;
* every seed of every rank follows from ``user_seed`` and the rank alone, so a
  run is reproducible;
* rank 0, and any process without an initialised process group, draws exactly
  the seeds a single-process run draws.

The rank is read from ``torch.distributed`` at each draw (no state is kept
here); ``rank_seed`` is a pure function so the mapping can be checked.
"""
from __future__ import annotations

__all__ = ["rank_seed", "process_rank"]

_MASK64 = (1 << 64) - 1
_SEED_BITS = (1 << 62) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(z: int) -> int:
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def rank_seed(seed: int, rank: int) -> int:
    """The seed rank ``rank`` uses for a draw ``seed`` of the shared generator.

    ``rank_seed(s, 0) == s``; for ``rank > 0`` a splitmix64 hash of ``s`` and
    ``rank``, so different ranks get unrelated seeds from the same draw.
    Result in ``[0, 2**62)``.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank_seed: rank must be a non-negative int; got {rank!r}")
    seed = int(seed)
    if rank == 0:
        return seed & _SEED_BITS
    return _splitmix64(seed ^ _splitmix64(rank)) & _SEED_BITS


def process_rank() -> int:
    """This process's global rank in the default process group (0 when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0
