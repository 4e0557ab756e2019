"""What a converted model does around its training forward.

:func:`blockquant.convert` installs two hooks on the module it returns (the *root*): a forward
pre-hook that opens a scope and a forward hook with ``always_call=True`` that closes it, also when
``forward`` raises. The scope is opened only in training with gradients enabled (``eval()`` and
``torch.no_grad()`` run the forward with nothing around it) and never under ``torch.compile``
(see below). Inside it:

1. **Functional calls are compressed** (unless ``convert(model, functional=False)``, read from
   :class:`ScopeSettings` at each call): what autograd
   saves anywhere in the forward, functional calls (``F.dropout``, ``.relu()``, ``F.elu``, ``x @ w``)
   and modules without a wrapper included, follows the rules of
   :func:`blockquant.compress_saved_tensors` with the root's config: dropout keeps a seed (0 B per
   element, the mask from blockquant's seeded stream), ReLU / LeakyReLU a 1-bit sign, ELU / GELU /
   sigmoid / tanh / LayerNorm / BatchNorm what their :mod:`blockquant.functional` op keeps, products
   and ``exp`` their operands compressed, everything else (softmax, division, ...) exact. The rules'
   config is the root's (``None`` for the root, i.e. everything not named at full precision, leaves
   functional calls exact too).
   Compressed wrappers keep what their own autograd Functions keep: the rules never compress a
   second time what a wrapper saved (a Function's saved tensors are resident or exact by
   construction, and the rules keep those as they are).
2. **Modules left exact stay exact**: while a module that ``convert`` refused (its wrapper cannot
   honour an option) or that the caller excluded (``config`` mapping to ``None``, ``filter_fn``)
   runs, the rules are suspended (its subtree saves what torch saves, its dropout draws from
   torch's generator). A root left exact gets no hooks at all: it behaves exactly like the original,
   ``torch.jit.script`` included.
3. **One draw from the user's random stream**: every seed of the forward (rounding, projection,
   dropout) is derived from one draw made on entry (:func:`blockquant.seeds.forward_seeds`).
4. **Inputs the caller holds are saved by reference**: tensors passed to ``forward`` (nested in
   tuples, lists, dicts or a PyG ``Data``) that have no ``grad_fn`` -- the features, the graph --
   are marked resident for the duration of the call (:func:`blockquant.save_policy.resident_during`).
   A tensor with a ``grad_fn`` (the output of an unconverted encoder, ``gnn(enc(x), ei)``) is an
   intermediate only the graph would keep: it is compressed like any other.
5. **One finiteness check per forward**: what the forward compressed is checked for NaN / Inf once,
   when it returns (one device synchronisation per step instead of one per compressed tensor;
   :func:`blockquant.defer_finite_check`); a non-finite value raises ``ValueError`` naming the op
   and the module that saved it, before backward and the optimizer step. A forward that raised
   drops its check: that error is the one to see.

Under ``torch.compile`` the hooks only apply the residency marks (attribute writes, which dynamo
traces): saved-tensor hooks and function modes cannot be traced into a compiled graph, so a
compiled converted model compresses what its wrappers save (they trace through), its functional
calls save what torch saves, and each seed is a random op drawn inside the graph. The hooks are
also skipped when a root has nothing to do: a root with no wrapper and functional calls left
exact gets none. A converted root called inside another one shares the outer one's
rules and seed stream.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from typing import Iterator, List, Optional, Tuple

import torch

from .config import QuantConfig
from .nested import flatten_tensors
from .packed import close_forward_check, open_forward_check
from .save_policy import enter_resident_call, leave_resident_call
from .saved_hooks import SavedTensorRules
from .seeds import forward_seeds

__all__ = ["ScopeSettings", "install", "remove", "settings_of"]

_SETTINGS_ATTR = "_bq_forward_scope"


@dataclasses.dataclass(frozen=True)
class ScopeSettings:
    """What the root's scope does (kept in the root's ``__dict__``, so copies and pickles carry it)."""

    functional: bool
    """Apply the :func:`~blockquant.compress_saved_tensors` rules to the whole forward (what the caller asked:
    ``convert(..., functional=...)``; they apply only when :attr:`config` is not ``None`` either)."""
    config: Optional[QuantConfig]
    """Config of those rules: the root's config, i.e. the default of every module not named otherwise
    (random projection is not used by them). ``None`` (``convert(model, {"": None, ...})``): everything
    not named stays at full precision, functional calls included."""
    exact: Tuple[str, ...] = ()
    """Qualified names (relative to the root) of modules left exact: the rules are suspended while they run."""


def settings_of(root: torch.nn.Module) -> Optional[ScopeSettings]:
    """The settings :func:`install` put on ``root`` (``None``: no scope)."""
    return root.__dict__.get(_SETTINGS_ATTR)


def install(root: torch.nn.Module, settings: ScopeSettings) -> None:
    """Put the scope hooks on ``root`` (replacing an earlier install)."""
    remove(root)
    root.__dict__[_SETTINGS_ATTR] = settings
    root.register_forward_pre_hook(_open_scope, with_kwargs=True)
    root.register_forward_hook(_close_scope, with_kwargs=True, always_call=True)


def remove(module: torch.nn.Module) -> None:
    """Take the scope hooks and settings off ``module`` (no-op when it has none).

    The hooks are found by identity in the module's hook tables (a wrapper shares those tables
    with the module it was built from, so both lose them)."""
    module.__dict__.pop(_SETTINGS_ATTR, None)
    for table, fn in (("_forward_pre_hooks", _open_scope), ("_forward_hooks", _close_scope)):
        hooks = module.__dict__.get(table)
        if not hooks:
            continue
        for hook_id in [k for k, v in hooks.items() if v is fn]:
            del hooks[hook_id]
            for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                          "_forward_hooks_with_kwargs"):
                module.__dict__.get(extra, {}).pop(hook_id, None)


_open = threading.local()


@dataclasses.dataclass
class _OpenScope:
    module: torch.nn.Module
    marked: Tuple[torch.Tensor, ...] = ()
    exits: Optional[contextlib.ExitStack] = None
    rules: Optional[SavedTensorRules] = None


def _open_scopes() -> List[_OpenScope]:
    stack = getattr(_open, "stack", None)
    if stack is None:
        stack = _open.stack = []
    return stack


def _held_by_caller(args, kwargs) -> Tuple[torch.Tensor, ...]:
    tensors: List[torch.Tensor] = []
    flatten_tensors((args, kwargs), tensors)
    return tuple(t for t in tensors if t.grad_fn is None)


def _wants_scope(module: torch.nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()


def _open_scope(module: torch.nn.Module, args, kwargs) -> None:
    settings: Optional[ScopeSettings] = module.__dict__.get(_SETTINGS_ATTR)
    if settings is None:
        return  # a module sharing the hook tables of a wrapper root (its original): nothing to do
    if torch.compiler.is_compiling():
        # the residency marks are setattrs, which a compiled graph traces; nothing else is traceable
        if _wants_scope(module):
            enter_resident_call(_held_by_caller(args, kwargs))
        return
    scopes = _open_scopes()
    scope = _OpenScope(module)
    if not _wants_scope(module):
        scopes.append(scope)  # eval / no_grad: nothing to do; keeps the pre/post pairing of nested calls
        return
    scope.marked = _held_by_caller(args, kwargs)
    enter_resident_call(scope.marked)
    scope.exits = exits = contextlib.ExitStack()
    exits.callback(leave_resident_call, scope.marked)
    try:
        exits.enter_context(forward_seeds())
        # a converted root called inside another one: the outer rules apply (suspended if this one
        # was converted with functional=False)
        rules = next((s.rules for s in reversed(scopes) if s.rules is not None), None)
        compress = settings.functional and settings.config is not None
        if rules is None and compress:
            rules = exits.enter_context(SavedTensorRules(settings.config).active())
        elif rules is not None and not compress:
            exits.enter_context(rules.suspend())
        scope.rules = rules
        exact = _modules_named(module, settings.exact) if rules is not None else []
        if exact:
            exits.enter_context(_suspended_inside(rules, exact))
    except BaseException:
        exits.close()
        raise
    open_forward_check(module)  # last: nothing above can fail and leave it open
    scopes.append(scope)


def _close_scope(module: torch.nn.Module, args, kwargs, output) -> None:
    if module.__dict__.get(_SETTINGS_ATTR) is None:
        return
    if torch.compiler.is_compiling():
        if _wants_scope(module):
            leave_resident_call(_held_by_caller(args, kwargs))
        return
    scopes = _open_scopes()
    if scopes and scopes[-1].module is module:
        exits = scopes.pop().exits
        if exits is not None:
            # always called, with output None when the forward raised: that error is the one to see
            raised = output is None and sys.exc_info()[1] is not None
            exits.close()
            close_forward_check(module, raised)


def _modules_named(root: torch.nn.Module, names: Tuple[str, ...]) -> List[torch.nn.Module]:
    found = []
    for name in names:
        try:
            found.append(root.get_submodule(name))
        except AttributeError:  # removed or renamed since convert: nothing to suspend for it
            pass
    return found


@contextlib.contextmanager
def _suspended_inside(rules: SavedTensorRules, modules: List[torch.nn.Module]) -> Iterator[None]:
    """Suspend ``rules`` while any of ``modules`` runs (global module hooks, only for this forward:
    nothing stays on the modules themselves, so they remain exactly the originals)."""
    ids = {id(m) for m in modules}

    def enter(module, args):
        if id(module) in ids:
            rules.suspended += 1

    def leave(module, args, output):
        if id(module) in ids:
            rules.suspended -= 1

    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
