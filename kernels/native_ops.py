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
from .reference import KIND as _KIND
from .reference import payload_bytes

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
        lib.bq_quantize_affine.argtypes = [vp, i64, i64, vp, vp, i64, ctypes.c_int, ctypes.c_int, vp, ctypes.c_int,
                                           ctypes.c_uint64, vp, vp, i64, i64, i64]
        lib.bq_bn_sums.argtypes = [vp, vp, vp, ctypes.c_int, vp, i64, i64, ctypes.c_int, i64, i64, i64, i64, vp, vp]
        lib.bq_bn_dx.argtypes = [vp, vp, vp, ctypes.c_int, vp, i64, i64, ctypes.c_int, i64, i64, i64, i64, vp, vp, vp,
                                 f32, ctypes.c_int, vp]
        lib.bq_heads_spmm.argtypes = [vp, vp, vp, vp, vp, i64, i64, vp, i64, i64]
        lib.bq_heads_sddmm.argtypes = [vp, vp, vp, vp, i64, i64, vp, i64, i64, i64]
        for f in (lib.bq_dropout, lib.bq_relu_pack, lib.bq_mask_grad, lib.bq_quantize_affine, lib.bq_bn_sums,
                  lib.bq_bn_dx, lib.bq_heads_spmm, lib.bq_heads_sddmm):
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
    scale, kind, key = _scale_in(ref.dtype, p), _KIND[ref.dtype], native._seed_arg(seed)
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


# ----------------------------------------------------------------------------- normalisation and the codec

def quantize_affine(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, block: int, bits: int,
                    meta_dtype: torch.dtype, levels, stochastic: bool, seed) -> Tuple[torch.Tensor, torch.Tensor]:
    """The codec (``quantize_native``'s layout and noise) applied to ``(x - shift) * scale`` column-wise,
    ``x`` a contiguous float32 ``[rows, C]``, ``shift`` and ``scale`` float32 ``[C]``: a normalisation's
    output encoded without being stored. Returns ``(payload, meta)``."""
    lib = _lib()
    n, cols = x.numel(), x.shape[-1]
    nb = -(-n // block)
    payload = torch.empty(payload_bytes(n, block, bits), dtype=torch.uint8)
    meta = torch.empty((2, nb), dtype=meta_dtype)
    _lv, lv_ptr = native._levels_ptr(levels, bits)  # _lv keeps the levels alive during the calls
    sh, sc = shift.contiguous(), scale.contiguous()
    args = (x.data_ptr(), n, cols, sh.data_ptr(), sc.data_ptr(), block, bits, _KIND[meta_dtype], lv_ptr,
            int(bool(stochastic)), native._seed_arg(seed), payload.data_ptr(), meta.data_ptr(), nb)
    native._run(lambda b0, b1: lib.bq_quantize_affine(*args, b0, b1), native._ranges(nb, n, None))
    return payload, meta


def bn_backward(g: torch.Tensor, payload: torch.Tensor, meta: torch.Tensor, block: int, bits: int, levels,
                scale: Optional[torch.Tensor] = None, count: int = 1, diag: bool = False, sums=None,
                out: Optional[torch.Tensor] = None):
    """Two passes of batch normalisation's backward over one compressed ``xn`` (``[rows, C]``, float32 codes
    of ``quantize_affine``) and the float32 gradient ``g`` of the same shape, decoding block by block.

    With ``sums=None`` returns ``(sum_g, sum_gx)`` (float64 ``[C]``: column sums of ``g`` and ``g * xn``).
    Given ``sums = (mean_g, mean_gx)`` (float32 ``[C]``, over the whole normalisation), writes
    ``dx = scale * (g * (1 + xn^2 / count) - mean_g - xn * mean_gx)`` (without the ``xn^2`` term unless
    ``diag``), ``scale = weight * invstd``, into ``out`` (contiguous float32, ``g``'s shape; new when None)
    and returns it."""
    lib = _lib()
    g = g.contiguous()
    n, cols = g.numel(), g.shape[-1]
    nb = -(-n // block)
    _lv, lv_ptr = native._levels_ptr(levels, bits)  # _lv keeps the levels alive during the calls
    head = (g.data_ptr(), payload.data_ptr(), meta.data_ptr(), _KIND[meta.dtype], lv_ptr, n, block, bits, cols, nb)
    ranges = native._ranges(nb, n, None)
    if sums is None:
        acc = torch.zeros((len(ranges), 2, cols), dtype=torch.float64)
        ptrs = [(acc[i, 0].data_ptr(), acc[i, 1].data_ptr()) for i in range(len(ranges))]
        jobs = [(b0, b1, i) for i, (b0, b1) in enumerate(ranges)]
        native._run(lambda b0, b1, i: lib.bq_bn_sums(*head, b0, b1, *ptrs[i]), jobs)
        total = acc.sum(0)
        return total[0], total[1]
    mean_g, mean_gx = (t.to(torch.float32).contiguous() for t in sums)
    sc = scale.to(torch.float32).contiguous()
    out = torch.empty_like(g) if out is None else out
    if not (out.is_contiguous() and out.shape == g.shape and out.dtype == torch.float32):
        raise ValueError("bn_backward: out must be a contiguous float32 tensor of g's shape")
    native._run(lambda b0, b1: lib.bq_bn_dx(*head, b0, b1, sc.data_ptr(), mean_g.data_ptr(), mean_gx.data_ptr(),
                                            1.0 / count, int(bool(diag)), out.data_ptr()), ranges)
    return out


# ----------------------------------------------------------------------------- multi-head attention

def heads_applies(*tensors: torch.Tensor) -> bool:
    """Whether :func:`heads_spmm` / :func:`heads_sddmm` take these: float32 features and int32 indices on CPU."""
    return enabled(*[t for t in tensors if t.is_floating_point()]) and all(
        t.dtype == torch.float32 if t.is_floating_point() else t.dtype == torch.int32 for t in tensors)


def _work_ranges(n: int, per_item: int) -> List[Tuple[int, int]]:
    threads = max(1, min(torch.get_num_threads(), -(-n * max(per_item, 1) // native.MIN_ELEMENTS_PER_THREAD)))
    edges = [n * i // threads for i in range(threads + 1)]
    return [(edges[i], edges[i + 1]) for i in range(threads) if edges[i] < edges[i + 1]]


def heads_spmm(crow: torch.Tensor, nbr: torch.Tensor, eid: Optional[torch.Tensor], alpha: torch.Tensor,
               x: torch.Tensor, rows: int) -> torch.Tensor:
    """``out[j, h, :] = sum_{e in row j} alpha[edge, h] * x[nbr[edge], h, :]`` with ``edge = eid[e]`` (or ``e``):
    every head's sparse product in one pass over the CSR, ``[rows, H, C]``."""
    lib = _lib()
    alpha, x = alpha.contiguous(), x.contiguous()
    heads, channels = x.shape[1], x.shape[2]
    out = torch.empty((rows, heads, channels), dtype=x.dtype)
    args = (crow.data_ptr(), nbr.data_ptr(), eid.data_ptr() if eid is not None else None, alpha.data_ptr(),
            x.data_ptr(), heads, channels, out.data_ptr())
    if rows:
        native._run(lambda r0, r1: lib.bq_heads_spmm(*args, r0, r1),
                    _work_ranges(rows, max(1, alpha.shape[0] // max(rows, 1)) * heads * channels))
    return out


def heads_sddmm(src: torch.Tensor, dst: torch.Tensor, g: torch.Tensor, x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """``out[e - a, h] = <g[dst[e], h, :], x[src[e], h, :]>`` for edges ``[a, b)`` (``[b - a, H]``), no gathered
    ``[E, H, C]`` transient."""
    lib = _lib()
    g, x = g.contiguous(), x.contiguous()
    heads, channels = g.shape[1], g.shape[2]
    out = torch.empty((b - a, heads), dtype=g.dtype)
    args = (src.data_ptr(), dst.data_ptr(), g.data_ptr(), x.data_ptr(), heads, channels, out.data_ptr(), a)
    if b > a:
        ranges = [(a + lo, a + hi) for lo, hi in _work_ranges(b - a, heads * channels)]
        native._run(lambda e0, e1: lib.bq_heads_sddmm(*args, e0, e1), ranges)
    return out
