"""Swap a model's supported submodules for compressed wrappers: :func:`convert`, :func:`summary`.

The swap is in place and keeps the user's Parameter objects (see
:class:`blockquant.nn.CompressedModule`): ``state_dict`` keys and values do not
change, checkpoints of the unconverted model load into the converted one and
back, and an optimizer built before the conversion keeps updating the same
tensors.

What a module swap cannot reach -- activations, dropout and products called
functionally inside a ``forward`` (``F.dropout(x)``, ``x.relu()``, ``F.elu(x)``,
``x @ w``), as PyG's own examples and most hand-written models do -- is covered
by what the converted root does around its training forward
(:mod:`blockquant.forward_scope`): the rules of
:func:`blockquant.compress_saved_tensors` apply to everything the forward saves,
one draw from the user's random stream seeds the whole forward, and the inputs
the caller holds are saved by reference for the duration of the call.
``convert(model, functional=False)`` keeps the last two and leaves functional
calls saving what torch saves.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from . import forward_scope
from .config import QuantConfig
from .nn.registry import WRAPPERS, CompressedModule, lazy_reason

__all__ = ["convert", "to_original", "summary", "ConversionWarning", "ProjectionWarning", "ConversionInfo"]

ConfigSpec = Union[None, str, QuantConfig, Mapping[Union[str, type], Optional[QuantConfig]]]
FilterFn = Callable[[torch.nn.Module, str], bool]

_INFO_ATTR = "_bq_conversion"

# Modules that look like computation: leaving one of these unconverted leaves its
# saved tensors at full precision, which the user should hear about.
_COMPUTE_MODULE_FILES = ("activation", "batchnorm", "normalization", "instancenorm", "dropout", "conv",
                         "linear", "pooling")
_SILENT_TYPES = (torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten)


class ConversionWarning(UserWarning):
    """Some modules were left at full precision by :func:`convert`."""


class ProjectionWarning(UserWarning):
    """:func:`convert` applied random projection (``rp_ratio > 1``, as in the ``exact`` and ``iexact``
    presets): it costs accuracy on graphs of Cora's size (see the preset table in docs/method.md)."""


def _warn_projection(root: torch.nn.Module) -> None:
    """Random projection at ratio r multiplies a projected layer's weight-gradient variance by about r
    whatever the layer's width: say so, with the way to measure it and the way around it."""
    projected = [(n, m.bq_config.rp_ratio) for n, m in root.named_modules()
                 if isinstance(m, CompressedModule) and m.bq_config.rp_ratio > 1]
    if not projected:
        return
    ratios = sorted({r for _, r in projected})
    warnings.warn(
        f"blockquant.convert: {len(projected)} module(s) compress linear-layer inputs with random projection "
        f"(rp_ratio {', '.join(map(str, ratios))}). The projection stores {ratios[-1]}x fewer columns but adds "
        "gradient noise of about rp_ratio times a projected layer's weight gradient, at every layer width: on "
        "Cora-sized graphs many times the noise dropout adds, and about a point of test accuracy in paired runs "
        "(docs/method.md, 'Presets: what each costs'). Measure it on your data with blockquant.noise_report(model, data, "
        "config); blockquant.tune(model, data, budget=config) finds a plan of the same bytes, or use 'int2' (no "
        "projection). Silence with warnings.filterwarnings('ignore', category=blockquant.ProjectionWarning).",
        ProjectionWarning, stacklevel=3)


@dataclasses.dataclass
class ConversionInfo:
    """What :func:`convert` did to a model (kept on the model for :func:`summary`)."""

    converted: List[Tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    """(qualified name, original type, wrapper type, config.short())"""
    skipped: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    """(qualified name, type, reason)"""


def _load_nn_wrappers() -> None:
    """Import the wrapper modules so that they register themselves in WRAPPERS."""
    import importlib

    for mod in ("blockquant.nn.basic", "blockquant.nn.conv"):
        importlib.import_module(mod)


def _resolve_single(config: Any, where: str) -> Optional[QuantConfig]:
    if config is None:
        return None
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return QuantConfig.preset(config)
    raise TypeError(f"blockquant.convert: {where} must be a QuantConfig, a preset name "
                    f"{QuantConfig.preset_names()} or None; got {type(config).__name__}")


class _ConfigChooser:
    """Picks the config of one module from what the caller passed to :func:`convert`.

    Precedence: the module's exact qualified name, then the nearest ancestor's
    name, then its type (walking the MRO), then the global default. A mapping
    value of ``None`` means "leave this module (or subtree) alone".
    """

    _UNSET = object()

    def __init__(self, config: ConfigSpec, names: List[str]):
        self.default = QuantConfig.preset("default")
        self.by_name: Dict[str, Optional[QuantConfig]] = {}
        self.by_type: Dict[type, Optional[QuantConfig]] = {}
        if config is None:
            return
        if isinstance(config, (QuantConfig, str)):
            self.default = _resolve_single(config, "config")
            return
        if not isinstance(config, Mapping):
            raise TypeError("blockquant.convert: config must be None, a QuantConfig, a preset name or a mapping "
                            f"from module names / module types to QuantConfig; got {type(config).__name__}")
        known = set(names)
        unknown = []
        for key, value in config.items():
            if isinstance(key, str):
                if key not in known:
                    unknown.append(key)
                    continue
                self.by_name[key] = _resolve_single(value, f"config[{key!r}]")
            elif isinstance(key, type) and issubclass(key, torch.nn.Module):
                self.by_type[key] = _resolve_single(value, f"config[{key.__name__}]")
            else:
                raise TypeError("blockquant.convert: config mapping keys must be qualified module names (str) or "
                                f"torch.nn.Module subclasses; got {key!r}")
        if unknown:
            sample = ", ".join(repr(n) for n in sorted(known) if n)[:300]
            raise ValueError(f"blockquant.convert: config names {sorted(unknown)} match no submodule of the model; "
                             f"expected qualified names from model.named_modules(), e.g. {sample}")

    def choose(self, module: torch.nn.Module, name: str) -> Optional[QuantConfig]:
        parts = name.split(".") if name else []
        for i in range(len(parts), -1, -1):
            key = ".".join(parts[:i])
            if key in self.by_name:
                return self.by_name[key]
        cls = getattr(module, "wraps", None) if isinstance(module, CompressedModule) else None
        for t in (cls.__mro__ if cls else type(module).__mro__):
            if t in self.by_type:
                return self.by_type[t]
        return self.default


def _looks_like_compute(module: torch.nn.Module) -> bool:
    if isinstance(module, _SILENT_TYPES):
        return False
    if any(p is not None for p in module._parameters.values()):
        return True
    from torch_geometric.nn.conv import MessagePassing

    if isinstance(module, MessagePassing):
        return True
    if len(module._modules) == 0:
        mod = type(module).__module__ or ""
        return mod.startswith("torch.nn.modules.") and mod.rsplit(".", 1)[-1] in _COMPUTE_MODULE_FILES
    return False


def _why_unknown(module: torch.nn.Module) -> str:
    lazy = lazy_reason(module)
    if lazy is not None:
        return lazy
    for base in type(module).__mro__[1:]:
        if base in WRAPPERS:
            return (f"subclass of {base.__name__}: wrappers match exact types only "
                    f"(register one with blockquant.nn.register_wrapper)")
    return "no blockquant wrapper"


def convert(model: torch.nn.Module, config: ConfigSpec = None, *,
            filter_fn: Optional[FilterFn] = None, functional: Optional[bool] = None) -> torch.nn.Module:
    """Replace supported submodules of ``model`` by compressed wrappers, in place.

    Supported means the module's exact type is a key of
    :data:`blockquant.nn.WRAPPERS` (``torch.nn.Linear``, ``BatchNorm1d``,
    activations, ``Dropout``, PyG convolutions, ...). Wrappers reuse the
    original Parameter and buffer objects. A wrapper's children are left to it,
    except those it lists in ``bq_convert_children`` (GIN's ``nn`` MLP); a
    module a wrapper refuses runs its original forward and stays exact as a
    whole, children included (listed in :func:`summary` as "inside refused
    ..."); the children of everything else are visited. Lazily initialised
    modules (``in_channels=-1``, ``torch.nn.Lazy*``) are refused until one
    forward pass has created their parameters.

    The returned root gets a forward scope (:mod:`blockquant.forward_scope`),
    active in training with gradients enabled, eagerly:

    * functional calls: what the whole forward saves follows the rules of
      :func:`blockquant.compress_saved_tensors` at the root's config (the
      default of every module not named otherwise): ``F.dropout`` keeps a seed
      (0 B per element; its mask comes from blockquant's seeded stream, not
      torch's generator), ReLU / LeakyReLU a 1-bit sign, ELU / GELU / sigmoid /
      tanh their derivative compressed, ``F.layer_norm`` / ``F.batch_norm`` what
      the module wrappers keep, products and ``exp`` their operands compressed,
      everything else (softmax, division, norms, ...) exact. Modules without a
      wrapper follow the same rules; what wrappers keep is never compressed a
      second time. Modules left exact (refused, or excluded by ``config`` /
      ``filter_fn``) run with the rules suspended: they save what torch saves.
      ``functional=False`` turns the rules off;
    * one draw from PyTorch's default generator per forward, every seed of the
      forward derived from it (:mod:`blockquant.seeds`): ``torch.manual_seed``
      reproduces runs, and the user's random stream advances by one draw per
      training forward whatever the graph's size;
    * tensors passed to ``forward`` that have no ``grad_fn`` (features, the
      graph) are resident for the duration of the call: compressed ops save
      them by reference (:mod:`blockquant.save_policy`). Inputs with a
      ``grad_fn`` (an unconverted encoder's output) are compressed.
    * one finiteness check of everything compressed during the forward, when it
      returns (one device synchronisation per step;
      :func:`blockquant.defer_finite_check`): a NaN or Inf raises ``ValueError``
      before backward and the optimizer step, naming the tensor and the module
      that saved it.

    The scope closes when ``forward`` returns or raises. ``eval()``,
    ``torch.no_grad()`` and ``torch.compile`` (whose graphs cannot trace
    saved-tensor hooks; only the residency marks apply there) run without it. A
    root module that is itself refused or excluded gets no scope: it behaves
    exactly like the original, ``torch.jit.script`` included.

    Args:
        model: the module to convert. If ``model`` itself is supported, the
            wrapper replacing it is returned (use the return value).
        config: ``None`` for ``QuantConfig.preset("default")``; a
            :class:`QuantConfig` or preset name for every module; a path to a
            ``.json`` file holding a QuantConfig or a :class:`blockquant.Plan`
            (what ``blockquant tune`` writes); or a mapping (a ``Plan`` is one)
            from qualified module names (``"convs.0"``, applies to the subtree)
            and/or module types (``torch.nn.BatchNorm1d``) to a QuantConfig, or
            to ``None`` to leave those modules alone. Names beat types; modules
            matched by neither get the default preset. Unknown names raise.
        filter_fn: ``filter_fn(module, qualified_name) -> bool``; modules for
            which it returns False are not converted (their children are still
            visited, so filter on a name prefix to exclude a subtree).
        functional: compress what functional calls save (above). ``None``
            keeps the choice of an earlier ``convert`` of this model, else True.

    Returns:
        ``model`` (or the wrapper, if the root itself was swapped).

    Converting an already converted model is harmless: wrappers are kept; a
    wrapper whose chosen config differs from an explicitly passed one is
    rebuilt with the new config (same Parameters). Modules that look like
    computation but have no wrapper (their saves then follow the functional
    rules, or stay at full precision with ``functional=False``), and wrappers
    that refuse a particular module configuration (``unsupported_reason``: the
    module stays at full precision), are listed in one :class:`ConversionWarning`.
    :func:`summary` prints the outcome; ``track_saved(model).report()`` lists
    what a forward holds at full precision, by module and graph node.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"blockquant.convert expects a torch.nn.Module; got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"blockquant.convert: filter_fn must be callable(module, name) -> bool; "
                        f"got {type(filter_fn).__name__}")
    if functional is not None and not isinstance(functional, bool):
        raise TypeError(f"blockquant.convert: functional must be True, False or None (keep the setting of an "
                        f"earlier convert, else True); got {functional!r}")
    _load_nn_wrappers()
    if isinstance(config, str) and config.endswith(".json"):
        from .plan import load_config_or_plan

        config = load_config_or_plan(config)
    chooser = _ConfigChooser(config, [n for n, _ in model.named_modules()])
    explicit = config is not None

    info = ConversionInfo()
    unknown: List[Tuple[str, str, str]] = []
    refused: List[Tuple[str, str, str]] = []
    exact: List[str] = []  # modules left exact on purpose (refused, excluded): no functional compression inside

    def leave_exact(name: str) -> None:
        if not any(name == e or name.startswith(e + ".") or e == "" for e in exact):
            exact.append(name)

    def visit(module: torch.nn.Module, name: str) -> torch.nn.Module:
        """Return what should stand at ``name``: the module or its wrapper."""
        tname = type(module).__name__
        if isinstance(module, CompressedModule):
            cfg = chooser.choose(module, name)
            if cfg is None:  # the caller asked for this module to stay exact: as if it had never been converted
                leave_exact(name)
                module = module.to_original()
                visit_children(module, name)  # its children follow their own names and types, as on a fresh model
                return module
            if type(module).unsupported_reason(module._bq_unwrapped()) is None:
                if explicit and cfg != module.bq_config:
                    module = type(module).from_module(module._bq_unwrapped(), cfg)
                visit_children(module, name, type(module).bq_convert_children)
                return module
            module = module.to_original()  # an option changed since the last convert: refused below
            tname = type(module).__name__
        wrapper = WRAPPERS.get(type(module))
        if wrapper is not None:
            cfg = chooser.choose(module, name)
            keep = filter_fn(module, name) if filter_fn is not None else True
            if cfg is None or not keep:
                leave_exact(name)
                info.skipped.append((name, tname, "excluded by config" if cfg is None else "excluded by filter_fn"))
            else:
                check = getattr(wrapper, "unsupported_reason", None)
                reason = check(module) if check is not None else None
                if reason is None:
                    new = wrapper.from_module(module, cfg)
                    visit_children(new, name, wrapper.bq_convert_children)
                    return new
                refused.append((name, tname, reason))
                info.skipped.append((name, tname, reason))
                leave_exact(name)
                # A refused layer runs its original forward, children included: they stay exact
                # too (one rule: a refused layer is exact as a whole; wrappers converted by an
                # earlier call are undone).
                _restore_children(module)
                for child_name, child in module.named_modules():
                    if child_name and (WRAPPERS.get(type(child)) is not None or _looks_like_compute(child)):
                        info.skipped.append((f"{name}.{child_name}" if name else child_name, type(child).__name__,
                                             f"inside refused {tname} '{name or '<root>'}': left exact with it"))
                return module
        elif name and chooser.choose(module, name) is None:
            leave_exact(name)  # a subtree the caller excluded by name or type (for the root: see below)
        elif _looks_like_compute(module):
            # do not warn about a compute module the caller excluded on purpose
            if not (filter_fn is not None and not filter_fn(module, name)):
                unknown.append((name, tname, _why_unknown(module)))
                info.skipped.append((name, tname, _why_unknown(module)))
        visit_children(module, name)
        return module

    def visit_children(module: torch.nn.Module, name: str, only=None) -> None:
        """Visit ``module``'s children (for a wrapper, only those it does not run itself)."""
        for child_name, child in list(module._modules.items()):
            if child is None or (only is not None and child_name not in only):
                continue
            qual = f"{name}.{child_name}" if name else child_name
            new = visit(child, qual)
            if new is not child:
                setattr(module, child_name, new)

    previous_scope = forward_scope.settings_of(model)
    root = visit(model, "")
    if functional is None:
        functional = previous_scope.functional if previous_scope is not None else True
    if root is not model:
        forward_scope.remove(model)
    # a root module that a wrapper refused or the caller excluded behaves exactly like the original: no
    # scope. Otherwise the scope runs when it has something to do: functional calls to compress (the
    # root's config, i.e. the default for everything not named, is not None) or wrappers to serve
    root_config = chooser.choose(root, "")
    wrapped = any(isinstance(m, CompressedModule) for m in root.modules())
    if "" in exact or not ((functional and root_config is not None) or wrapped):
        forward_scope.remove(root)
    else:
        forward_scope.install(root, forward_scope.ScopeSettings(functional, root_config, tuple(exact)))

    for name, mod in root.named_modules():
        if isinstance(mod, CompressedModule):
            mod.__dict__["bq_name"] = name  # how a deferred finiteness error names the module
            info.converted.append((name, mod.wraps.__name__, type(mod).__name__, mod.bq_config.short()))
    previous: Optional[ConversionInfo] = model.__dict__.get(_INFO_ATTR)
    if previous is not None:  # keep reasons found by an earlier call for modules still unconverted
        seen = {s[0] for s in info.skipped} | {c[0] for c in info.converted}
        info.skipped.extend(s for s in previous.skipped if s[0] not in seen)
    root.__dict__[_INFO_ATTR] = info
    if root is not model:
        model.__dict__[_INFO_ATTR] = info

    _warn_projection(root)
    if unknown or refused:
        scope = forward_scope.settings_of(root)
        lines = []
        if unknown:
            fate = (_RULES_APPLY if scope is not None and scope.functional and scope.config is not None
                    else "left at full precision: blockquant.compress_saved_tensors can cover them")
            lines.append(f"no compressed wrapper ({fate}) for: "
                         + "; ".join(f"{n or '<root>'} ({t}: {r})" for n, t, r in unknown))
        if refused:
            lines.append("wrapper refused (left at full precision: the module runs exactly as the original) for: "
                         + "; ".join(f"{n or '<root>'} ({t}: {r})" for n, t, r in refused))
        warnings.warn("blockquant.convert did not compress some modules' saved tensors with a wrapper: "
                      + " | ".join(lines), ConversionWarning, stacklevel=2)
    return root


_RULES_APPLY = ("what they save follows the converted forward's functional rules: compressed where backward is "
                "linear in it, exact otherwise")


def _restore_children(module: torch.nn.Module) -> None:
    """Replace every compressed wrapper below ``module`` by its original, in place."""
    for child_name, child in list(module._modules.items()):
        if child is None:
            continue
        _restore_children(child)
        if isinstance(child, CompressedModule):
            module._modules[child_name] = child.to_original()


def to_original(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`convert`: every compressed wrapper in ``model`` is replaced by the module
    it wraps, in place, sharing the same Parameters (so optimizers and checkpoints keep
    working), and the hooks :func:`convert` put on the root (the forward scope of
    :mod:`blockquant.forward_scope`) are removed. Returns ``model``, or the original module
    when ``model`` itself is a wrapper. ``wrapper.to_original()`` undoes the same.

    Use it for what the compressed path does not support: second-order gradients,
    ``torch.jit.script``, options changed after conversion.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"blockquant.to_original expects a torch.nn.Module; got {type(model).__name__}")
    _restore_children(model)
    root = model.to_original() if isinstance(model, CompressedModule) else model
    for m in {id(model): model, id(root): root}.values():
        m.__dict__.pop(_INFO_ATTR, None)
        forward_scope.remove(m)
    return root


def conversion_info(model: torch.nn.Module) -> Optional[ConversionInfo]:
    """The :class:`ConversionInfo` stored by the last :func:`convert` on ``model`` (or ``None``)."""
    return model.__dict__.get(_INFO_ATTR)


def _forward_scope_lines(scope: Optional[forward_scope.ScopeSettings]) -> List[str]:
    """What happens around the root's forward, for :func:`summary`."""
    if scope is None:
        return ["the root is left exact: its forward runs as the original's, nothing compressed around it"]
    if scope.functional and scope.config is not None:
        lines = ["functional calls in forward: compressed by the compress_saved_tensors rules at "
                 f"{scope.config.short()} (F.dropout: a seed; relu, leaky_relu: 1 bit; elu, gelu, sigmoid, tanh, "
                 "layer_norm, batch_norm: as blockquant.functional; products, exp: compressed; softmax, division, "
                 "norms, other ops: exact); modules without a wrapper follow the same rules; "
                 "blockquant.convert(model, functional=False) turns this off"]
        if scope.exact:
            lines.append("left exact (the rules are suspended while they run): " + ", ".join(scope.exact))
    else:
        why = "converted with functional=False" if not scope.functional else "the root's config is None"
        lines = [f"functional calls in forward: saved as torch saves them, at full precision ({why})"]
    lines.append("blockquant.track_saved(model).report() lists what a forward holds at full precision, by module "
                 "and graph node")
    return lines


def summary(model: torch.nn.Module, *, print_it: bool = True) -> str:
    """Table of the compressed modules of ``model`` and of what was left alone and why.

    Returns the text and (by default) prints it.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"blockquant.summary expects a torch.nn.Module; got {type(model).__name__}")
    rows = [(n or "<root>", m.wraps.__name__, type(m).__name__, m.bq_config.short())
            for n, m in model.named_modules() if isinstance(m, CompressedModule)]
    head = ("module", "original", "wrapper", "config")
    widths = [max([len(head[i])] + [len(r[i]) for r in rows]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [f"blockquant: {len(rows)} compressed module(s) in {type(model).__name__}", fmt.format(*head),
             "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in rows]
    info = conversion_info(model)
    if info is None:
        lines.append("(blockquant.convert has not been called on this model)")
    else:
        converted = {r[0] for r in rows}
        skipped = [s for s in info.skipped if (s[0] or "<root>") not in converted]
        if skipped:
            lines.append("")
            lines.append(f"not converted ({len(skipped)}):")
            w = max(len(s[0] or "<root>") for s in skipped)
            lines += [f"  {s[0] or '<root>':<{w}}  {s[1]}: {s[2]}" for s in skipped]
        else:
            lines.append("every module that looks like computation was converted")
        lines.append("")
        lines += _forward_scope_lines(forward_scope.settings_of(model))
    text = "\n".join(lines)
    if print_it:
        print(text)
    return text
