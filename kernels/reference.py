"""The block-wise low-bit codec in plain PyTorch: the reference every backend must match.

This module defines the codec: the layout below, the metadata rounding and the
encoding arithmetic. The compiled backends (:mod:`blockquant.kernels.blockwise`,
Triton, for CUDA; :mod:`blockquant.kernels.native`, C, for the CPU) produce the same
payload and metadata bit for bit under nearest rounding, and the same distribution
under stochastic rounding; their tests compare against :func:`quantize_torch` and
:func:`dequantize_torch`. It is also the default kernel of the codec ops for every
device type without a registered one (:mod:`blockquant.kernels.ops`).

Layout:

* The input is flattened to ``n`` elements and cut into ``nb = ceil(n / G)``
  blocks of ``G`` consecutive elements; the last block may be short.
* ``meta`` is a ``(2, nb)`` tensor in the metadata dtype: row 0 is the block's
  lower bound ``lo`` (its minimum rounded *down* to the metadata dtype), row 1
  the level spacing ``step = (max - lo) / (L - 1)`` rounded *up*, so the stored
  range always covers the block and encoding uses exactly the values decoding
  will see (no metadata bias).
* Codes are ``b``-bit integers. Each block's codes start on a byte boundary and
  occupy ``ceil(G * b / 8)`` bytes (``ceil(len * b / 8)`` for the short last
  block); within a byte, element ``j`` of a group of ``8 / b`` sits at bits
  ``[j*b, (j+1)*b)`` (little-endian). When ``G * b`` is a multiple of 8 there
  is no padding and the payload is exactly ``ceil(n * b / 8)`` bytes.
* Encoding, in float32: ``t = clamp((x - lo) / step, 0, L-1)`` (``t = 0`` when
  ``step == 0``); with levels ``l_0 = 0 < ... < l_{L-1} = L-1`` find the
  interval ``l_k <= t < l_{k+1}`` and set ``u = k + (t - l_k) / (l_{k+1} - l_k)``
  (``u = t`` for uniform levels); then ``q = clamp(floor(u + r), 0, L-1)``
  with ``r ~ U[0, 1)`` (stochastic) or ``r = 0.5`` (nearest).
* Decoding: ``x_hat = lo + step * l_q`` in float32, cast to the output dtype.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch

# ----------------------------------------------------------------------------
# Shared by every backend: sizes, argument checks, constant tensors
# ----------------------------------------------------------------------------

#: element kinds of compiled-kernel operands (the Triton constexprs and the C ABI's codes)
KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def payload_bytes(n: int, block: int, bits: int) -> int:
    """Bytes of packed codes for ``n`` elements in blocks of ``block``."""
    if n == 0:
        return 0
    nb = -(-n // block)
    per_block = -(-block * bits // 8)
    tail = n - (nb - 1) * block
    return (nb - 1) * per_block + (-(-tail * bits // 8))


def _step_toward(r: torch.Tensor, up: bool) -> torch.Tensor:
    """Next representable value of ``r`` (in its own dtype) toward +inf (up) or -inf."""
    iv = r.view(_INT_VIEW[r.dtype])
    one = torch.ones((), dtype=iv.dtype, device=r.device)
    # for positive values, +1 on the bit pattern moves away from zero; for negative, toward it
    away = (r > 0) if up else (r < 0)
    nxt = torch.where(away, iv + one, iv - one).view(r.dtype)
    # zero (either sign) steps to the smallest subnormal of the right sign
    tiny = torch.full_like(iv, 1).view(r.dtype)
    nxt = torch.where(r == 0, tiny if up else -tiny, nxt)
    return nxt


def round_meta(values: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Round float32 ``values`` to ``dtype`` toward +inf (``up``) or -inf.

    Non-finite values pass through (the caller reports them).
    """
    if dtype == torch.float32:
        return values.to(torch.float32)
    r = values.to(dtype)
    back = r.to(torch.float32)
    wrong = (back < values) if up else (back > values)
    return torch.where(wrong & torch.isfinite(r), _step_toward(r, up), r)


def check_codec_args(block: int, bits: int, meta_dtype: torch.dtype) -> None:
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be one of (1, 2, 4, 8); got {bits!r}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer; got {block!r}")
    if meta_dtype not in KIND:
        raise ValueError(f"meta_dtype must be float32, float16 or bfloat16; got {meta_dtype}")


def encoder_input(flat: torch.Tensor, encoder: str) -> torch.Tensor:
    """``flat`` as a compiled encoder reads it: float32, float16 or bfloat16, non-empty, one
    contiguous dimension (raises naming ``encoder`` otherwise)."""
    if flat.dtype not in KIND:
        raise TypeError(f"{encoder} expects float32, float16 or bfloat16 input; got {flat.dtype}")
    flat = flat.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.numel() == 0:
        raise ValueError(f"{encoder} expects a non-empty tensor (the caller handles n == 0)")
    return flat


def check_decode_args(payload: torch.Tensor, meta: torch.Tensor, n: int, block: int, bits: int) -> None:
    """The payload and metadata sizes a decoder of ``n`` elements expects (a mismatch would read out of bounds)."""
    nb = -(-n // block)
    if payload.numel() != payload_bytes(n, block, bits) or tuple(meta.shape) != (2, nb):
        raise ValueError(
            f"payload/meta do not match n={n}, block={block}, bits={bits}: expected {payload_bytes(n, block, bits)} "
            f"payload bytes and meta of shape (2, {nb}); got {payload.numel()} bytes and {tuple(meta.shape)}")


@functools.lru_cache(maxsize=256)
def _levels_on(levels: Tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(levels, dtype=torch.float32, device=device)


def levels_tensor(levels: Sequence[float], device) -> torch.Tensor:
    """``levels`` as a float32 tensor on ``device``, built once per (levels, device): a tensor built
    from Python floats on a GPU is a host-to-device copy, which would wait for the device at every
    call. Shared: never modify the result."""
    return _levels_on(tuple(float(v) for v in levels), torch.device(device))


def levels_arg(levels: Optional[Sequence[float]], bits: int, device) -> Optional[torch.Tensor]:
    """The levels a compiled kernel reads (None for uniform levels), checked against ``bits``."""
    if levels is None:
        return None
    if len(levels) != (1 << bits):
        raise ValueError(f"levels must hold 2**bits = {1 << bits} values for bits={bits}; got {len(levels)}")
    return levels_tensor(levels, device)


# ----------------------------------------------------------------------------
# The reference codec
# ----------------------------------------------------------------------------


def _pad_blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    n = flat.numel()
    nb = -(-n // block)
    pad = nb * block - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(nb, block)


def block_meta_torch(flat: torch.Tensor, block: int, bits: int, meta_dtype: torch.dtype) -> torch.Tensor:
    """Per-block ``(lo, step)`` as a ``(2, nb)`` tensor of ``meta_dtype``."""
    n = flat.numel()
    x = _pad_blocks(flat.to(torch.float32), block)
    nb = x.shape[0]
    tail = n - (nb - 1) * block
    if tail < block:
        # keep the padding out of the statistics
        last = x[-1, :tail]
        lo_last, hi_last = last.min(), last.max()
    mn = x.amin(dim=1)
    mx = x.amax(dim=1)
    if tail < block:
        mn[-1], mx[-1] = lo_last, hi_last
    lo = round_meta(mn, meta_dtype, up=False)
    # divide by a tensor, not a Python scalar: CUDA turns division by a CPU scalar
    # into multiplication by its reciprocal, which is not the IEEE quotient the CPU
    # and the Triton kernel compute, so the two devices' metadata could differ by an ulp
    step = (mx - lo.to(torch.float32)) / torch.full_like(mx, float((1 << bits) - 1))
    step = round_meta(step, meta_dtype, up=True)
    return torch.stack([lo, step])


def _encode_torch(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int,
                  levels: Optional[torch.Tensor], noise: Optional[torch.Tensor]) -> torch.Tensor:
    top = float((1 << bits) - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    t = torch.where(step > 0, (x - lo) / safe, torch.zeros_like(x)).clamp_(0.0, top)
    if levels is not None:
        # interval index k with levels[k] <= t < levels[k+1], k in [0, L-2]
        k = torch.searchsorted(levels, t, right=True).sub_(1).clamp_(0, (1 << bits) - 2)
        lk = levels[k]
        t = k.to(torch.float32) + (t - lk) / (levels[k + 1] - lk)
    r = noise if noise is not None else 0.5
    return torch.floor(t + r).clamp_(0.0, top).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a ``(nb, G)`` uint8 code matrix row by row; returns ``(nb, ceil(G*bits/8))`` bytes."""
    if bits == 8:
        return codes.contiguous()
    per = 8 // bits
    nb, g = codes.shape
    pad = (-g) % per
    if pad:
        codes = torch.cat([codes, codes.new_zeros(nb, pad)], dim=1)
    c = codes.view(nb, -1, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(nb, ceil(G*bits/8))`` bytes to ``(nb, G)`` codes."""
    if bits == 8:
        return packed[:, :g]
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    mask = (1 << bits) - 1
    c = (packed.unsqueeze(-1) >> shifts) & mask
    return c.reshape(packed.shape[0], -1)[:, :g]


def _flat_payload(packed_rows: torch.Tensor, n: int, block: int, bits: int) -> torch.Tensor:
    """Concatenate per-block bytes, trimming the short last block to its own size."""
    total = payload_bytes(n, block, bits)
    flat = packed_rows.reshape(-1)
    # clone a trimmed view so the stored buffer is exactly ``total`` bytes
    return flat if flat.numel() == total else flat[:total].clone()


def _rows_from_payload(payload: torch.Tensor, n: int, block: int, bits: int) -> torch.Tensor:
    nb = -(-n // block)
    per_block = -(-block * bits // 8)
    need = nb * per_block
    if payload.numel() < need:
        payload = torch.cat([payload, payload.new_zeros(need - payload.numel())])
    return payload.view(nb, per_block)


def quantize_torch(flat: torch.Tensor, block: int, bits: int, meta_dtype: torch.dtype,
                   levels: Optional[Sequence[float]], stochastic: bool, seed: int):
    """Reference encoder. ``flat`` is a 1-D contiguous float tensor with ``n > 0``.

    Returns ``(payload uint8[payload_bytes], meta[2, nb])``.
    """
    n = flat.numel()
    meta = block_meta_torch(flat, block, bits, meta_dtype)
    x = _pad_blocks(flat.to(torch.float32), block)
    lo = meta[0].to(torch.float32).unsqueeze(1)
    step = meta[1].to(torch.float32).unsqueeze(1)
    noise = None
    if stochastic:
        gen = torch.Generator(device=flat.device)
        gen.manual_seed(int(seed))
        noise = torch.rand(x.shape, generator=gen, device=flat.device, dtype=torch.float32)
    lv = levels_tensor(levels, flat.device) if levels is not None else None
    codes = _encode_torch(x, lo, step, bits, lv, noise)
    return _flat_payload(pack_codes(codes, bits), n, block, bits), meta


def dequantize_torch(payload: torch.Tensor, meta: torch.Tensor, n: int, block: int, bits: int,
                     levels: Optional[Sequence[float]], out_dtype: torch.dtype) -> torch.Tensor:
    """Reference decoder: returns a 1-D tensor of ``n`` elements in ``out_dtype``."""
    rows = _rows_from_payload(payload, n, block, bits)
    codes = unpack_codes(rows, bits, block)
    if levels is not None:
        vals = levels_tensor(levels, payload.device)[codes.long()]
    else:
        vals = codes.to(torch.float32)
    lo = meta[0].to(torch.float32).unsqueeze(1)
    step = meta[1].to(torch.float32).unsqueeze(1)
    x = lo + step * vals
    return x.reshape(-1)[:n].to(out_dtype)


def codes_torch(payload: torch.Tensor, n: int, block: int, bits: int) -> torch.Tensor:
    """Unpacked codes as a flat uint8 tensor of ``n`` elements (for tests and tools)."""
    rows = _rows_from_payload(payload, n, block, bits)
    return unpack_codes(rows, bits, block).reshape(-1)[:n]
