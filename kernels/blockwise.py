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

import os
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


# ----------------------------------------------------------------------------
# Triton backend
# ----------------------------------------------------------------------------
#
# One fused program handles BB whole blocks as a [BB, CB, PER] tile: PER = 8 / b
# codes share a byte, CB bytes make one chunk of CHUNK = CB * PER elements of a
# block. A block that fits one chunk is loaded once (small G: many blocks per
# program); a larger block is swept twice in CHUNK pieces (min/max, then encode),
# one block per program. The block size is therefore independent of the launch
# shape: any G from 1 to 65536 works.
#
# Bit-exactness with the reference under nearest rounding needs:
#  * IEEE division (``div_rn``): plain ``/`` compiles to an approximate divide;
#  * no FMA contraction (launch with ``enable_fp_fusion=False``), because the
#    reference computes ``lo + step * l_q`` as a separate multiply and add;
#  * bfloat16 conversions done on the bit pattern (round to nearest even): the
#    interpreter's own float32 -> bfloat16 cast truncates.
# 16-bit tensors (bf16 input/output, fp16/bf16 metadata) cross the kernel
# boundary as int16 views for the same reason.

_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the PyTorch reference works without it
    triton = None
    tl = None
    HAS_TRITON = False

# element kinds of kernel operands (constexpr codes)
_F32, _F16, _BF16 = 0, 1, 2
_KIND = {torch.float32: _F32, torch.float16: _F16, torch.bfloat16: _BF16}

# Elements per program. The interpreter runs programs one after another in
# Python, so fewer, larger tiles keep CPU tests quick; on a GPU smaller tiles
# give enough programs to fill the machine.
_GPU_TILE, _GPU_CHUNK = 4096, 4096
_INTERP_TILE, _INTERP_CHUNK = 16384, 16384


def triton_supports(device) -> bool:
    """True when the Triton kernels can run on tensors of ``device``.

    CUDA devices always (if Triton is installed); CPU only when
    ``TRITON_INTERPRET=1`` was set before this module was imported.
    """
    if not HAS_TRITON:
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return True
    return dev.type == "cpu" and _INTERPRET_AT_IMPORT


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _tile_shape(block: int, bits: int, device: torch.device, chunk: Optional[int] = None):
    """``(BB, CB, PER, one_chunk)`` for blocks of ``block`` elements."""
    per = 8 // bits
    on_gpu = device.type == "cuda"
    tile = _GPU_TILE if on_gpu else _INTERP_TILE
    chunk = chunk or (_GPU_CHUNK if on_gpu else _INTERP_CHUNK)
    chunk = max(_next_pow2(chunk), per)
    cb_full = _next_pow2(-(-block // per))  # bytes needed to cover a block, rounded to a power of two
    if cb_full * per <= chunk:
        bb = max(1, _next_pow2(tile // (cb_full * per) + 1) // 2)  # largest power of two <= tile / width
        return bb, cb_full, per, True
    return 1, chunk // per, per, False


def _split_seed(seed: int):
    """Two non-negative int32 halves of a 62-bit seed (int32 arguments never trigger re-specialisation)."""
    s = int(seed) & ((1 << 62) - 1)
    return s & 0x7FFFFFFF, (s >> 31) & 0x7FFFFFFF


def _as_kernel_arg(t: torch.Tensor) -> torch.Tensor:
    """16-bit float tensors travel as int16 bit patterns (see the section comment)."""
    return t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t


if HAS_TRITON:

    @triton.jit
    def _bf16_bits_rne(v):
        """float32 -> bfloat16 bit pattern (int32 holding 16 bits), round to nearest even, NaN kept."""
        u = v.to(tl.uint32, bitcast=True)
        pat = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.int32)
        return tl.where(v != v, 0x7FC0, pat)

    @triton.jit
    def _load_f32(ptr, offs, mask, KIND: tl.constexpr):
        if KIND == 0:
            v = tl.load(ptr + offs, mask=mask, other=0.0)
        elif KIND == 1:
            v = tl.load(ptr + offs, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)
        else:
            v = (tl.load(ptr + offs, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        return v

    @triton.jit
    def _store_from_f32(ptr, offs, v, mask, KIND: tl.constexpr):
        if KIND == 0:
            tl.store(ptr + offs, v, mask=mask)
        elif KIND == 1:
            tl.store(ptr + offs, v.to(tl.float16).to(tl.int16, bitcast=True), mask=mask)
        else:
            tl.store(ptr + offs, _bf16_bits_rne(v).to(tl.int16), mask=mask)

    @triton.jit
    def _round_meta_tl(v, META: tl.constexpr, UP: tl.constexpr):
        """Directed rounding of float32 ``v`` to the metadata dtype, as :func:`round_meta`.

        Returns ``(value as float32, what to store)``: the float32 itself, or the
        16-bit pattern (as int32) for fp16/bf16 metadata.
        """
        if META == 0:
            res_v = v
            res_store = v
        else:
            if META == 1:
                pat = v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                back = pat.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            else:
                pat = _bf16_bits_rne(v)
                back = (pat << 16).to(tl.float32, bitcast=True)
            if UP:
                wrong = back < v
                away = back > 0.0
                tiny = 0x0001
            else:
                wrong = back > v
                away = back < 0.0
                tiny = 0x8001
            finite = tl.abs(back) < float("inf")
            # one step on the bit pattern moves one representable value; zero steps to the tiny subnormal
            nxt = tl.where(back == 0.0, tiny, tl.where(away, pat + 1, pat - 1) & 0xFFFF)
            pat = tl.where(wrong & finite, nxt, pat)
            if META == 1:
                res_v = pat.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            else:
                res_v = (pat << 16).to(tl.float32, bitcast=True)
            res_store = pat.to(tl.int16)
        return res_v, res_store

    @triton.jit
    def _uniform_per_code(seed, byte_id, PER: tl.constexpr):
        """U[0, 1) noise of shape [BB, CB, PER] from global byte ids [BB, CB].

        One Philox call yields four 32-bit words, so a byte's codes share a call
        (two calls for the 8 codes of a 1-bit byte) instead of one call per
        element: the counter-based RNG is the kernel's main arithmetic cost.
        Counters are unique per byte and word, so all draws are independent.
        """
        k = tl.arange(0, PER)[None, None, :]
        if PER == 1:
            r = tl.rand(seed, byte_id)[:, :, None]
        elif PER == 8:
            a0, a1, a2, a3 = tl.rand4x(seed, byte_id * 2)
            b0, b1, b2, b3 = tl.rand4x(seed, byte_id * 2 + 1)
            lo4 = tl.where(k == 0, a0[:, :, None], tl.where(k == 1, a1[:, :, None],
                           tl.where(k == 2, a2[:, :, None], a3[:, :, None])))
            hi4 = tl.where(k == 4, b0[:, :, None], tl.where(k == 5, b1[:, :, None],
                           tl.where(k == 6, b2[:, :, None], b3[:, :, None])))
            r = tl.where(k < 4, lo4, hi4)
        else:
            r0, r1, r2, r3 = tl.rand4x(seed, byte_id)
            r = tl.where(k == 0, r0[:, :, None], tl.where(k == 1, r1[:, :, None],
                         tl.where(k == 2, r2[:, :, None], r3[:, :, None])))
        return r

    @triton.jit
    def _encode_tile(x, lo, step, levels_ptr, byte_id, seed, BITS: tl.constexpr, OPTIMAL: tl.constexpr,
                     STOCHASTIC: tl.constexpr):
        """Codes (int32) of a float32 tile ``x`` [BB, CB, PER] with per-row ``lo``/``step`` [BB, 1, 1].

        ``byte_id`` [BB, CB] numbers each output byte globally (the RNG counter).
        """
        TOP: tl.constexpr = (1 << BITS) - 1
        pos = step > 0.0
        safe = tl.where(pos, step, 1.0)
        t = tl.where(pos, tl.math.div_rn(x - lo, safe), 0.0)
        t = tl.minimum(tl.maximum(t, 0.0), TOP * 1.0)
        if OPTIMAL:
            # largest k in [0, L-2] with levels[k] <= t (binary search, one probe per bit)
            k = tl.zeros(t.shape, dtype=tl.int32)
            for i in tl.static_range(BITS):
                cand = k + (1 << (BITS - 1 - i))
                ok = cand <= TOP - 1
                lv = tl.load(levels_ptr + cand, mask=ok, other=0.0)
                k = tl.where(ok & (lv <= t), cand, k)
            lk = tl.load(levels_ptr + k)
            lk1 = tl.load(levels_ptr + k + 1)
            t = k.to(tl.float32) + tl.math.div_rn(t - lk, lk1 - lk)
        if STOCHASTIC:
            r = _uniform_per_code(seed, byte_id, 8 // BITS)
        else:
            r = 0.5
        q = tl.floor(t + r)
        q = tl.minimum(tl.maximum(q, 0.0), TOP * 1.0)
        return q.to(tl.int32)

    # G and BPB stay specialisable: knowing they are multiples of 16 lets the compiler
    # vectorise the block loads and stores; the seed never triggers a recompile
    @triton.jit(do_not_specialize=["n", "nb", "seed_lo", "seed_hi"])
    def _quantize_kernel(x_ptr, payload_ptr, meta_ptr, levels_ptr, n, G, BPB, nb, seed_lo, seed_hi,
                         X_KIND: tl.constexpr, META: tl.constexpr, BITS: tl.constexpr, OPTIMAL: tl.constexpr,
                         STOCHASTIC: tl.constexpr, BB: tl.constexpr, CB: tl.constexpr, PER: tl.constexpr,
                         ONE_CHUNK: tl.constexpr):
        TOP: tl.constexpr = (1 << BITS) - 1
        CHUNK: tl.constexpr = CB * PER
        pid = tl.program_id(0).to(tl.int64)
        blk = pid * BB + tl.arange(0, BB).to(tl.int64)                # [BB]
        row_ok = blk < nb
        start = blk * G
        length = tl.minimum(n - start, G)                              # valid elements of each block
        byte_i = tl.arange(0, CB)
        j0 = byte_i[None, :, None] * PER + tl.arange(0, PER)[None, None, :]   # [1, CB, PER]
        shifts = tl.arange(0, PER)[None, None, :] * BITS
        seed = seed_hi.to(tl.int64) * 2147483648 + seed_lo.to(tl.int64)
        start3 = start[:, None, None]
        len3 = length[:, None, None]
        ok3 = row_ok[:, None, None]

        # ---- sweep 1: block min / max (NaN made explicit: Triton's min/max may skip it)
        if ONE_CHUNK:
            valid = ok3 & (j0 < len3)
            x = _load_f32(x_ptr, start3 + j0, valid, X_KIND)
            mn = tl.min(tl.min(tl.where(valid, x, float("inf")), axis=2), axis=1)
            mx = tl.max(tl.max(tl.where(valid, x, float("-inf")), axis=2), axis=1)
            nan = tl.max(tl.max((valid & (x != x)).to(tl.int32), axis=2), axis=1)
        else:
            mn = tl.full((BB,), float("inf"), tl.float32)
            mx = tl.full((BB,), float("-inf"), tl.float32)
            nan = tl.zeros((BB,), tl.int32)
            for c in range(0, tl.cdiv(G, CHUNK)):
                jc = j0 + c * CHUNK
                valid = ok3 & (jc < len3)
                xc = _load_f32(x_ptr, start3 + jc, valid, X_KIND)
                mn = tl.minimum(mn, tl.min(tl.min(tl.where(valid, xc, float("inf")), axis=2), axis=1))
                mx = tl.maximum(mx, tl.max(tl.max(tl.where(valid, xc, float("-inf")), axis=2), axis=1))
                nan = tl.maximum(nan, tl.max(tl.max((valid & (xc != xc)).to(tl.int32), axis=2), axis=1))
        mn = tl.where(nan > 0, float("nan"), mn)
        mx = tl.where(nan > 0, float("nan"), mx)

        # ---- metadata, rounded outward so the stored range covers the block
        lo, lo_store = _round_meta_tl(mn, META, False)
        step_raw = tl.math.div_rn(mx - lo, tl.full((BB,), TOP, tl.float32))
        step, step_store = _round_meta_tl(step_raw, META, True)
        tl.store(meta_ptr + blk, lo_store, mask=row_ok)
        tl.store(meta_ptr + nb + blk, step_store, mask=row_ok)
        lo3 = lo[:, None, None]
        step3 = step[:, None, None]

        # ---- sweep 2: encode and pack PER codes per byte
        # Padding past the end of the tensor (inside the last block) encodes x = 0 and
        # codes past the block end are 0, exactly as the reference's padded layout.
        if ONE_CHUNK:
            q = _encode_tile(x, lo3, step3, levels_ptr, blk[:, None] * BPB + byte_i[None, :], seed,
                             BITS, OPTIMAL, STOCHASTIC)
            q = tl.where(j0 < G, q, 0)
            packed = tl.sum(q << shifts, axis=2)
            bvalid = row_ok[:, None] & (byte_i[None, :] * PER < length[:, None])
            tl.store(payload_ptr + blk[:, None] * BPB + byte_i[None, :], packed.to(tl.uint8), mask=bvalid)
        else:
            for c in range(0, tl.cdiv(G, CHUNK)):
                jc = j0 + c * CHUNK
                xc = _load_f32(x_ptr, start3 + jc, ok3 & (jc < len3), X_KIND)
                bc = byte_i[None, :] + c * CB
                q = _encode_tile(xc, lo3, step3, levels_ptr, blk[:, None] * BPB + bc, seed,
                                 BITS, OPTIMAL, STOCHASTIC)
                q = tl.where(jc < G, q, 0)
                packed = tl.sum(q << shifts, axis=2)
                bvalid = row_ok[:, None] & (bc * PER < length[:, None])
                tl.store(payload_ptr + blk[:, None] * BPB + bc, packed.to(tl.uint8), mask=bvalid)

    @triton.jit(do_not_specialize=["n", "nb"])
    def _dequantize_kernel(payload_ptr, meta_ptr, levels_ptr, out_ptr, n, G, BPB, nb,
                           OUT_KIND: tl.constexpr, META: tl.constexpr, BITS: tl.constexpr,
                           OPTIMAL: tl.constexpr, BB: tl.constexpr, CB: tl.constexpr, PER: tl.constexpr,
                           ONE_CHUNK: tl.constexpr):
        CHUNK: tl.constexpr = CB * PER
        MASK: tl.constexpr = (1 << BITS) - 1
        pid = tl.program_id(0).to(tl.int64)
        blk = pid * BB + tl.arange(0, BB).to(tl.int64)
        row_ok = blk < nb
        start = blk * G
        length = tl.minimum(n - start, G)
        lo = _load_f32(meta_ptr, blk, row_ok, META)[:, None, None]
        step = _load_f32(meta_ptr, nb + blk, row_ok, META)[:, None, None]
        byte_i = tl.arange(0, CB)
        j0 = byte_i[None, :, None] * PER + tl.arange(0, PER)[None, None, :]
        shifts = tl.arange(0, PER)[None, None, :] * BITS
        n_chunks = 1
        if not ONE_CHUNK:
            n_chunks = tl.cdiv(G, CHUNK)
        for c in range(0, n_chunks):
            bc = byte_i[None, :] + c * CB
            bvalid = row_ok[:, None] & (bc * PER < length[:, None])
            byte = tl.load(payload_ptr + blk[:, None] * BPB + bc, mask=bvalid, other=0).to(tl.int32)
            code = (byte[:, :, None] >> shifts) & MASK
            if OPTIMAL:
                val = tl.load(levels_ptr + code)
            else:
                val = code.to(tl.float32)
            xhat = lo + step * val
            jc = j0 + c * CHUNK
            valid = row_ok[:, None, None] & (jc < length[:, None, None])
            _store_from_f32(out_ptr, start[:, None, None] + jc, xhat, valid, OUT_KIND)


def _check_triton_device(t: torch.Tensor) -> None:
    if not triton_supports(t.device):
        raise RuntimeError(
            f"the Triton codec cannot run on {t.device}: it needs a CUDA tensor, or TRITON_INTERPRET=1 set "
            "before triton is imported for CPU tensors; use the 'torch' backend instead")


def _levels_arg(levels: Optional[Sequence[float]], bits: int, device) -> torch.Tensor:
    if levels is None:
        return torch.zeros(1, dtype=torch.float32, device=device)  # never read
    lv = levels_tensor(levels, device)
    if lv.numel() != (1 << bits):
        raise ValueError(f"levels must hold 2**bits = {1 << bits} values for bits={bits}; got {lv.numel()}")
    return lv


def _check_codec_args(block: int, bits: int, meta_dtype: torch.dtype) -> None:
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be one of (1, 2, 4, 8); got {bits!r}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer; got {block!r}")
    if meta_dtype not in _KIND:
        raise ValueError(f"meta_dtype must be float32, float16 or bfloat16; got {meta_dtype}")


def quantize_triton(flat: torch.Tensor, block: int, bits: int, meta_dtype: torch.dtype,
                    levels: Optional[Sequence[float]], stochastic: bool, seed: int, *,
                    _chunk: Optional[int] = None):
    """Fused Triton encoder with the semantics and layout of :func:`quantize_torch`.

    Under nearest rounding the payload and metadata are bit-identical to the
    reference. Stochastic rounding draws Philox noise (``tl.rand4x`` keyed by
    ``seed``, counted by output byte), so it agrees with the reference in
    distribution, not bit for bit.
    A block containing NaN gets NaN metadata (Inf already yields non-finite
    metadata), which the caller reports. ``_chunk`` overrides the chunk length
    (tests use it to reach the multi-chunk path on small inputs).
    """
    if not HAS_TRITON:
        raise RuntimeError("quantize_triton needs the 'triton' package; use the 'torch' backend")
    _check_codec_args(block, bits, meta_dtype)
    _check_triton_device(flat)
    if flat.dtype not in _KIND:
        raise TypeError(f"quantize_triton expects float32, float16 or bfloat16 input; got {flat.dtype}")
    flat = flat.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    if n == 0:
        raise ValueError("quantize_triton expects a non-empty tensor (the caller handles n == 0)")
    dev = flat.device
    nb = -(-n // block)
    bpb = -(-block * bits // 8)
    payload = torch.empty(payload_bytes(n, block, bits), dtype=torch.uint8, device=dev)
    meta = torch.empty((2, nb), dtype=meta_dtype, device=dev)
    bb, cb, per, one = _tile_shape(block, bits, dev, _chunk)
    seed_lo, seed_hi = _split_seed(seed)
    grid = (triton.cdiv(nb, bb),)
    _quantize_kernel[grid](
        _as_kernel_arg(flat), payload, _as_kernel_arg(meta), _levels_arg(levels, bits, dev),
        n, block, bpb, nb, seed_lo, seed_hi,
        X_KIND=_KIND[flat.dtype], META=_KIND[meta_dtype], BITS=bits, OPTIMAL=levels is not None,
        STOCHASTIC=bool(stochastic), BB=bb, CB=cb, PER=per, ONE_CHUNK=one,
        enable_fp_fusion=False, num_warps=4)
    return payload, meta


def dequantize_triton(payload: torch.Tensor, meta: torch.Tensor, n: int, block: int, bits: int,
                      levels: Optional[Sequence[float]], out_dtype: torch.dtype, *,
                      _chunk: Optional[int] = None) -> torch.Tensor:
    """Triton decoder with the semantics of :func:`dequantize_torch` (bit-identical output)."""
    if not HAS_TRITON:
        raise RuntimeError("dequantize_triton needs the 'triton' package; use the 'torch' backend")
    _check_codec_args(block, bits, meta.dtype)
    _check_triton_device(payload)
    if out_dtype not in _KIND:
        raise TypeError(f"dequantize_triton outputs float32, float16 or bfloat16; got {out_dtype}")
    dev = payload.device
    out = torch.empty(n, dtype=out_dtype, device=dev)
    if n == 0:
        return out
    nb = -(-n // block)
    if payload.numel() != payload_bytes(n, block, bits) or tuple(meta.shape) != (2, nb):
        raise ValueError(
            f"payload/meta do not match n={n}, block={block}, bits={bits}: expected {payload_bytes(n, block, bits)} "
            f"payload bytes and meta of shape (2, {nb}); got {payload.numel()} bytes and {tuple(meta.shape)}")
    bb, cb, per, one = _tile_shape(block, bits, dev, _chunk)
    grid = (triton.cdiv(nb, bb),)
    _dequantize_kernel[grid](
        payload.contiguous(), _as_kernel_arg(meta.contiguous()), _levels_arg(levels, bits, dev),
        _as_kernel_arg(out), n, block, -(-block * bits // 8), nb,
        OUT_KIND=_KIND[out_dtype], META=_KIND[meta.dtype], BITS=bits, OPTIMAL=levels is not None,
        BB=bb, CB=cb, PER=per, ONE_CHUNK=one, enable_fp_fusion=False, num_warps=4)
    return out
