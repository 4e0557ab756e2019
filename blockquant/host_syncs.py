"""Count, on any machine, what would make a GPU training step wait for the host: :func:`count_host_syncs`.

On a GPU, reading a device tensor's value in Python (``.item()``, ``int(t)``, ``bool(t)``,
``.tolist()``, ``.cpu()``), building a tensor on the device from Python data
(``torch.tensor(..., device=...)``: a host-to-device copy from pageable memory) and running an
op whose output shape depends on the data (``nonzero``, ``bincount``, ``unique``, ...) make the
host wait for the device. ``torch.cuda.set_sync_debug_mode("warn")`` reports them on a GPU; this
counter finds the same calls on a CPU-only machine, where every tensor is a CPU tensor and
nothing waits, so that a CPU test can require a training step to have none.

Two modes run together:

* a ``TorchFunctionMode`` sees the Python-level reads and copies above, **also inside the
  library's custom ops** (``blockquant::*``): it runs those ops' kernels itself, with both modes
  active (a mode normally steps aside while an op it intercepted runs, so a read inside the
  finiteness check of ``blockquant::quantize`` would go unseen);
* a ``TorchDispatchMode`` sees what the Python level cannot: ``aten._local_scalar_dense`` called
  from C++ (one per read; a read the function mode already counted is not counted twice) and the
  data-dependent-shape ops; and it runs a library op reached while the function mode had stepped
  aside (from a saved-tensor hook, which runs inside the op that saves) with both modes on.

The backward pass runs with the modes on as well (``Tensor.backward`` and
``torch.autograd.backward`` are run by the counter). Not seen: Python-level reads and copies
inside hooks that run within another op (saved-tensor hooks), where only the dispatch level is
visible (their reads still show as ``_local_scalar_dense``).

Every hit is attributed to the innermost frame outside torch (``file:line``), so a count names
its source.

Host scalars: blockquant's seeds are 0-d int64 **CPU** tensors by design (they never live on a
device), read only through :func:`blockquant.seeds.seed_value`, which refuses any other tensor.
Reads made there are host reads, never device syncs: they are listed apart (``host_reads``) and
not counted. So are reads of a tensor (or a view of one) made by a ``.cpu()`` the counter counted
(the copy was the sync). There is no other exception.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sys
import threading
from typing import Counter, Dict, Iterator, List, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ._compat import backend_dispatch_keys

__all__ = ["HostSyncReport", "count_host_syncs"]

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_THIS_FILE = os.path.abspath(__file__)
_STDLIB_DIRS = tuple({os.path.dirname(os.path.abspath(contextlib.__file__))})

# Python-level calls that read a tensor's value on the host (a device-to-host copy and a wait)
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
          torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.__complex__, torch.Tensor.numpy,
          torch.Tensor.cpu}
# set on the result of a counted ``.cpu()``: reading that host copy again is not another sync
_HOST_COPY = "_bq_counted_host_copy"
# building a tensor from Python data: with an explicit device= it is a host-to-device copy there
_FROM_HOST_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}
# ops whose output shape depends on the values (the host must learn the size before allocating)
_DYNAMIC_OPS = {"nonzero", "bincount", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
                "masked_select", "argwhere"}


@dataclasses.dataclass
class HostSyncReport:
    """What ran inside :func:`count_host_syncs`, per kind and per site (``file:line in function``).

    ``syncs``: device values read on the host (``.item()``, ``int()``, ``bool()``, ``.tolist()``,
    ``.cpu()``, ``aten._local_scalar_dense`` from C++); ``copies``: tensors built from Python data
    on an explicit device (``torch.tensor(..., device=d)``); ``dynamic``: data-dependent-shape ops
    (keyed ``"op at site"``); ``host_reads``: reads of host scalars (seeds), not counted in
    :attr:`total`; ``opaque_ops``: library custom ops the counter could not look inside (called
    with tensors that require grad under grad mode; none in blockquant's own paths).
    """

    syncs: Counter[str] = dataclasses.field(default_factory=collections.Counter)
    copies: Counter[str] = dataclasses.field(default_factory=collections.Counter)
    dynamic: Counter[str] = dataclasses.field(default_factory=collections.Counter)
    host_reads: Counter[str] = dataclasses.field(default_factory=collections.Counter)
    opaque_ops: Counter[str] = dataclasses.field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        """Syncs + host-to-device copies + data-dependent-shape ops."""
        return sum(self.syncs.values()) + sum(self.copies.values()) + sum(self.dynamic.values())

    def by_kind(self) -> Dict[str, int]:
        return {"syncs": sum(self.syncs.values()), "copies": sum(self.copies.values()),
                "dynamic": sum(self.dynamic.values()), "host_reads": sum(self.host_reads.values())}

    def table(self) -> str:
        """One line per kind and site, most frequent first."""
        lines = []
        for kind in ("syncs", "copies", "dynamic", "host_reads", "opaque_ops"):
            for site, n in getattr(self, kind).most_common():
                lines.append(f"{kind:<10} {n:>5}  {site}")
        return "\n".join(lines) if lines else "(none)"


def _passes_through(code) -> bool:
    """Whether ``code`` is the converted forward's function mode passing a call on (its caller made the call)."""
    from .saved_hooks import _CurrentOp

    return code is _CurrentOp.__torch_function__.__code__


def _site(skip_files: Tuple[str, ...] = ()) -> str:
    """``file:line in function`` of the innermost frame outside torch, the stdlib's contextlib, this file
    and the converted forward's function mode (which only passes its caller's calls on)."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not (path.startswith(_TORCH_DIR) or path == _THIS_FILE or path.startswith(_STDLIB_DIRS)
                or path in skip_files or _passes_through(frame.f_code)):
            return f"{_short(path)}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "<unknown>"


def _short(path: str) -> str:
    parts = path.split(os.sep)
    for anchor in ("blockquant", "kernels", "tests", "bench", "torch_geometric"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i:])
    return os.path.basename(path)


def _in_host_reader() -> bool:
    from . import seeds

    reader = getattr(seeds, "seed_value", None)
    if reader is None:
        return False
    code = reader.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _tensors(args, kwargs) -> List[torch.Tensor]:
    found: List[torch.Tensor] = []

    def visit(a):
        if isinstance(a, torch.Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)

    for a in list(args) + list(kwargs.values()):
        visit(a)
    return found


def _device_of(args, kwargs) -> str:
    """The device type the dispatcher would pick for an op on these arguments."""
    tensors = _tensors(args, kwargs)
    if any(t.device.type == "cuda" for t in tensors):
        return "cuda"
    return tensors[0].device.type if tensors else "cpu"


class _State(threading.local):
    def __init__(self) -> None:
        self.python_read_depth = 0


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, report: HostSyncReport, state: _State):
        super().__init__()
        self.report = report
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.OpOverload) and func.namespace == "blockquant":
            return self._run_library_op(func, args, kwargs)
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            return self._run_backward(func, args, kwargs)
        if func in _READS:
            source = args[0] if args else None
            base = getattr(source, "_base", None)
            if _in_host_reader() or getattr(source, _HOST_COPY, False) or getattr(base, _HOST_COPY, False):
                self.report.host_reads[_site()] += 1
            else:
                self.report.syncs[f"{getattr(func, '__name__', func)} at {_site()}"] += 1
            self.state.python_read_depth += 1
            try:
                result = func(*args, **kwargs)
            finally:
                self.state.python_read_depth -= 1
            if func is torch.Tensor.cpu and isinstance(result, torch.Tensor):
                setattr(result, _HOST_COPY, True)  # its reads are host reads: the copy was the sync
            return result
        if func in _FROM_HOST_DATA and kwargs.get("device") is not None:
            self.report.copies[f"{func.__name__}(device=...) at {_site()}"] += 1
        return func(*args, **kwargs)

    def _run_library_op(self, func, args, kwargs):
        """Run a ``blockquant::`` op's kernel with both modes active, so that what it reads is seen."""
        tensors = _tensors(args, kwargs)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            # skipping the autograd key would drop a grad_fn: run it normally, unseen inside
            self.report.opaque_ops[f"{func} at {_site()}"] += 1
            return func(*args, **kwargs)
        keys = backend_dispatch_keys(_device_of(args, kwargs))
        with self:  # the mode stepped aside for this call: back on for the kernel's body
            return func.redispatch(keys, *args, **kwargs)


    def _run_backward(self, func, args, kwargs):
        """The backward pass with this mode active: the autograd engine runs with the modes of the
        moment it starts, and a mode steps aside while its own handler runs (``backward`` included)."""
        from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
        from torch.autograd.graph import _engine_run_backward

        tensors = args[0]
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        grads = kwargs.get("gradient" if func is torch.Tensor.backward else "grad_tensors")
        if grads is None and len(args) > 1:
            grads = args[1]
        create = bool(kwargs.get("create_graph", False))
        retain = kwargs.get("retain_graph")
        inputs = kwargs.get("inputs")
        inputs = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
        with self:
            grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grads, len(tensors)), is_grads_batched=False)
            _engine_run_backward(tensors, grads, create if retain is None else retain, create, inputs,
                                 allow_unreachable=True, accumulate_grad=True)


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, report: HostSyncReport, state: _State, function_mode: _FunctionCounter):
        super().__init__()
        self.report = report
        self.state = state
        self.function_mode = function_mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, name = func._schema.name.split("::")
        if namespace == "blockquant":
            # called where the function mode had stepped aside (a saved-tensor hook runs inside the
            # op whose handler it is in): run the kernel with both modes on, as the function mode does
            with self.function_mode, self:
                return func.redispatch(backend_dispatch_keys(_device_of(args, kwargs)), *args, **kwargs)
        if name == "_local_scalar_dense":
            if self.state.python_read_depth == 0:  # else already counted by the function mode
                if _in_host_reader():
                    self.report.host_reads[_site()] += 1
                else:
                    self.report.syncs[f"_local_scalar_dense at {_site()}"] += 1
        elif name in _DYNAMIC_OPS:
            self.report.dynamic[f"{name} at {_site()}"] += 1
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            self.report.dynamic[f"repeat_interleave at {_site()}"] += 1
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                     for i in (args[1] if len(args) > 1 else ())):
            self.report.dynamic[f"index with a mask at {_site()}"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncReport]:
    """Count host syncs, host-to-device copies and data-dependent-shape ops inside the block.

    Example::

        step()  # warm-up: caches are built on the first step
        with blockquant.host_syncs.count_host_syncs() as report:
            step()
        assert report.total == 0, report.table()

    The library's custom ops run their kernels directly under the counter (see the module
    docstring); everything else runs as usual. For tests and benchmarks, not production: each
    tensor op costs a Python call.
    """
    report = HostSyncReport()
    state = _State()
    function_mode = _FunctionCounter(report, state)
    with function_mode, _DispatchCounter(report, state, function_mode):
        yield report
