"""A small registry of codec backends, chosen per device.

Each backend provides ``quantize(flat, block, bits, meta_dtype, levels,
stochastic, seed) -> (payload, meta)`` and ``dequantize(payload, meta, n,
block, bits, levels, out_dtype) -> flat``; both produce the layout documented
in :mod:`blockquant.kernels.blockwise`.

Selection, first match wins: an explicit ``backend=`` name; the environment
variable ``BLOCKQUANT_BACKEND``; otherwise the backend of highest priority
that supports the device and is chosen by default for it: ``triton`` for CUDA
tensors (and for CPU tensors when ``TRITON_INTERPRET=1``, as in the tests),
then ``native`` (the compiled CPU codec, where a C compiler built it), then
``torch``, which works everywhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch


@dataclass(frozen=True)
class Backend:
    """A codec implementation. ``supports(device)``: can it run there at all;
    ``chosen_by_default(device)`` (default: always): should it be picked when
    nobody asked for a backend; among those, the highest ``priority`` wins."""

    name: str
    quantize: Callable
    dequantize: Callable
    supports: Callable[[torch.device], bool]
    priority: int = 0
    chosen_by_default: Optional[Callable[[torch.device], bool]] = None
    why_unsupported: Optional[Callable[[torch.device], str]] = None  # a hint for the error message


_BACKENDS: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends(device: Optional[torch.device] = None):
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return tuple(name for name, b in _BACKENDS.items() if b.supports(dev))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def get_backend(device: torch.device, name: Optional[str] = None) -> Backend:
    """The backend that handles tensors on ``device`` (see module docstring)."""
    device = torch.device(device)
    name = name or os.environ.get("BLOCKQUANT_BACKEND") or None
    if name is not None:
        if name == "triton" and name not in _BACKENDS:
            from .._optional import install_hint

            raise ValueError(f"blockquant backend 'triton' needs triton, which is not installed: "
                             f"{install_hint('triton')}")
        if name not in _BACKENDS:
            raise ValueError(f"unknown blockquant backend {name!r}; expected one of {tuple(_BACKENDS)}")
        b = _BACKENDS[name]
        if not b.supports(device):
            hint = f" ({b.why_unsupported(device)})" if b.why_unsupported is not None else ""
            raise ValueError(f"blockquant backend {name!r} cannot handle tensors on {device}{hint}")
        return b
    for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        if (b.chosen_by_default is None or b.chosen_by_default(device)) and b.supports(device):
            return b
    return _BACKENDS["torch"]
