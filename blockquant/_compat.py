"""Every private PyTorch API blockquant uses, in one place, with the release each needs.

Private means undocumented or underscored: PyTorch may change it in any release. The package reaches it only
through this module, so a release that changes one is fixed here. :func:`check` tries each on the installed
torch (``python -c "import blockquant._compat as c; c.report()"`` prints it; ``tools/torch_floor.sh`` records it
for every release it tests).

=====================================  ==============================================  ==============
private API                            what blockquant uses it for                     needs torch
=====================================  ==============================================  ==============
``torch._C._functions.DelayedError``   a compressed backward's outputs raise when       <= 2.4
                                       differentiated again (``create_graph=True``)
``torch.ops.aten.                      BatchNorm's training forward: output, batch      <= 2.4
_batch_norm_with_update``              statistics and the running-stat update in one
                                       op (what ``F.batch_norm`` dispatches to)
``torch._C._autograd.SavedTensor``     ``track_saved`` and ``tune`` read what a graph   >= 2.10 (2.4.1
and its ``.data``                      node saved without unpacking it (a pack hook's   to 2.9.1 have
                                       result stays packed)                            no ``.data``)
``Node._raw_saved_<name>``             the saved tensors of built-in autograd nodes     <= 2.4
``Node._sequence_nr()``                the order of graph nodes: which module's         <= 2.4
                                       forward created a node
``FunctionCtx._is_compiled_``          a ctx attribute that is not user state           (a name only)
``autograd_tracing``                   (skipped when counting a custom Function's)
``Tensor._version``                    caches keyed on a tensor are invalidated by an   <= 2.4
                                       in-place change
``Tensor._base``                       a view of a resident tensor is resident too     <= 2.4
``torch.utils.weak.                    caches that die with the tensor they describe    <= 2.4
WeakIdKeyDictionary``
=====================================  ==============================================  ==============

"<= 2.4": works on 2.4.1, the oldest release tested (``check()`` there; ``bench/results/torch_floor.md``).
``custom_op`` below evaluates string annotations, which torch 2.4-2.6 cannot infer a schema from.

The floor (``setup.py``: ``torch>=2.12.1``) is measured, not derived from this table: ``tools/torch_floor.sh``,
results in ``bench/results/torch_floor.md``. ``SavedTensor.data`` bounds it: before 2.10 the only way to read a
saved tensor is to unpack it, which runs its unpack hook (decompressing what blockquant packed, and whatever
another library's hooks do), so there is no exact fallback; 2.10.0 has every API here but fails two tests of its
own (``torch.compile`` and its triton), so the suite sets the floor at 2.12.1. Public APIs that would set it otherwise:
``torch.library.custom_op`` and ``register_fake`` (2.4; the codec, CSR product, dropout and sampling ops; torch 2.4
also rejects their string annotations, ``from __future__ import annotations``), ``torch.compiler.is_compiling``
(2.3), ``torch.compiler.disable`` and ``assume_constant_result`` (2.1).
"""
import typing
from typing import Optional, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["WeakIdKeyDictionary", "custom_op", "delayed_error", "batch_norm_with_update", "is_saved_tensor",
           "saved_tensor_data", "raw_saved_slots", "sequence_nr", "CTX_INTERNAL_ATTRS", "tensor_version",
           "view_base", "check"]


def custom_op(name: str, *, mutates_args=()):
    """``torch.library.custom_op`` for a function whose annotations are strings (``from __future__ import
    annotations``): torch 2.4 rejects string annotations and 2.5 reads only simple ones (not ``Tuple[...]``)
    when it infers the op's schema, so they are evaluated here first."""
    def register(fn):
        fn.__annotations__ = typing.get_type_hints(fn)
        return torch.library.custom_op(name, mutates_args=mutates_args)(fn)
    return register


def delayed_error(message: str, num_inputs: int):
    """An autograd Function that passes ``num_inputs`` tensors through and raises ``message`` when the result
    is differentiated."""
    return torch._C._functions.DelayedError(message, num_inputs)


def batch_norm_with_update(x, weight, bias, running_mean, running_var, momentum: float, eps: float):
    """Training-mode batch norm that updates the running statistics in place: ``(out, save_mean, save_invstd)``
    (``save_invstd`` is the inverse standard deviation of the batch)."""
    out, save_mean, save_invstd, _ = torch.ops.aten._batch_norm_with_update(
        x, weight, bias, running_mean, running_var, momentum, eps)
    return out, save_mean, save_invstd


def is_saved_tensor(obj) -> bool:
    """Whether ``obj`` is an autograd ``SavedTensor`` (what a node's ``_raw_saved_*`` slot holds)."""
    return isinstance(obj, torch._C._autograd.SavedTensor)


def saved_tensor_data(saved):
    """What a ``SavedTensor`` stores: the tensor, or the pack hook's result when saved-tensor hooks ran
    (torch >= 2.10)."""
    try:
        return saved.data
    except AttributeError:
        raise AttributeError(f"reading what autograd saved without unpacking it needs torch >= 2.10 "
                             f"(SavedTensor.data); got torch {torch.__version__}, whose {type(saved).__name__} "
                             f"has no .data") from None


_RAW_SLOTS = {}


def raw_saved_slots(node) -> Tuple[str, ...]:
    """Names of the attributes through which a built-in autograd node exposes what it saved, unpacked or not
    (``_raw_saved_self``, ``_raw_saved_other``, ...; each gives a ``SavedTensor``)."""
    cls = type(node)
    slots = _RAW_SLOTS.get(cls)
    if slots is None:
        slots = _RAW_SLOTS[cls] = tuple(a for a in dir(node) if a.startswith("_raw_saved_"))
    return slots


def sequence_nr(node) -> int:
    """The autograd sequence number of a graph node: nodes created later in a thread have larger numbers."""
    return node._sequence_nr()


CTX_INTERNAL_ATTRS = frozenset({"_is_compiled_autograd_tracing"})
"""Private attributes PyTorch sets on a custom Function's ctx (not state the Function saved)."""


def tensor_version(t: torch.Tensor) -> int:
    """The tensor's version counter: it changes with every in-place modification."""
    return t._version


def view_base(t: torch.Tensor) -> Optional[torch.Tensor]:
    """The tensor ``t`` is a view of, or None."""
    return t._base


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def backend_dispatch_keys(device_type: str):
    """``torch._C.DispatchKeySet`` of the backend key of ``device_type`` (cpu, cuda, meta): what
    ``OpOverload.redispatch`` takes to run an op's kernel for that device, below autograd and the
    Python modes (the host-sync counter, :mod:`blockquant.host_syncs`). torch 2.x."""
    return torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _DISPATCH_KEYS[device_type]))


def check() -> dict:
    """Try every API above on the installed torch: ``{name: None}`` when it works, else the error."""
    results = {}

    def attempt(name, fn):
        try:
            fn()
            results[name] = None
        except Exception as e:  # noqa: BLE001 - reported, not raised
            results[name] = f"{type(e).__name__}: {e}"

    def graph():
        a = torch.randn(3, requires_grad=True)
        return (a * a.exp()).sum()

    def delayed():
        x = torch.ones(2, requires_grad=True)
        y = delayed_error("differentiated", 1)(x)
        try:
            y.sum().backward()
        except RuntimeError as e:
            assert "differentiated" in str(e)
            return
        raise AssertionError("DelayedError did not raise")

    def saved():
        node = graph().grad_fn.next_functions[0][0]  # MulBackward0
        slots = raw_saved_slots(node)
        assert slots and all(is_saved_tensor(getattr(node, s)) for s in slots)
        assert all(isinstance(saved_tensor_data(getattr(node, s)), torch.Tensor) for s in slots)

    def order():
        out = graph()
        assert sequence_nr(out.grad_fn) > sequence_nr(out.grad_fn.next_functions[0][0])

    def bn():
        x, mean, var = torch.randn(8, 3), torch.zeros(3), torch.ones(3)
        out, m, invstd = batch_norm_with_update(x, None, None, mean, var, 0.1, 1e-5)
        assert out.shape == x.shape and m.shape == invstd.shape == (3,) and bool(mean.abs().sum() > 0)

    def tensor_attrs():
        t = torch.zeros(4)
        v = tensor_version(t)
        t.add_(1)
        assert tensor_version(t) == v + 1 and view_base(t[:2]) is t and view_base(t) is None

    attempt("DelayedError", delayed)
    attempt("aten._batch_norm_with_update", bn)
    attempt("SavedTensor, .data, _raw_saved_*", saved)
    attempt("_sequence_nr()", order)
    attempt("Tensor._version, Tensor._base", tensor_attrs)
    attempt("torch.library.custom_op, register_fake", lambda: (torch.library.custom_op, torch.library.register_fake))
    attempt("torch.compiler.is_compiling", lambda: torch.compiler.is_compiling())
    attempt("DispatchKeySet (backend keys)", lambda: [backend_dispatch_keys(d) for d in _DISPATCH_KEYS])
    return results


def report() -> None:
    """Print :func:`check`'s result, one line per API."""
    for name, error in check().items():
        print(f"{'ok     ' if error is None else 'MISSING'} {name}{'' if error is None else ': ' + error}")
