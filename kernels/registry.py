"""A small registry of codec backends, chosen per device.

Each backend provides ``quantize(flat, block, bits, meta_dtype, levels,
stochastic, seed) -> (payload, meta)`` and ``dequantize(payload, meta, n,
block, bits, levels, out_dtype) -> flat``; both produce the layout documented
in :mod:`blockquant.kernels.blockwise`.

Selection, first match wins: an explicit ``backend=`` name; the environment
variable ``BLOCKQUANT_BACKEND``; ``triton`` for CUDA tensors and, when
``TRITON_INTERPRET=1``, for CPU tensors; otherwise ``torch``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    quantize: Callable
    dequantize: Callable
    supports: Callable[[torch.device], bool]


_BACKENDS: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends(device: Optional[torch.device] = None):
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return tuple(name for name, b in _BACKENDS.items() if b.supports(dev))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def get_backend(device: torch.device, name: Optional[str] = None) -> Backend:
    """The backend that handles tensors on ``device`` (see module docstring)."""
    device = torch.device(device)
    name = name or os.environ.get("BLOCKQUANT_BACKEND") or None
    if name is not None:
        if name not in _BACKENDS:
            raise ValueError(f"unknown blockquant backend {name!r}; expected one of {tuple(_BACKENDS)}")
        b = _BACKENDS[name]
        if not b.supports(device):
            hint = " (set TRITON_INTERPRET=1 before importing triton to run it on CPU)" if name == "triton" else ""
            raise ValueError(f"blockquant backend {name!r} cannot handle tensors on {device}{hint}")
        return b
    triton_b = _BACKENDS.get("triton")
    if triton_b is not None and triton_b.supports(device) and (device.type == "cuda" or _interpreting()):
        return triton_b
    return _BACKENDS["torch"]
