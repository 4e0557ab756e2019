"""Boolean tensors packed 8 per byte (ReLU signs, saved bool tensors).

Layout: the mask is flattened (row-major) to ``n`` elements; element ``i``
is bit ``i % 8`` (least significant first) of byte ``i // 8``. The last byte
is zero-padded, so the payload is exactly ``ceil(n / 8)`` bytes.
"""
from __future__ import annotations

import functools

import torch

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


@functools.lru_cache(maxsize=None)
def _weights_on(device: torch.device) -> torch.Tensor:
    return torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=device)


def _weights(device) -> torch.Tensor:
    """The bit weights on ``device``, built once per device (from Python data it is a host-to-device
    copy on a GPU, which waits for the device). Shared: never modified. Under ``torch.compile`` a
    constant of the graph instead (dynamo does not trace through a cache)."""
    if torch.compiler.is_compiling():
        return torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=device)
    return _weights_on(torch.device(device))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (any shape) into a flat uint8 tensor of ``ceil(n / 8)`` bytes."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a torch.bool tensor; got {mask.dtype}")
    flat = mask.reshape(-1)
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8).to(torch.uint8)
    # the bits are disjoint, so the sum is an OR; uint8 never overflows (max 255)
    return (groups * _weights(mask.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(payload: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``n`` elements."""
    if payload.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects a torch.uint8 payload; got {payload.dtype}")
    if payload.numel() != -(-n // 8):
        raise ValueError(f"unpack_bits: {n} elements need {-(-n // 8)} bytes; got {payload.numel()}")
    bits = payload.view(-1, 1).bitwise_and(_weights(payload.device)).ne(0)
    return bits.view(-1)[:n]


class BitMask:
    """A bool tensor stored at one bit per element (0.125 B/elem).

    ``nbytes`` counts the payload's whole storage (``ceil(n / 8)`` bytes);
    :meth:`storages` lists the tensors held, like :class:`blockquant.PackedTensor`.
    """

    __slots__ = ("payload", "shape")

    def __init__(self, payload: torch.Tensor, shape):
        self.payload = payload
        self.shape = torch.Size(shape)

    @classmethod
    def pack(cls, mask: torch.Tensor) -> "BitMask":
        return cls(pack_bits(mask), mask.shape)

    def unpack(self) -> torch.Tensor:
        """The original bool tensor (same shape, contiguous)."""
        return unpack_bits(self.payload, self.shape.numel()).view(self.shape)

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.payload.device

    @property
    def nbytes(self) -> int:
        return self.payload.untyped_storage().nbytes()

    def storages(self):
        """The tensors whose storages this object keeps alive (for memory accounting)."""
        return (self.payload,)

    def __repr__(self) -> str:
        return f"BitMask(shape={tuple(self.shape)}, nbytes={self.nbytes})"
