"""Which codec backend handles a tensor: the default per device type, and the overrides.

A backend is a ``quantize(flat, block, bits, meta_dtype, levels, stochastic, seed) ->
(payload, meta)`` and ``dequantize(payload, meta, n, block, bits, levels, out_dtype) -> flat``
pair producing the layout of :mod:`blockquant.kernels.reference`:

* ``torch``: the PyTorch reference; every device.
* ``native``: the codec compiled for the CPU (:mod:`blockquant.kernels.native`); CPU tensors,
  where a C compiler built it.
* ``triton``: the Triton kernels (:mod:`blockquant.kernels.blockwise`); CUDA tensors, and CPU
  tensors through the interpreter when ``TRITON_INTERPRET=1`` was set before triton was imported.

The default per device type (:func:`default_backend`) is what the codec ops' kernels run
(:mod:`blockquant.kernels.ops` registers one kernel per device type with ``torch.library``, so
the dispatcher picks by device): ``cuda`` -> ``triton`` (``torch`` without Triton); ``cpu`` ->
``native`` (``triton`` when interpreting, as in the tests; ``torch`` where ``native`` is
unavailable); every other device type -> ``torch``.

An override (:func:`forced_backend`) goes around the dispatcher to a named backend: the
``backend=`` argument of :func:`blockquant.quantize` (one call; an error where that backend cannot
run), or the environment variable ``BLOCKQUANT_BACKEND``, per device type:

* ``BLOCKQUANT_BACKEND=native``: that backend for every device type it runs on (here the CPU);
  tensors on other devices keep their default, so forcing the CPU codec does not break the CUDA
  tensors of the same process;
* ``BLOCKQUANT_BACKEND=cpu:torch,cuda:triton``: one backend per listed device type; a backend
  that cannot run on a device type listed for it is an error there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

ENV = "BLOCKQUANT_BACKEND"


@dataclass(frozen=True)
class Backend:
    """A codec implementation. ``supports(device)``: can it run on tensors of ``device``;
    ``why_unsupported(device)``: a hint for the error when it cannot."""

    name: str
    quantize: Callable
    dequantize: Callable
    supports: Callable[[torch.device], bool]
    why_unsupported: Optional[Callable[[torch.device], str]] = None


_BACKENDS: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends(device: Optional[torch.device] = None):
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return tuple(name for name, b in _BACKENDS.items() if b.supports(dev))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _named(name: str) -> Backend:
    if name == "triton" and name not in _BACKENDS:
        from .._optional import install_hint

        raise ValueError(f"blockquant backend 'triton' needs triton, which is not installed: {install_hint('triton')}")
    if name not in _BACKENDS:
        raise ValueError(f"unknown blockquant backend {name!r}; expected one of {tuple(_BACKENDS)}")
    return _BACKENDS[name]


def _require(backend: Backend, device: torch.device, how: str) -> Backend:
    if not backend.supports(device):
        hint = f" ({backend.why_unsupported(device)})" if backend.why_unsupported is not None else ""
        raise ValueError(f"blockquant backend {backend.name!r}{how} cannot handle tensors on {device}{hint}")
    return backend


def default_backend(device: torch.device) -> Backend:
    """The backend the codec ops run for tensors on ``device`` when nothing is forced (module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        preferred = ("triton",)
    elif device.type == "cpu":
        preferred = ("triton", "native") if interpreting() else ("native",)
    else:
        preferred = ()
    for name in preferred:
        b = _BACKENDS.get(name)
        if b is not None and b.supports(device):
            return b
    return _BACKENDS["torch"]


def _env_choice(device: torch.device) -> Optional[Backend]:
    """What ``BLOCKQUANT_BACKEND`` forces for tensors on ``device`` (None: nothing)."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    if ":" not in value:
        b = _named(value)
        return b if b.supports(device) else None  # a bare name applies where that backend runs
    per_type = {}
    for item in value.split(","):
        dev_type, sep, name = (part.strip() for part in item.strip().partition(":"))
        if not sep or not dev_type or not name:
            raise ValueError(f"{ENV}={value!r}: expected a backend name or 'device_type:name' pairs separated by "
                             f"commas (e.g. 'cpu:native,cuda:triton'); got the item {item.strip()!r}")
        per_type[dev_type] = _named(name)
    if device.type not in per_type:
        return None
    return _require(per_type[device.type], device, f" (set for {device.type} by {ENV})")


def forced_backend(device: torch.device, name: Optional[str] = None) -> Optional[Backend]:
    """The backend forced for tensors on ``device``: ``name`` if given (an error where it cannot
    run), else what ``BLOCKQUANT_BACKEND`` says for this device type, else None (the default)."""
    device = torch.device(device)
    if name is not None:
        return _require(_named(name), device, "")
    return _env_choice(device)


def get_backend(device: torch.device, name: Optional[str] = None) -> Backend:
    """The backend that handles tensors on ``device``: the forced one, else the default."""
    device = torch.device(device)
    return forced_backend(device, name) or default_backend(device)
