"""Block-wise low-bit codec: PyTorch reference (this section) and fused Triton kernels.

Layout (both backends produce it bit for bit under nearest rounding):

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

import math
from typing import Optional, Sequence

import torch

# ----------------------------------------------------------------------------
# Shared helpers (used by both backends)
# ----------------------------------------------------------------------------

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


def levels_tensor(levels: Sequence[float], device) -> torch.Tensor:
    return torch.tensor(list(levels), dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------
# PyTorch reference backend
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
    step = (mx - lo.to(torch.float32)) / float((1 << bits) - 1)
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
