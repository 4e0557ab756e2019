"""Fused Triton kernels for the block-wise codec: one encoder and one decoder, launched per tensor.

They compute what the PyTorch reference (:mod:`blockquant.kernels.reference`, where
the layout is defined) computes, in one fused pass: under nearest rounding the payload,
metadata and decoded values are bit-identical to the reference's. They run on CUDA
tensors (registered for ``"cuda"`` in :mod:`blockquant.kernels.ops`), and on CPU
tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
triton was imported (how the tests check them without a GPU).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional, Sequence

import torch

from .reference import KIND as _KIND
from .reference import check_codec_args, check_decode_args, encoder_input, levels_arg, payload_bytes

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

# Elements per program. The interpreter runs programs one after another in
# Python, so fewer, larger tiles keep CPU tests quick; on a GPU smaller tiles
# give enough programs to fill the machine.
_GPU_TILE, _GPU_CHUNK = 4096, 4096
NUM_WARPS = 4
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


@functools.lru_cache(maxsize=None)
def _unused_levels(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.float32, device=device)


def _levels_ptr(levels: Optional[Sequence[float]], bits: int, device: torch.device) -> torch.Tensor:
    """The levels the kernel reads; for uniform levels a one-element tensor it never reads (built once per device)."""
    lv = levels_arg(levels, bits, device)
    return _unused_levels(device) if lv is None else lv


def _on_device(device: torch.device):
    """Launch on ``device``: Triton launches on the current CUDA device, which need not be the
    tensors' (a model on ``cuda:1`` without ``torch.cuda.set_device(1)``)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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
    check_codec_args(block, bits, meta_dtype)
    _check_triton_device(flat)
    flat = encoder_input(flat, "quantize_triton")
    n = flat.numel()
    dev = flat.device
    nb = -(-n // block)
    bpb = -(-block * bits // 8)
    payload = torch.empty(payload_bytes(n, block, bits), dtype=torch.uint8, device=dev)
    meta = torch.empty((2, nb), dtype=meta_dtype, device=dev)
    bb, cb, per, one = _tile_shape(block, bits, dev, _chunk)
    seed_lo, seed_hi = _split_seed(seed)
    grid = (triton.cdiv(nb, bb),)
    with _on_device(dev):
        _quantize_kernel[grid](
            _as_kernel_arg(flat), payload, _as_kernel_arg(meta), _levels_ptr(levels, bits, dev),
            n, block, bpb, nb, seed_lo, seed_hi,
            X_KIND=_KIND[flat.dtype], META=_KIND[meta_dtype], BITS=bits, OPTIMAL=levels is not None,
            STOCHASTIC=bool(stochastic), BB=bb, CB=cb, PER=per, ONE_CHUNK=one,
            enable_fp_fusion=False, num_warps=NUM_WARPS)
    return payload, meta


def dequantize_triton(payload: torch.Tensor, meta: torch.Tensor, n: int, block: int, bits: int,
                      levels: Optional[Sequence[float]], out_dtype: torch.dtype, *,
                      _chunk: Optional[int] = None) -> torch.Tensor:
    """Triton decoder with the semantics of :func:`dequantize_torch` (bit-identical output)."""
    if not HAS_TRITON:
        raise RuntimeError("dequantize_triton needs the 'triton' package; use the 'torch' backend")
    check_codec_args(block, bits, meta.dtype)
    _check_triton_device(payload)
    if out_dtype not in _KIND:
        raise TypeError(f"dequantize_triton outputs float32, float16 or bfloat16; got {out_dtype}")
    dev = payload.device
    out = torch.empty(n, dtype=out_dtype, device=dev)
    if n == 0:
        return out
    check_decode_args(payload, meta, n, block, bits)
    nb = -(-n // block)
    bb, cb, per, one = _tile_shape(block, bits, dev, _chunk)
    grid = (triton.cdiv(nb, bb),)
    with _on_device(dev):
        _dequantize_kernel[grid](
            payload.contiguous(), _as_kernel_arg(meta.contiguous()), _levels_ptr(levels, bits, dev),
            _as_kernel_arg(out), n, block, -(-block * bits // 8), nb,
            OUT_KIND=_KIND[out_dtype], META=_KIND[meta.dtype], BITS=bits, OPTIMAL=levels is not None,
            BB=bb, CB=cb, PER=per, ONE_CHUNK=one, enable_fp_fusion=False, num_warps=NUM_WARPS)
    return out
