"""The wrapper registry and the base class every compressed module derives from.

A compressed wrapper subclasses the module it replaces (``QLinear(nn.Linear)``),
so ``isinstance`` checks, ``repr``, ``state_dict`` keys and the ``forward``
signature stay those of the original. :meth:`CompressedModule.from_module`
builds the wrapper around the *same* Parameter and buffer objects, so
checkpoints of the unconverted model load into the converted one and back, and
an optimizer built before conversion keeps working.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..config import QuantConfig

WRAPPERS: Dict[type, type] = {}
"""Original module class -> compressed wrapper class."""


def register_wrapper(original: type):
    """Class decorator: record ``wrapper`` as the compressed version of ``original``."""

    def deco(wrapper: type) -> type:
        if not issubclass(wrapper, original):
            raise TypeError(f"{wrapper.__name__} must subclass {original.__name__} to wrap it")
        WRAPPERS[original] = wrapper
        wrapper.wraps = original
        return wrapper

    return deco


def lazy_reason(module: torch.nn.Module) -> Optional[str]:
    """Why ``module`` cannot be converted yet: it has lazily initialised parameters
    (``in_channels=-1``, ``torch.nn.Lazy*``), whose shapes are only known after a forward pass."""
    lazy = [n for n, p in module.named_parameters() if isinstance(p, torch.nn.parameter.UninitializedParameter)]
    if not lazy:
        return None
    return (f"lazily initialised parameters ({', '.join(lazy)}) do not exist yet: run one forward pass "
            "first, then convert")


class CompressedModule:
    """Mixin for compressed wrappers. Subclasses implement ``forward`` and use
    :meth:`compressing` to decide between the exact original computation
    (``eval()`` or grad disabled: no overhead) and the compressed training path.
    """

    wraps: type = object
    bq_config: QuantConfig
    bq_convert_children: tuple = ()
    """Names of child modules that :func:`blockquant.convert` should still visit
    (the wrapper does not run them itself, e.g. GIN's ``nn`` MLP)."""

    @classmethod
    def from_module(cls, module: torch.nn.Module, config: Optional[QuantConfig] = None):
        if type(module) is not cls.wraps:
            raise TypeError(f"{cls.__name__}.from_module expects a {cls.wraps.__name__}; got {type(module).__name__}")
        config = QuantConfig.preset("default") if config is None else config
        if not isinstance(config, QuantConfig):
            raise TypeError(f"{cls.__name__}.from_module expects a QuantConfig; got {type(config).__name__}")
        lazy = lazy_reason(module)
        if lazy is not None:
            raise ValueError(f"cannot convert this {type(module).__name__}: {lazy}")
        new = cls.__new__(cls)
        # share, not copy: the very same Parameter/buffer/submodule dicts and objects
        new.__dict__.update(module.__dict__)
        new.bq_config = config
        new._bq_init()
        return new

    @classmethod
    def unsupported_reason(cls, module: torch.nn.Module) -> Optional[str]:
        """Why ``module`` cannot be wrapped (``convert`` then leaves it exact and reports the
        reason), or None. Here: lazily initialised parameters; convolutions add their options."""
        if type(module) is not cls.wraps:
            return f"{cls.__name__} wraps exactly {cls.wraps.__name__}; got {type(module).__name__}"
        return lazy_reason(module)

    def _bq_init(self) -> None:
        """Hook for subclasses that need extra state after :meth:`from_module`."""

    def compressing(self) -> bool:
        """Whether this call compresses: training with gradients on (else the original forward runs)."""
        return bool(self.training and torch.is_grad_enabled())

    def to_original(self) -> torch.nn.Module:
        """The plain module again, sharing the same parameters, undone as a whole: wrappers
        inside it (GIN's ``nn`` MLP, converted because the wrapper runs it) are replaced by
        their originals in place, and the forward scope :func:`blockquant.convert` put on a
        converted root is removed. The same undo as :func:`blockquant.to_original`."""
        from .. import forward_scope
        from ..conversion import _restore_children

        orig = self._bq_unwrapped()
        _restore_children(orig)
        forward_scope.remove(orig)  # the hook tables are shared with this wrapper: it loses them too
        return orig

    def _bq_unwrapped(self) -> torch.nn.Module:
        """The original class around this wrapper's state (same dicts, children untouched, no
        blockquant attributes): what ``convert`` checks a wrapper's options on."""
        orig = self.wraps.__new__(self.wraps)
        orig.__dict__.update({k: v for k, v in self.__dict__.items()
                              if not (k.startswith("bq_") or k.startswith("_bq_"))})
        return orig

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """``torch.jit.script`` calls this on every submodule before compiling. TorchScript cannot
        run the compressed training path (Python autograd Functions), and swapping in the
        original here would silently unconvert the caller's model (torch writes the result
        back into the parent), so scripting is refused with what to do instead."""
        raise RuntimeError(f"torch.jit.script cannot compile {type(self).__name__} (blockquant's compressed "
                           f"wrapper of {self.wraps.__name__}): TorchScript cannot run its Python autograd "
                           "Functions. Call blockquant.to_original(model) first (same Parameters, exact "
                           "modules), then script it; convert again to keep training compressed in Python.")

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        q = f"bq={self.bq_config.short()}"
        return f"{base}, {q}" if base else q
