"""The wrapper registry and the base class every compressed module derives from.

A compressed wrapper subclasses the module it replaces (``QLinear(nn.Linear)``),
so ``isinstance`` checks, ``repr``, ``state_dict`` keys and the ``forward``
signature stay those of the original. :meth:`CompressedModule.from_module`
builds the wrapper around the *same* Parameter and buffer objects, so
checkpoints of the unconverted model load into the converted one and back, and
an optimizer built before conversion keeps working.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

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


def wrapper_for(module: torch.nn.Module) -> Optional[Type["CompressedModule"]]:
    """The wrapper class for exactly ``type(module)`` (subclasses of supported types are not guessed)."""
    return WRAPPERS.get(type(module))


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
        new = cls.__new__(cls)
        # share, not copy: the very same Parameter/buffer/submodule dicts and objects
        new.__dict__.update(module.__dict__)
        new.bq_config = config
        new._bq_init()
        return new

    def _bq_init(self) -> None:
        """Hook for subclasses that need extra state after :meth:`from_module`."""

    def compressing(self) -> bool:
        return bool(self.training and torch.is_grad_enabled())

    def to_original(self) -> torch.nn.Module:
        """The plain module again, sharing the same parameters."""
        orig = self.wraps.__new__(self.wraps)
        orig.__dict__.update({k: v for k, v in self.__dict__.items() if not k.startswith("bq_")})
        return orig

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        q = f"bq={self.bq_config.short()}"
        return f"{base}, {q}" if base else q
