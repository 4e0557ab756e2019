"""Elementwise CPU ops compiled with the codec (``native_codec.c``): dropout, ReLU / LeakyReLU with their
1-bit masks, and batch normalisation fused with the codec, one pass each instead of PyTorch's several.

They run where the codec itself runs compiled: :func:`enabled` is true for a CPU tensor when the
backend registry picks ``native`` for the CPU (so ``BLOCKQUANT_BACKEND=torch`` and the Triton
interpreter of the tests select the PyTorch path everywhere) and outside ``torch.compile``
tracing; callers fall back to their PyTorch code otherwise. Work is split between
``torch.get_num_threads()`` threads as the codec's is.

Dropout here draws its mask from a counter-based hash of ``(seed, element index)`` (the codec's
noise construction), not from ``torch.Generator``: the same seed gives the same mask on every call
with this backend, with the keep probability ``1 - p`` to within ``2^-32``.
"""
from __future__ import annotations

import ctypes
from typing import List, Optional, Tuple

import torch

from . import native
from .blockwise import _KIND

#: dropout draws its noise in chunks of this many elements (the C side's DROP_CHUNK)
DROP_CHUNK = 4096
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_declared = {"done": False}


def _lib():
    lib = native._library()
    if lib is None:
        return None
    if not _declared["done"]:
        i64, vp, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        lib.bq_dropout.argtypes = [vp, ctypes.c_int, i64, ctypes.c_uint32, f32, ctypes.c_uint64, vp, i64, i64]
        lib.bq_relu_pack.argtypes = [vp, ctypes.c_int, i64, f32, ctypes.c_int, vp, vp, i64, i64]
        lib.bq_mask_grad.argtypes = [vp, ctypes.c_int, i64, vp, f32, vp, i64, i64]
        for f in (lib.bq_dropout, lib.bq_relu_pack, lib.bq_mask_grad):
            f.restype = ctypes.c_int
        _declared["done"] = True
    return lib


def enabled(*tensors: torch.Tensor) -> bool:
    """Whether the compiled ops handle these tensors (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in _DTYPES:
            return False
    from .registry import get_backend

    try:
        return get_backend(torch.device("cpu")).name == "native" and _lib() is not None
    except ValueError:
        return False


def _element_ranges(n: int, align: int) -> List[Tuple[int, int]]:
    """``[begin, end)`` ranges of about equal size for the threads, each beginning on a multiple of ``align``."""
    threads = max(1, min(torch.get_num_threads(), -(-n // native.MIN_ELEMENTS_PER_THREAD)))
    units = -(-n // align)
    edges = [units * i // threads * align for i in range(threads + 1)]
    edges[-1] = n
    return [(edges[i], min(edges[i + 1], n)) for i in range(threads) if edges[i] < min(edges[i + 1], n)]


def _seed_arg(seed) -> int:
    return int(seed) & ((1 << 64) - 1)


def _scale_in(dtype: torch.dtype, p: float) -> float:
    """``1 / (1 - p)`` as PyTorch computes it in ``dtype`` (``mask.div_(1 - p)``)."""
    return float(torch.ones((), dtype=dtype).div_(1.0 - p))


def dropout(x: Optional[torch.Tensor], p: float, seed, *, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x * mask / (1 - p)`` with the mask of ``seed`` (``0 <= p < 1``); with ``x=None`` the scaled mask
    itself, shaped and typed like ``like``."""
    lib = _lib()
    ref = x if x is not None else like
    src = x.contiguous() if x is not None else None
    out = torch.empty(ref.shape, dtype=ref.dtype)
    n = out.numel()
    if n == 0:
        return out
    threshold = min((1 << 32) - 1, int(round(p * 2.0 ** 32)))
    scale, kind, key = _scale_in(ref.dtype, p), _KIND[ref.dtype], _seed_arg(seed)
    x_ptr = src.data_ptr() if src is not None else None
    o_ptr = out.data_ptr()
    native._run(lambda a, b: lib.bq_dropout(x_ptr, kind, n, threshold, scale, key, o_ptr, a, b),
                _element_ranges(n, DROP_CHUNK))
    return out


def relu_pack(x: torch.Tensor, slope: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(relu(x) or leaky_relu(x, slope), the mask x > 0 packed 8 per byte)`` in one pass."""
    lib = _lib()
    src = x.contiguous()
    out = torch.empty_like(src)
    n = src.numel()
    bits = torch.empty(-(-n // 8), dtype=torch.uint8)
    if n == 0:
        return out, bits
    leaky = slope is not None
    s = float(slope) if leaky else 0.0  # leaky_relu multiplies by the float32 slope in every dtype
    kind, x_ptr, o_ptr, b_ptr = _KIND[x.dtype], src.data_ptr(), out.data_ptr(), bits.data_ptr()
    native._run(lambda a, b: lib.bq_relu_pack(x_ptr, kind, n, s, int(leaky), o_ptr, b_ptr, a, b),
                _element_ranges(n, 8))
    return out, bits


def mask_grad(g: torch.Tensor, bits: torch.Tensor, slope: Optional[float]) -> torch.Tensor:
    """``g * (bit ? 1 : slope)`` over the packed mask of :func:`relu_pack` (``slope=None``: ReLU, 0)."""
    lib = _lib()
    src = g.contiguous()
    out = torch.empty_like(src)
    n = src.numel()
    if n == 0:
        return out
    s = float(slope) if slope is not None else 0.0  # as leaky_relu_backward: the float32 slope in every dtype
    kind, g_ptr, b_ptr, o_ptr = _KIND[g.dtype], src.data_ptr(), bits.data_ptr(), out.data_ptr()
    native._run(lambda a, b: lib.bq_mask_grad(g_ptr, kind, n, b_ptr, s, o_ptr, a, b), _element_ranges(n, 8))
    return out
