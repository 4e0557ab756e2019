"""The codec as two ``torch.library`` ops, one kernel per device type: the dispatcher picks by device.

``blockquant::quantize_blockwise(flat, block, bits, meta_dtype, levels, stochastic, seed)
-> (payload, meta)`` and ``blockquant::dequantize_blockwise(payload, meta, n, block, bits,
levels, out_dtype) -> flat`` (arguments as in :func:`~blockquant.kernels.reference.quantize_torch`).
Their schemas and shape-only fake implementations are defined here once; the PyTorch reference
is the default kernel (every device type without its own); :func:`register_device_kernels`
registers a backend for one device type. ``blockquant/kernels/__init__.py`` registers Triton
for ``"cuda"`` and the compiled CPU codec for ``"cpu"`` (which falls back as
:func:`~blockquant.kernels.registry.default_backend` says).

:func:`quantize_blockwise` and :func:`dequantize_blockwise` are what the library calls: the
dispatcher's choice, or the backend forced by name or by ``BLOCKQUANT_BACKEND``
(:func:`~blockquant.kernels.registry.forced_backend`), called directly.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import reference
from .registry import forced_backend

_QUANTIZE = "blockquant::quantize_blockwise"
_DEQUANTIZE = "blockquant::dequantize_blockwise"


@torch.library.custom_op(_QUANTIZE, mutates_args=())
def _quantize_op(flat: torch.Tensor, block: int, bits: int, meta_dtype: torch.dtype, levels: Optional[List[float]],
                 stochastic: bool, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return reference.quantize_torch(flat, block, bits, meta_dtype, levels, stochastic, seed)


@_quantize_op.register_fake
def _(flat, block, bits, meta_dtype, levels, stochastic, seed):
    n = flat.numel()
    nb = -(-n // block)
    return (flat.new_empty(reference.payload_bytes(n, block, bits), dtype=torch.uint8),
            flat.new_empty((2, nb), dtype=meta_dtype))


@torch.library.custom_op(_DEQUANTIZE, mutates_args=())
def _dequantize_op(payload: torch.Tensor, meta: torch.Tensor, n: int, block: int, bits: int,
                   levels: Optional[List[float]], out_dtype: torch.dtype) -> torch.Tensor:
    return reference.dequantize_torch(payload, meta, n, block, bits, levels, out_dtype)


@_dequantize_op.register_fake
def _(payload, meta, n, block, bits, levels, out_dtype):
    return payload.new_empty(n, dtype=out_dtype)


def register_device_kernels(device_type: str, quantize: Callable, dequantize: Callable) -> None:
    """Run ``quantize`` / ``dequantize`` (a backend's pair) for tensors of ``device_type``."""
    _quantize_op.register_kernel(device_type)(quantize)
    _dequantize_op.register_kernel(device_type)(dequantize)


def quantize_blockwise(flat: torch.Tensor, block: int, bits: int, meta_dtype: torch.dtype,
                       levels: Optional[Sequence[float]], stochastic: bool, seed: int,
                       backend: Optional[str] = None):
    """Encode non-empty 1-D ``flat``: ``(payload, meta)``. ``backend`` forces one by name."""
    forced = forced_backend(flat.device, backend)
    lv = None if levels is None else list(levels)
    if forced is not None:
        return forced.quantize(flat, block, bits, meta_dtype, lv, stochastic, seed)
    return _quantize_op(flat, block, bits, meta_dtype, lv, bool(stochastic), int(seed))


def dequantize_blockwise(payload: torch.Tensor, meta: torch.Tensor, n: int, block: int, bits: int,
                         levels: Optional[Sequence[float]], out_dtype: torch.dtype,
                         backend: Optional[str] = None) -> torch.Tensor:
    """Decode ``n`` values (flat, ``out_dtype``). ``backend`` forces one by name."""
    forced = forced_backend(payload.device, backend)
    lv = None if levels is None else list(levels)
    if forced is not None:
        return forced.dequantize(payload, meta, n, block, bits, lv, out_dtype)
    return _dequantize_op(payload, meta, n, block, bits, lv, out_dtype)
