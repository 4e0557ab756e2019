"""The codec compiled for the CPU: ``native_codec.c`` built at first use, called through ctypes.

The PyTorch reference (:mod:`blockquant.kernels.reference`) makes about ten
full-size passes with float temporaries; this backend makes one fused pass per
block (min/max, metadata, encode and pack while the block is in cache), with
the same layout and the same float32 arithmetic, so that under nearest
rounding its payload, metadata and decoded values are bit-identical to the
reference's. Stochastic rounding draws its noise from a counter-based hash of
``(seed, block, index in the block)``: unbiased with the same per-element
variance, but not the reference's ``torch.rand`` stream.

Build: the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``)
compiles the source once, in about a second, into
``$BLOCKQUANT_CACHE_DIR`` (default ``~/.cache/blockquant``), keyed by the
source, the flags and the CPU, so later processes load it in milliseconds.
Where there is no compiler, or the build or a self-check fails, or
``BLOCKQUANT_NATIVE=0`` is set, :func:`available` is False, the registry picks
the ``torch`` backend instead, and :func:`unavailable_reason` says why.

Threads: the blocks are split into ``torch.get_num_threads()`` contiguous
ranges, each encoded by one call (ctypes releases the GIL during the call).
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch

from .reference import KIND as _KIND
from .reference import check_codec_args, check_decode_args, levels_arg, payload_bytes

DISABLE_ENV = "BLOCKQUANT_NATIVE"
CACHE_ENV = "BLOCKQUANT_CACHE_DIR"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native_codec.c")
ABI_VERSION = 1
# -ffp-contract=off keeps ``lo + step * l`` a separate multiply and add (no FMA),
# as the reference computes it; never -ffast-math (IEEE division, NaN checks).
BASE_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math")
# tried in order: the host's vector units first, a portable build if the compiler refuses
ARCH_FLAGS = (("-march=native",), ())
# below this many elements per thread, splitting costs more than it saves
MIN_ELEMENTS_PER_THREAD = 1 << 18
COMPILE_TIMEOUT_S = 120
# decoded outputs from this size on are faulted in as 2 MiB pages (see bq_advise_huge_pages)
HUGE_PAGE_MIN_BYTES = 8 << 20

_lock = threading.Lock()
_state = {"lib": None, "reason": None, "tried": False}
_pool: Optional[ThreadPoolExecutor] = None
_pool_pid: Optional[int] = None


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cache_dir() -> str:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "blockquant")


def _cpu_signature() -> str:
    """The CPU's feature flags: a cached -march=native build must not move to another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(cc: str, source: bytes, out_dir: str):
    """Path of the built library, or ``(None, reason)`` for the last failed attempt."""
    reason = "no attempt"
    for arch in ARCH_FLAGS:
        flags = (*BASE_FLAGS, *arch)
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cc.encode(),
                                         _cpu_signature().encode()])).hexdigest()[:20]
        target = os.path.join(out_dir, f"native_codec-{key}.so")
        if os.path.exists(target):
            return target, None
        os.makedirs(out_dir, exist_ok=True)
        # build under a private name, then rename: concurrent processes never load a half-written file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, "-o", tmp, SOURCE], capture_output=True, text=True,
                                  timeout=COMPILE_TIMEOUT_S)
            if proc.returncode == 0:
                os.replace(tmp, target)
                return target, None
            last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
            reason = f"{os.path.basename(cc)} {' '.join(flags)} failed: {last}"
        except (OSError, subprocess.SubprocessError) as e:
            reason = f"running {cc} failed: {e}"
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return None, reason


def _declare(lib) -> None:
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.bq_quantize.argtypes = [vp, ctypes.c_int, i64, i64, ctypes.c_int, ctypes.c_int, vp, ctypes.c_int,
                                ctypes.c_uint64, vp, vp, i64, i64, i64]
    lib.bq_quantize.restype = ctypes.c_int
    lib.bq_dequantize.argtypes = [vp, vp, ctypes.c_int, vp, i64, i64, ctypes.c_int, ctypes.c_int, vp, i64, i64, i64]
    lib.bq_dequantize.restype = ctypes.c_int
    lib.bq_abi_version.restype = ctypes.c_int
    lib.bq_advise_huge_pages.argtypes = [vp, i64]
    lib.bq_advise_huge_pages.restype = ctypes.c_int


def _load():
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None, f"disabled by {DISABLE_ENV}=0"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (install gcc or clang, or set CC)"
    try:
        with open(SOURCE, "rb") as f:
            source = f.read()
    except OSError as e:
        return None, f"cannot read {SOURCE}: {e}"
    try:
        path, reason = _compile(cc, source, _cache_dir())
    except OSError as e:  # e.g. an unwritable cache directory
        return None, f"cannot build in {_cache_dir()} ({e}); set {CACHE_ENV} to a writable directory"
    if path is None:
        return None, reason
    try:
        lib = ctypes.CDLL(path)
        _declare(lib)
        if lib.bq_abi_version() != ABI_VERSION:
            return None, f"{path} has ABI {lib.bq_abi_version()}, expected {ABI_VERSION}"
    except (OSError, AttributeError) as e:
        return None, f"cannot load {path}: {e}"
    reason = _self_check(lib)
    return (lib, None) if reason is None else (None, reason)


def _self_check(lib) -> Optional[str]:
    """Compare with the reference on a small input; a miscompiled build is never used."""
    from .reference import dequantize_torch, quantize_torch

    x = torch.linspace(-3.0, 5.0, 1000) ** 3
    # uniform and non-uniform levels at the two widths that have their own code paths
    cases = ((2, None), (2, (0.0, 1.2, 1.8, 3.0)), (4, None), (4, tuple(15.0 * (i / 15) ** 1.3 for i in range(16))))
    for (bits, lv), meta_dtype in itertools.product(cases, (torch.bfloat16, torch.float16)):
        ref = quantize_torch(x, 64, bits, meta_dtype, lv, False, 0)
        got = _quantize(lib, x, 64, bits, meta_dtype, lv, False, 0, threads=1)
        if not (torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])):
            return f"the compiled codec disagrees with the PyTorch reference (self-check, int{bits}); not used"
        dec = _dequantize(lib, ref[0], ref[1], x.numel(), 64, bits, lv, torch.float32, threads=1)
        if not torch.equal(dec, dequantize_torch(ref[0], ref[1], x.numel(), 64, bits, lv, torch.float32)):
            return f"the compiled decoder disagrees with the PyTorch reference (self-check, int{bits}); not used"
    return None


def _library():
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["lib"], _state["reason"] = _load()
                _state["tried"] = True
    return _state["lib"]


def available() -> bool:
    """True when the compiled codec can be used here (builds it on the first call)."""
    return _library() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (``None`` when it is True)."""
    _library()
    return _state["reason"]


def supports(device) -> bool:
    return torch.device(device).type == "cpu" and available()


def _reset_for_tests() -> None:
    """Forget the loaded library so that the next call builds or fails afresh."""
    with _lock:
        _state.update(lib=None, reason=None, tried=False)


# ----------------------------------------------------------------- launching


def _ranges(nb: int, n: int, threads: Optional[int]):
    t = threads if threads is not None else torch.get_num_threads()
    t = max(1, min(t, nb, -(-n // MIN_ELEMENTS_PER_THREAD)))
    edges = [nb * i // t for i in range(t + 1)]
    return [(edges[i], edges[i + 1]) for i in range(t) if edges[i] < edges[i + 1]]


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """The codec's worker threads; a forked child (e.g. a DataLoader worker) gets its own,
    since the parent's threads do not exist there and work sent to them would never run."""
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid() or _pool._max_workers < workers:
        _pool = ThreadPoolExecutor(max_workers=max(workers, os.cpu_count() or 1),
                                   thread_name_prefix="blockquant-codec")
        _pool_pid = os.getpid()
    return _pool


def _run(call, ranges) -> None:
    if len(ranges) == 1:
        codes = [call(*ranges[0])]
    else:
        codes = list(_thread_pool(len(ranges)).map(lambda r: call(*r), ranges))
    if any(c != 0 for c in codes):
        raise RuntimeError(f"the compiled blockquant codec failed (status {codes}); "
                           f"set {DISABLE_ENV}=0 to use the PyTorch backend and please report this")


def _quantize(lib, flat, block, bits, meta_dtype, levels, stochastic, seed, threads=None):
    n = flat.numel()
    nb = -(-n // block)
    payload = torch.empty(payload_bytes(n, block, bits), dtype=torch.uint8)
    meta = torch.empty((2, nb), dtype=meta_dtype)
    lv = levels_arg(levels, bits, "cpu")
    lv_ptr = lv.data_ptr() if lv is not None else None
    x_ptr, p_ptr, m_ptr = flat.data_ptr(), payload.data_ptr(), meta.data_ptr()
    x_kind, m_kind, seed = _KIND[flat.dtype], _KIND[meta_dtype], int(seed) & ((1 << 64) - 1)

    def call(b0, b1):
        return lib.bq_quantize(x_ptr, x_kind, n, block, bits, m_kind, lv_ptr, int(bool(stochastic)), seed,
                               p_ptr, m_ptr, nb, b0, b1)

    _run(call, _ranges(nb, n, threads))
    return payload, meta


def _dequantize(lib, payload, meta, n, block, bits, levels, out_dtype, threads=None):
    nb = -(-n // block)
    out = torch.empty(n, dtype=out_dtype)
    if out.numel() * out.element_size() >= HUGE_PAGE_MIN_BYTES:
        lib.bq_advise_huge_pages(out.data_ptr(), out.numel() * out.element_size())
    lv = levels_arg(levels, bits, "cpu")
    lv_ptr = lv.data_ptr() if lv is not None else None
    p_ptr, m_ptr, o_ptr = payload.data_ptr(), meta.data_ptr(), out.data_ptr()
    m_kind, o_kind = _KIND[meta.dtype], _KIND[out_dtype]

    def call(b0, b1):
        return lib.bq_dequantize(p_ptr, m_ptr, m_kind, lv_ptr, n, block, bits, o_kind, o_ptr, nb, b0, b1)

    _run(call, _ranges(nb, n, threads))
    return out


def _require(t: torch.Tensor):
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the compiled CPU codec is unavailable: {_state['reason']}; use the 'torch' backend")
    if t.device.type != "cpu":
        raise RuntimeError(f"the compiled codec runs on CPU tensors; got a tensor on {t.device}")
    return lib


def quantize_native(flat: torch.Tensor, block: int, bits: int, meta_dtype: torch.dtype,
                    levels: Optional[Sequence[float]], stochastic: bool, seed: int):
    """Compiled encoder with the semantics and layout of :func:`~blockquant.kernels.reference.quantize_torch`.

    Nearest rounding: payload and metadata bit-identical to the reference.
    Stochastic rounding: noise from a hash of ``(seed, block, index in the block)``.
    A block holding NaN or Inf gets non-finite metadata, which the caller reports.
    """
    check_codec_args(block, bits, meta_dtype)
    lib = _require(flat)
    if flat.dtype not in _KIND:
        raise TypeError(f"quantize_native expects float32, float16 or bfloat16 input; got {flat.dtype}")
    flat = flat.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.numel() == 0:
        raise ValueError("quantize_native expects a non-empty tensor (the caller handles n == 0)")
    return _quantize(lib, flat, block, bits, meta_dtype, levels, stochastic, seed)


def dequantize_native(payload: torch.Tensor, meta: torch.Tensor, n: int, block: int, bits: int,
                      levels: Optional[Sequence[float]], out_dtype: torch.dtype) -> torch.Tensor:
    """Compiled decoder, bit-identical to :func:`~blockquant.kernels.reference.dequantize_torch`."""
    check_codec_args(block, bits, meta.dtype)
    lib = _require(payload)
    if out_dtype not in _KIND:
        raise TypeError(f"dequantize_native outputs float32, float16 or bfloat16; got {out_dtype}")
    if n == 0:
        return torch.empty(0, dtype=out_dtype)
    check_decode_args(payload, meta, n, block, bits)
    return _dequantize(lib, payload.contiguous(), meta.contiguous(), n, block, bits, levels, out_dtype)
