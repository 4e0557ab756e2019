"""One draw from the user's random stream per training forward: :func:`forward_seeds`.

Every seed blockquant uses (stochastic rounding, random projection, dropout masks, BatchNorm's
square samples) comes from :func:`blockquant.packed.draw_seed_tensor`. Outside a converted
model's training forward each call is one draw from PyTorch's default CPU generator. Inside it
(:func:`blockquant.convert` opens :func:`forward_seeds` around the root's ``forward``) the forward
draws **once** from that generator, on entry, and every seed of the forward is derived from that
base seed and a counter. So

* a converted model advances the user's random stream by exactly one draw per training forward,
  whatever the graph's size (one seed per ~1M-element chunk would make the advance depend on it);
* ``torch.manual_seed`` still reproduces a run: the base seed is drawn from it;
* under ``torch.distributed`` the base seed is mixed with the rank (:func:`blockquant.distributed.rank_seed`),
  so ranks seeded alike get independent noise;
* dropout masks are derived from a counter of their own: the ``k``-th dropout call of a forward gets
  the same mask whatever else the forward compresses (two configs run with the same seed drop
  the same entries, and a lossless stand-in codec sees the masks of the compressed run).

Derivation: seed ``i`` of stream ``s`` is ``splitmix64(base ^ splitmix64(s * 2**40 + i))`` (62 bits),
the same mixer as the rank seeds. Under ``torch.compile`` the stream is not used (each seed is a
random op inside the compiled graph, drawn from the default generator as outside a converted model).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Iterator, Optional

import torch

from .distributed import _splitmix64, process_rank, rank_seed

__all__ = ["forward_seeds", "SeedStream", "STREAMS"]

STREAMS = ("codec", "dropout")
"""The purposes that have a counter of their own (rounding / projection / sampling seeds, and dropout masks)."""

_SEED_BITS = (1 << 62) - 1
_STREAM_SHIFT = 40


class SeedStream:
    """The seeds of one forward: a base seed and one counter per purpose (:data:`STREAMS`)."""

    __slots__ = ("base", "counters")

    def __init__(self, base: int):
        self.base = int(base) & _SEED_BITS
        self.counters: Dict[str, int] = {}

    def next(self, purpose: str = "codec") -> int:
        """The next seed of ``purpose`` (an int in ``[0, 2**62)``)."""
        if purpose not in STREAMS:
            raise ValueError(f"SeedStream.next: purpose must be one of {STREAMS}; got {purpose!r}")
        i = self.counters.get(purpose, 0)
        self.counters[purpose] = i + 1
        key = (STREAMS.index(purpose) << _STREAM_SHIFT) + i
        return _splitmix64(self.base ^ _splitmix64(key)) & _SEED_BITS


_ACTIVE: "contextvars.ContextVar[Optional[SeedStream]]" = contextvars.ContextVar("blockquant_seed_stream",
                                                                                 default=None)


def active_stream() -> Optional[SeedStream]:
    """The stream of the forward being run (``None`` outside :func:`forward_seeds` and under ``torch.compile``)."""
    if torch.compiler.is_compiling():
        return None
    return _ACTIVE.get()


def seed_value(seed: torch.Tensor) -> int:
    """A seed tensor's value as a Python int: the one place seeds are read.

    Seeds are 0-d int64 CPU tensors (drawn from the CPU generator, or a user's seed moved to
    the CPU once by :func:`blockquant.packed.as_seed_tensor`), so this read never waits for a device.
    :func:`blockquant.host_syncs.count_host_syncs` counts reads made here as host reads, not
    device syncs; a tensor on another device is refused, not read.
    """
    if seed.device.type != "cpu":
        raise ValueError(f"blockquant seeds are CPU tensors (host scalars); got one on {seed.device}")
    return int(seed)


def draw_base_seed() -> int:
    """One draw from PyTorch's default CPU generator, mixed with the process's rank."""
    return rank_seed(seed_value(torch.randint(0, 1 << 62, (), dtype=torch.int64)), process_rank())


@contextlib.contextmanager
def forward_seeds() -> Iterator[SeedStream]:
    """Derive every seed drawn inside the block from one draw made on entry (nested blocks share
    the outermost stream, so a converted model inside another one draws nothing extra)."""
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    stream = SeedStream(draw_base_seed())
    token = _ACTIVE.set(stream)
    try:
        yield stream
    finally:
        _ACTIVE.reset(token)
