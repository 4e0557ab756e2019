"""Compress what autograd saves for backward, for ops blockquant has no wrapper for.

A model converted by :func:`blockquant.convert` applies these rules to its whole training
forward (:mod:`blockquant.forward_scope`); :func:`compress_saved_tensors` applies them to
any block of code.

:func:`compress_saved_tensors` installs ``torch.autograd.graph.saved_tensors_hooks``
together with a ``torch.overrides.TorchFunctionMode`` that records which
torch-level function (``torch.matmul``, ``F.softmax``, ``Tensor.__mul__``, ...)
is running when autograd saves a tensor. A pack hook alone cannot tell which
op saved a tensor, and compressing a tensor that backward uses non-linearly
(softmax, sigmoid, tanh, division, norms: their backward multiplies or divides
saved values by each other) biases the gradient. So the rule is an allow-list:

* floating tensors saved while one of :data:`COMPRESSED_OPS` runs (ops whose
  backward is linear in every tensor they save: matrix products, elementwise
  products, ``exp`` which saves its output, dropout which saves its noise)
  are quantized with the config (random projection off), each save rounded
  independently, provided they hold at least ``min_numel`` elements and are
  not resident (:func:`blockquant.save_policy.keep`, the rule every
  blockquant op follows, keeps those by reference);
* floating tensors saved by :data:`SIGN_OPS` (``relu`` saves its output and
  ``leaky_relu`` its input, and backward only reads their sign) are kept as
  an exact 1-bit mask;
* bool tensors are packed losslessly to 1 bit per element, whatever saved them;
* the functions of :data:`ROUTED` (``F.dropout``, ``F.elu``, ``F.gelu``, sigmoid,
  tanh, ``F.layer_norm``, ``F.batch_norm``) do not save through these hooks at
  all: they run as the matching :mod:`blockquant.functional` op, which keeps a
  dropout seed (0 B per element) or a compressed derivative / normalised input,
  as the module wrappers do;
* everything else is kept exact: tensors saved by any other op (softmax, exp's
  relatives with curved derivatives, div, pow, sqrt, ``F.normalize``,
  custom ``autograd.Function``s, ...), resident tensors (by reference),
  integer tensors, sparse tensors, tensors below ``min_numel`` and tensors
  with non-finite values.

The function recorded is the outermost torch function call: inside a call
such as ``F.multi_head_attention_forward`` or ``F.normalize`` the mode is
suspended, so everything that call saves follows that call's rule (here:
exact). A tensor kept exact by one op is never also compressed for another:
the exact copy is held anyway, so every saved reference to it, earlier or
later, becomes that reference.

On unpack the original shape and dtype come back (contiguous). Each save
is rounded on its own, even when several ops save the same tensor: with
independent roundings, and each saved tensor read by one backward node that
is linear in it, every gradient is multilinear in independent unbiased
estimates, hence unbiased. One rounding shared by two saves can meet itself
in a product (``(x * w).sum(-1) * x``: ``grad_w`` multiplies the rounded
``x`` of the second product into the rounded ``x`` of the first), which is
biased. Backward through compressed
tensors is not differentiable: unpacking one with gradients enabled
(``create_graph=True``) raises.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, FrozenSet, Iterator, List, Optional, Union

import torch
from torch.overrides import TorchFunctionMode

from ._compat import WeakIdKeyDictionary, tensor_version
from blockquant.kernels.bitmask import BitMask

from .config import QuantConfig
from . import functional as BF
from .functional._common import DOUBLE_BACKWARD_MESSAGE
from .packed import INPUT_DTYPES
from .save_policy import is_resident, keep, without_projection

DEFAULT_MIN_NUMEL = 1024

Recorder = Optional[Union[List[object], Callable[[object], None]]]


# Torch-level functions whose backward is linear in every floating tensor they save.
COMPRESSED_OPS = frozenset({
    # products: grad of one operand is linear in the other(s)
    "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "mv", "dot", "outer", "addmm", "addbmm", "baddbmm",
    "addmv", "linear", "einsum", "tensordot", "_sparse_mm", "conv1d", "conv2d", "conv3d",
    "mul", "__mul__", "__rmul__", "multiply", "addcmul",
    # exp saves its output y and backward is g * y (exp2: g * y * ln 2; expm1: g * (y + 1))
    "exp", "exp2", "expm1",
    # dropout saves its scaled keep-noise (0 or 1 / (1 - p)) and backward is g * noise
    "dropout", "feature_dropout",
})
"""Names of the torch-level functions under which :func:`compress_saved_tensors` quantizes saved
floating tensors (backward is linear in each of them, so rounding adds noise but no bias)."""

SIGN_OPS = frozenset({"relu", "relu_", "leaky_relu", "leaky_relu_"})
"""Functions whose saved floating tensor backward reads only through its sign; it is kept as an exact 1-bit mask."""


class _Packed:
    """What the pack hook returns for a tensor it does not keep as it is."""

    __slots__ = ("obj", "kind", "dtype", "__weakref__")

    def __init__(self, obj, kind: str, dtype=None):
        self.obj = obj
        self.kind = kind  # "quant", "mask" (a bool tensor), "sign" (a float tensor's sign) or "ref"
        self.dtype = dtype

    def unpack(self) -> torch.Tensor:
        if self.kind == "ref":
            return self.obj
        if self.kind == "quant" and torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        if self.kind == "mask":
            return self.obj.unpack()
        if self.kind == "sign":
            return self.obj.unpack().to(self.dtype)
        return self.obj.dequantize()

    @property
    def nbytes(self) -> int:
        return 0 if self.kind == "ref" else self.obj.nbytes

    def storages(self):
        """The tensors held (so graph walkers such as ``track_saved`` can count them)."""
        return (self.obj,) if self.kind == "ref" else self.obj.storages()


def _routable(x, extra) -> bool:
    # anything but a floating tensor, or an argument the blockquant op does not take (``out=``), runs as torch's
    return not extra and isinstance(x, torch.Tensor) and x.is_floating_point()


def _route_dropout(config, input, p=0.5, training=True, inplace=False, **extra):
    if inplace or not training or not _routable(input, extra):
        return NotImplemented
    return BF.dropout(input, p, True)


def _route_torch_dropout(config, input, p, train, **extra):
    return _route_dropout(config, input, p, train, **extra)


def _route_elu(config, input, alpha=1.0, inplace=False, **extra):
    if inplace or not _routable(input, extra):
        return NotImplemented
    return BF.elu(input, alpha, config)


def _route_gelu(config, input, approximate="none", **extra):
    if not _routable(input, extra):
        return NotImplemented
    return BF.gelu(input, approximate, config)


def _route_sigmoid(config, input, **extra):
    if not _routable(input, extra):
        return NotImplemented
    return BF.sigmoid(input, config)


def _route_tanh(config, input, **extra):
    if not _routable(input, extra):
        return NotImplemented
    return BF.tanh(input, config)


def _route_layer_norm(config, input, normalized_shape, weight=None, bias=None, eps=1e-5, **extra):
    if not _routable(input, extra):
        return NotImplemented
    return BF.layer_norm(input, normalized_shape, weight, bias, eps, config)


def _route_batch_norm(config, input, running_mean, running_var, weight=None, bias=None, training=False,
                      momentum=0.1, eps=1e-5, **extra):
    if not _routable(input, extra) or input.dim() < 2 or input.numel() == 0:  # empty: torch's own handling
        return NotImplemented
    return BF.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, config)


_F = torch.nn.functional
ROUTED = {
    _F.dropout: _route_dropout, torch.dropout: _route_torch_dropout,
    _F.elu: _route_elu, _F.gelu: _route_gelu,
    torch.sigmoid: _route_sigmoid, torch.Tensor.sigmoid: _route_sigmoid, _F.sigmoid: _route_sigmoid,
    torch.tanh: _route_tanh, torch.Tensor.tanh: _route_tanh, _F.tanh: _route_tanh,
    _F.layer_norm: _route_layer_norm, _F.batch_norm: _route_batch_norm,
}
"""Functions run as the matching :mod:`blockquant.functional` op (what the module wrappers run), so that
they keep what that op keeps: ``F.dropout`` / ``torch.dropout`` a seed (0 B per element; the mask comes
from blockquant's seeded stream, not torch's generator), ``F.elu`` / ``F.gelu`` / sigmoid / tanh their
derivative, computed exactly and compressed, ``F.layer_norm`` / ``F.batch_norm`` their normalised input
compressed. Not routed, and so following the save rules above: ``inplace=True`` calls (``relu_``,
``sigmoid_``...) and non-floating inputs."""


_NOT_ROUTED: contextvars.ContextVar[FrozenSet[Callable]] = contextvars.ContextVar("blockquant_not_routed",
                                                                                  default=frozenset())


@contextlib.contextmanager
def not_routed(*functions: Callable) -> Iterator[None]:
    """Inside the block, calls of ``functions`` are not run as blockquant ops (:data:`ROUTED`) but passed on
    as they are, so that a function mode entered outside a converted forward sees them (the probes of
    ``tune`` / ``noise_report`` pair torch's dropout masks this way); what they save still follows the rules."""
    token = _NOT_ROUTED.set(_NOT_ROUTED.get() | frozenset(functions))
    try:
        yield
    finally:
        _NOT_ROUTED.reset(token)


class _CurrentOp(TorchFunctionMode):
    """Records the torch-level function being called while autograd saves tensors, and runs the
    functions of :data:`ROUTED` as blockquant ops."""

    def __init__(self, rules: "SavedTensorRules"):
        super().__init__()
        self.rules = rules
        self.names: List[Optional[str]] = []

    @property
    def current(self) -> Optional[str]:
        return self.names[-1] if self.names else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.rules.suspended:
            return func(*args, **kwargs)
        route = ROUTED.get(func)
        if route is not None and func not in _NOT_ROUTED.get():
            # anything the blockquant op saves through autograd is kept as it is (by reference or exact)
            self.names.append(None)
            try:
                out = route(self.rules.config, *args, **kwargs)
            finally:
                self.names.pop()
            if out is not NotImplemented:
                return out
        self.names.append(getattr(func, "__name__", None))
        try:
            return func(*args, **kwargs)
        finally:
            self.names.pop()


class SavedTensorRules:
    """The pack / unpack hooks and the function mode of :func:`compress_saved_tensors`, as one object,
    so that a converted model (:func:`blockquant.convert`) can open them around its forward and
    switch them off (:meth:`suspend`) while a module it leaves exact runs."""

    def __init__(self, config: QuantConfig, min_numel: int = DEFAULT_MIN_NUMEL, note=None):
        self.config = without_projection(config)
        self.min_numel = min_numel
        self.note = note
        self.suspended = 0
        self.op = _CurrentOp(self)
        # tensor -> version kept exact by some op in this context; tensor -> [(version, _Packed)] compressed
        self.kept_exact: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.compressed: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _keep_exact(self, t: torch.Tensor):
        self.kept_exact[t] = tensor_version(t)
        for version, packed in self.compressed.pop(t, ()):
            if version == tensor_version(t):  # the exact tensor is held anyway: drop the compressed copy
                packed.obj, packed.kind = t.detach(), "ref"
        return t

    def pack(self, t: torch.Tensor):
        """What the graph stores for ``t``. A tensor kept as it is is stored detached (the same storage and
        version counter, without its ``grad_fn``): an op's output saved by reference to itself would tie
        the graph into a cycle through autograd's C++ nodes, which Python's collector cannot break, so a
        forward that raised, or whose output was dropped without backward, would never be freed."""
        kept = self._pack(t)
        return kept.detach() if kept is t and t.grad_fn is not None else kept

    def _pack(self, t: torch.Tensor):
        if t.layout != torch.strided or isinstance(t, torch.nn.Parameter):
            return t
        if self.suspended:  # a module left exact is running
            return self._keep_exact(t) if t.dtype in INPUT_DTYPES else t
        min_numel, note = self.min_numel, self.note
        if t.dtype == torch.bool:
            if t.numel() < min_numel:
                return t
            obj = BitMask.pack(t)
            if note is not None:
                note(obj)
            return _Packed(obj, "mask")
        name = self.op.current
        if t.dtype not in INPUT_DTYPES or is_resident(t):
            return t
        if name in SIGN_OPS and t.numel() >= min_numel:
            obj = BitMask.pack(t > 0)
            if note is not None:
                note(obj)
            return _Packed(obj, "sign", t.dtype)
        if name not in COMPRESSED_OPS or t.numel() < min_numel:
            return self._keep_exact(t)
        if self.kept_exact.get(t) == tensor_version(t):
            return t
        try:
            obj = keep(t, self.config, projection=False, shared=False)  # not resident (checked above): compressed
        except ValueError:  # non-finite values: keep them exact rather than fail the forward pass
            return self._keep_exact(t)
        if note is not None:
            note(obj)
        packed = _Packed(obj, "quant")
        self.compressed.setdefault(t, []).append((tensor_version(t), packed))
        return packed

    @staticmethod
    def unpack(p):
        return p.unpack() if isinstance(p, _Packed) else p

    @contextlib.contextmanager
    def active(self) -> Iterator["SavedTensorRules"]:
        """Apply the rules to what autograd saves inside the block."""
        with self.op, torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self

    @contextlib.contextmanager
    def suspend(self) -> Iterator[None]:
        """Inside the block, autograd saves what it saves without these rules and no function is routed."""
        self.suspended += 1
        try:
            yield
        finally:
            self.suspended -= 1


@contextlib.contextmanager
def compress_saved_tensors(config: Union[None, str, QuantConfig] = None, *, min_numel: int = DEFAULT_MIN_NUMEL,
                           record: Recorder = None) -> Iterator[None]:
    """Context manager: tensors saved for backward inside it are stored compressed where that
    keeps the gradient unbiased, exact otherwise (the rules are in the module docstring);
    ``F.dropout``, ``F.elu``, ``F.gelu``, ``F.layer_norm`` and ``F.batch_norm`` run as the
    matching :mod:`blockquant.functional` op (:data:`ROUTED`).

    A model converted by :func:`blockquant.convert` applies these rules to its whole training
    forward by default (``convert(model, functional=False)`` turns that off): this context
    manager is for code outside a converted model.

    Args:
        config: :class:`QuantConfig` or preset name (default: the ``"default"``
            preset); ``rp_ratio`` is ignored (treated as 1).
        min_numel: tensors with fewer elements are saved as they are.
        record: a list (each packed object is appended) or a callable (called
            with each packed object) so memory tracking can see what is held:
            :class:`~blockquant.PackedTensor` or
            :class:`~blockquant.kernels.bitmask.BitMask` objects, both with
            ``.nbytes`` and ``.storages()``. A compressed tensor that a later op
            saves exactly is dropped from what the graph holds but stays in
            ``record``. (What routed ops keep is not recorded: see
            :func:`blockquant.track_saved`.)

    Example::

        with blockquant.compress_saved_tensors("int2"):
            loss = model(x).sum()
        loss.backward()
    """
    config = QuantConfig.resolve(config, "compress_saved_tensors")
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise ValueError(f"compress_saved_tensors: min_numel must be a non-negative int; got {min_numel!r}")
    if record is not None and not (callable(record) or hasattr(record, "append")):
        raise TypeError(f"compress_saved_tensors: record must be a list or a callable; got {type(record).__name__}")
    note = None if record is None else (record if callable(record) else record.append)
    with SavedTensorRules(config, min_numel, note).active():
        yield
