"""Helpers every op family of :mod:`blockquant.functional` shares: resolving the config, checking the
input, the no-graph shortcut, the first-order-only guard on backward and the autocast dtype."""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch

from .._compat import delayed_error
from ..config import QuantConfig
from ..packed import SUPPORTED_DTYPES


def _config(config: Union[QuantConfig, str, None], op: str) -> QuantConfig:
    return QuantConfig.resolve(config, f"blockquant.functional.{op}")


def _check_float(x, op: str, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"blockquant.functional.{op} expects {name} to be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"blockquant.functional.{op} expects a floating-point {name}; got {x.dtype}")


def _untracked(*tensors) -> bool:
    """No graph will be recorded: run the plain torch op, compress nothing."""
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


DOUBLE_BACKWARD_MESSAGE = (
    "blockquant: second-order gradients are not supported through compressed modules: their backward "
    "reads tensors that were stored rounded, so it is not differentiable (create_graph=True, e.g. a "
    "gradient penalty, would silently give wrong second derivatives). Call blockquant.to_original(model) "
    "(or exclude these modules: blockquant.convert(model, {name: None})) for the steps that need them, "
    "or leave that code outside blockquant.compress_saved_tensors.")


def _first_order_only(backward):
    """Decorate a Function's ``backward``: with ``create_graph=True`` the gradients it returns
    carry a node that raises :data:`DOUBLE_BACKWARD_MESSAGE` if they are differentiated again
    (first-order results are unchanged). Same mechanism as ``torch.autograd.function.once_differentiable``,
    with an error that says what to do."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        single = not isinstance(outputs, tuple)
        outputs = (outputs,) if single else outputs
        tensors = [i for i, o in enumerate(outputs) if isinstance(o, torch.Tensor)]
        if not tensors:
            return outputs[0] if single else outputs
        err = delayed_error(DOUBLE_BACKWARD_MESSAGE, len(tensors))
        wrapped = err(*[outputs[i].detach().requires_grad_() for i in tensors])
        wrapped = (wrapped,) if isinstance(wrapped, torch.Tensor) else wrapped
        result = list(outputs)
        for i, w in zip(tensors, wrapped):
            result[i] = w
        return result[0] if single else tuple(result)

    return wrapper


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype a matmul-like op computes ``x`` in: the autocast dtype when autocast
    is on for ``x``'s device and would cast ``x`` (float32/16/bf16), else ``None``
    (``x``'s own dtype)."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev) or x.dtype not in SUPPORTED_DTYPES:
        return None
    dtype = torch.get_autocast_dtype(dev)
    return None if dtype == x.dtype else dtype
