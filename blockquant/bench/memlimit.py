"""Stop a benchmark cleanly before the kernel's OOM killer does: ``blockquant bench --memory-limit-gib X``.

:func:`apply_memory_limit` lowers this process's address-space limit
(``RLIMIT_AS``) to ``X`` GiB. An allocation beyond it then fails inside the
process (PyTorch raises ``RuntimeError: ... can't allocate memory``, Python
raises ``MemoryError``) instead of the machine running out of memory and the
kernel killing the process, or another one. The benchmark turns that failure
into a result row, "did not fit in X GiB", and goes on with the next
configuration.

``RLIMIT_AS`` counts virtual address space, which is a little above resident
memory: about 1 GiB for Python, PyTorch and PyG's libraries and thread stacks
before any data is loaded (:func:`address_space_bytes` reads it). A
configuration that "did not fit" needed more than the limit minus what was
already in use; one that fit stayed below the limit.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional

from .errors import BenchError

GIB = 1 << 30


def _status_bytes(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` in bytes, or ``None`` where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def address_space_bytes() -> Optional[int]:
    """This process's current virtual size (``VmSize``), or ``None`` where /proc is unavailable."""
    return _status_bytes("VmSize")


def apply_memory_limit(gib: float) -> int:
    """Cap this process's address space at ``gib`` GiB (soft ``RLIMIT_AS``); returns the limit in bytes.

    Raises :class:`BenchError` where the platform has no ``resource`` module, the
    limit is above the hard limit, or below what the process already uses.
    """
    try:
        import resource
    except ImportError:  # Windows
        raise BenchError("--memory-limit-gib needs the POSIX resource module (Linux or macOS)") from None
    if not gib > 0:
        raise BenchError(f"--memory-limit-gib expects a positive number; got {gib}")
    limit = int(gib * GIB)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and limit > hard:
        raise BenchError(f"--memory-limit-gib {gib:g} is above this process's hard address-space limit "
                         f"({hard / GIB:.2f} GiB); pass at most that")
    used = address_space_bytes()
    if used is not None and limit <= used:
        raise BenchError(f"--memory-limit-gib {gib:g} is below what the process already uses "
                         f"({used / GIB:.2f} GiB of address space before loading data); pass more")
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


def reset_peak_rss() -> bool:
    """Start a new peak-resident-memory window for this process (Linux: ``/proc/self/clear_refs``).

    Returns whether it could; :func:`peak_rss_bytes` then reports the peak since this call.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> Optional[int]:
    """Peak resident memory of this process (``VmHWM``) since start or the last :func:`reset_peak_rss`."""
    return _status_bytes("VmHWM")


_REQUEST = re.compile(r"allocate (?:memory: you tried to allocate )?(\d+) bytes")


def did_not_fit(config_name: str, limit_gib: float, error: BaseException, stage: str) -> Dict[str, Any]:
    """The result row for a configuration stopped by the limit."""
    msg = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    m = _REQUEST.search(str(error))
    request = int(m.group(1)) if m else None
    detail = f"did not fit: needs > {limit_gib:g} GiB (failed during {stage}"
    detail += f", allocating {request / GIB:.2f} GiB more)" if request else ")"
    return {"config": config_name, "status": "did not fit", "memory_limit_gib": limit_gib,
            "failed_stage": stage, "failed_request_bytes": request, "error": msg, "detail": detail}
