"""The codec compiled for the CPU: ``native_codec.c`` built at first use, called through ctypes.

The PyTorch reference (:mod:`blockquant.kernels.reference`) makes about ten
full-size passes with float temporaries; this backend makes one fused pass per
block (min/max, metadata, encode and pack while the block is in cache), with
the same layout and the same float32 arithmetic, so that under nearest
rounding its payload, metadata and decoded values are bit-identical to the
reference's. Stochastic rounding draws its noise from a counter-based hash of
``(seed, block, index in the block)``: unbiased with the same per-element
variance, but not the reference's ``torch.rand`` stream.

Build: the system C compiler (``$CC``, split into words as a shell would, so
``CC="ccache gcc"`` works; else ``cc``, ``gcc`` or ``clang``) compiles the
source once into ``$BLOCKQUANT_CACHE_DIR`` (default
``$XDG_CACHE_HOME/blockquant`` or ``~/.cache/blockquant``), under a name that is
a hash of the source, the flags, the compiler (its command, and the size and
time of its files) and the CPU, so later processes load it in milliseconds.
The first use builds it (10-30 s on a loaded 2-core machine); ``python -m
blockquant.kernels --build`` builds it ahead of time (for an image, or a
cluster's shared home) and says why where it cannot. Processes starting
together (DDP ranks) compile once: the build holds a file lock in the cache
directory, the others wait for it and load its result.

The cache is trusted only as far as its owner: a library is loaded only from
a directory and a file owned by you (or root) that group and others cannot
write (a world-writable directory only with the sticky bit, like /tmp);
anything else is refused with the reason, since whoever can replace the file
runs code in your process. A read-only cache directory is fine when it holds
the build (made there with ``--build``); nothing is written then. Where there
is no build and it cannot be written, the codec is unavailable and the reason
says which directory and what to do.

Where there is no compiler, or the build, the cache or a self-check fails,
:func:`available` is False, the registry picks the ``torch`` backend instead,
:func:`unavailable_reason` says why, and the first such fallback in a process
warns once (:class:`CodecFallbackWarning`). ``BLOCKQUANT_NATIVE=0`` chooses the
``torch`` backend on purpose, without the warning.

Threads: the blocks are split into ``torch.get_num_threads()`` contiguous
ranges, each encoded by one call (ctypes releases the GIL during the call).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

import torch

from .reference import KIND as _KIND
from .reference import check_codec_args, check_decode_args, encoder_input, levels_arg, payload_bytes

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
BUILD_COMMAND = "python -m blockquant.kernels --build"
LOCK_NAME = "native_codec.lock"
# another process's build runs each compiler attempt for at most COMPILE_TIMEOUT_S
LOCK_TIMEOUT_S = COMPILE_TIMEOUT_S * len(ARCH_FLAGS) + 30
# decoded outputs from this size on are faulted in as 2 MiB pages (see bq_advise_huge_pages)
HUGE_PAGE_MIN_BYTES = 8 << 20

_lock = threading.Lock()
_state = {"lib": None, "reason": None, "path": None, "tried": False}
_pool: Optional[ThreadPoolExecutor] = None
_pool_pid: Optional[int] = None


class CodecFallbackWarning(RuntimeWarning):
    """The compiled CPU codec cannot be used here, so CPU tensors are compressed by the PyTorch
    backend: the same results, many times slower (13-106x in the codec table of docs/benchmarks.md)."""


class _Unavailable(Exception):
    """Why the compiled codec cannot be used here; the message is :func:`unavailable_reason`."""


def _compiler() -> Optional[List[str]]:
    """The C compiler command as argv words, or ``None`` where there is none.

    ``$CC`` is split as a shell would (``CC="ccache gcc"`` is two words), its first word
    looked up on PATH; without ``$CC``, the first of ``cc``, ``gcc``, ``clang`` on PATH.
    """
    cc = os.environ.get("CC", "")
    if cc.strip():
        try:
            words = shlex.split(cc)
        except ValueError as e:
            raise _Unavailable(f"CC={cc!r} cannot be split into words as a shell would ({e})") from None
        return [shutil.which(words[0]) or words[0], *words[1:]]
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
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


def _compiler_identity(cmd: Sequence[str]) -> str:
    """The compiler command, with the size and modification time of each of its words that is a
    file (the compiler, ccache): a compiler upgraded in place gets a build of its own."""
    parts = []
    for word in cmd:
        parts.append(word)
        found = word if os.sep in word else shutil.which(word)
        try:
            st = os.stat(found) if found else None
        except OSError:
            st = None
        if st is not None:
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return "\0".join(parts)


def _build_name(cmd: Sequence[str], flags: Sequence[str], source: bytes) -> str:
    """The cached library's file name: a hash of the source, the flags, the compiler and the CPU."""
    h = hashlib.sha256()
    for part in (source, " ".join(flags).encode(), _compiler_identity(cmd).encode(), _cpu_signature().encode(),
                 str(ABI_VERSION).encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return f"native_codec-{h.hexdigest()[:24]}.so"


_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def _untrusted(path: str, st: os.stat_result, is_dir: bool) -> Optional[str]:
    """Why ``path`` must not be trusted to hold code we load (``None`` when it may): it must
    belong to this user or root, and group and others must not be able to write it (a
    directory they can write only with the sticky bit, which stops them replacing our files)."""
    if not hasattr(os, "geteuid"):  # Windows: no POSIX owners to compare
        return None
    if not is_dir and not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    uid = os.geteuid()
    if st.st_uid not in (uid, 0):
        return f"{path} belongs to uid {st.st_uid}, not to you (uid {uid}) or root"
    if st.st_mode & _WRITABLE_BY_OTHERS and not (is_dir and st.st_mode & stat.S_ISVTX):
        return f"{path} is writable by group or others (mode {stat.filemode(st.st_mode)})"
    return None


def _refuse(why: str) -> _Unavailable:
    return _Unavailable(f"refusing to load the compiled codec: {why}, so anyone who can write it could run code "
                        f"in this process; remove it (or `chmod go-w` it), or set {CACHE_ENV} to a directory "
                        f"only you can write")


def _check_dir(cache: str) -> None:
    try:
        st = os.stat(cache)
    except OSError:
        return  # not there yet: created below, private to this user
    why = _untrusted(cache, st, is_dir=True)
    if why is not None:
        raise _refuse(f"the cache directory {why}")


def _find_build(cache: str, names: Sequence[str]) -> Optional[str]:
    """The first existing build of ``names`` (in order of preference) that may be loaded."""
    for name in names:
        path = os.path.join(cache, name)
        try:
            st = os.lstat(path)  # a symlink is not followed: it is refused as not a regular file
        except OSError:
            continue
        why = _untrusted(path, st, is_dir=False)
        if why is not None:
            raise _refuse(why)
        return path
    return None


def _not_writable(cache: str, e: OSError) -> _Unavailable:
    return _Unavailable(f"the cache directory {cache} is not writable ({e.strerror or e}) and holds no build for "
                        f"this source, compiler and CPU; set {CACHE_ENV} to a writable directory, or build it "
                        f"once where it can be written with `{BUILD_COMMAND}`")


@contextlib.contextmanager
def _build_lock(cache: str):
    """Hold an exclusive lock on the cache directory's build lock file (POSIX ``flock``): processes
    starting together (DDP ranks) compile once; the others wait here, then find the build."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the atomic rename still keeps every load whole
        yield
        return
    path = os.path.join(cache, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as e:
        raise _not_writable(cache, e) from None
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _Unavailable(f"another process has been building the compiled codec for over "
                                       f"{LOCK_TIMEOUT_S} s (it holds {path}); if none is running, remove that "
                                       f"file") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _compile(cmd: Sequence[str], source: bytes, cache: str) -> str:
    """Path of the built library; raises :class:`_Unavailable` with the last failure."""
    reason = "no attempt"
    for arch in ARCH_FLAGS:
        flags = (*BASE_FLAGS, *arch)
        target = os.path.join(cache, _build_name(cmd, flags, source))
        # build under a private name, then rename: concurrent processes never load a half-written file
        try:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        except OSError as e:
            raise _not_writable(cache, e) from None
        os.close(fd)
        try:
            proc = subprocess.run([*cmd, *flags, "-o", tmp, SOURCE], capture_output=True, text=True,
                                  timeout=COMPILE_TIMEOUT_S)
            if proc.returncode == 0:
                os.chmod(tmp, 0o755)  # whatever the umask: never writable by group or others
                os.replace(tmp, target)
                return target
            last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
            reason = f"{' '.join(os.path.basename(w) for w in cmd)} {' '.join(flags)} failed: {last}"
        except (OSError, subprocess.SubprocessError) as e:
            reason = f"running {' '.join(cmd)} failed: {e}"
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise _Unavailable(reason)


def _locate_or_build() -> str:
    """The path of a usable build: found in the cache, else compiled there under the build lock."""
    cmd = _compiler()
    if cmd is None:
        raise _Unavailable("no C compiler found (install gcc or clang, or set CC)")
    try:
        with open(SOURCE, "rb") as f:
            source = f.read()
    except OSError as e:
        raise _Unavailable(f"cannot read {SOURCE}: {e}") from None
    cache = _cache_dir()
    # in order of preference: a portable build exists only where the -march=native one failed
    names = [_build_name(cmd, (*BASE_FLAGS, *arch), source) for arch in ARCH_FLAGS]
    _check_dir(cache)
    found = _find_build(cache, names)  # a read-only cache holding the build is fine: nothing is written
    if found is not None:
        return found
    try:
        os.makedirs(cache, mode=0o700, exist_ok=True)
    except OSError as e:
        raise _Unavailable(f"cannot create the cache directory {cache} ({e.strerror or e}); set {CACHE_ENV} to a "
                           f"writable directory, or build it once where it can be written with "
                           f"`{BUILD_COMMAND}`") from None
    _check_dir(cache)
    with _build_lock(cache):
        found = _find_build(cache, names)  # built by another process while this one waited
        return found if found is not None else _compile(cmd, source, cache)


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
    """``(library, path, None)``, or ``(None, None, reason)`` where the compiled codec cannot be used."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None, None, f"disabled by {DISABLE_ENV}=0"
    try:
        path = _locate_or_build()
    except _Unavailable as e:
        return None, None, str(e)
    try:
        lib = ctypes.CDLL(path)
        _declare(lib)
        if lib.bq_abi_version() != ABI_VERSION:
            return None, None, f"{path} has ABI {lib.bq_abi_version()}, expected {ABI_VERSION}"
    except (OSError, AttributeError) as e:
        return None, None, f"cannot load {path}: {e}"
    reason = _self_check(lib)
    return (lib, path, None) if reason is None else (None, None, reason)


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


def _library(warn: bool = True):
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["lib"], _state["path"], _state["reason"] = _load()
                _state["tried"] = True
                if warn and _state["lib"] is None and os.environ.get(DISABLE_ENV, "1") != "0":
                    # once per process: the registry now compresses CPU tensors with the slow reference
                    warnings.warn(f"blockquant: the compiled CPU codec is unavailable, so CPU tensors are compressed "
                                  f"by the PyTorch backend (same results, many times slower): "
                                  f"{_state['reason']}. `{BUILD_COMMAND}` shows the build; {DISABLE_ENV}=0 "
                                  f"chooses the PyTorch backend without this warning.",
                                  CodecFallbackWarning, stacklevel=3)
    return _state["lib"]


def available() -> bool:
    """True when the compiled codec can be used here (builds it on the first call)."""
    return _library() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (``None`` when it is True)."""
    _library()
    return _state["reason"]


def library_path() -> Optional[str]:
    """The loaded library's file in the cache directory (``None`` where it is unavailable)."""
    _library()
    return _state["path"]


def build() -> str:
    """Build the compiled codec now (or find it in the cache) and load it: what the first use
    would do, ahead of time. Returns the library's path; raises ``RuntimeError`` with the reason
    where it cannot (never warns). ``python -m blockquant.kernels --build`` calls it."""
    _reset_for_tests()
    if _library(warn=False) is None:
        raise RuntimeError(f"the compiled CPU codec cannot be built or loaded: {_state['reason']}")
    return _state["path"]


def supports(device) -> bool:
    return torch.device(device).type == "cpu" and available()


def _reset_for_tests() -> None:
    """Forget the loaded library so that the next call builds or fails afresh."""
    with _lock:
        _state.update(lib=None, reason=None, path=None, tried=False)


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


def _seed_arg(seed) -> int:
    """The seed as the C side's uint64 (Python ints wrap modulo 2^64, as a tensor seed's bits do)."""
    return int(seed) & ((1 << 64) - 1)


def _levels_ptr(levels, bits):
    """``(levels tensor, its address)`` for the C side; ``(None, None)`` for uniform levels."""
    lv = levels_arg(levels, bits, "cpu")
    return lv, (lv.data_ptr() if lv is not None else None)


def _quantize(lib, flat, block, bits, meta_dtype, levels, stochastic, seed, threads=None):
    n = flat.numel()
    nb = -(-n // block)
    payload = torch.empty(payload_bytes(n, block, bits), dtype=torch.uint8)
    meta = torch.empty((2, nb), dtype=meta_dtype)
    lv, lv_ptr = _levels_ptr(levels, bits)  # lv keeps the levels alive during the calls
    x_ptr, p_ptr, m_ptr = flat.data_ptr(), payload.data_ptr(), meta.data_ptr()
    x_kind, m_kind, seed = _KIND[flat.dtype], _KIND[meta_dtype], _seed_arg(seed)

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
    lv, lv_ptr = _levels_ptr(levels, bits)  # lv keeps the levels alive during the calls
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
    flat = encoder_input(flat, "quantize_native")
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
