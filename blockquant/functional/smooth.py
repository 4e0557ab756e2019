"""Smooth activations (:func:`~blockquant.functional.elu`, :func:`~blockquant.functional.gelu`): backward
is linear in the local derivative ``f'(x)``, not in ``x``, so they keep ``f'(x)`` computed exactly in forward
and compressed (or ``x`` by reference when resident)."""
from __future__ import annotations

from typing import Optional

import torch

from ..config import QuantConfig
from .. import save_policy
from ..save_policy import keep_for_ctx, without_projection
from ._common import _check_float, _config, _first_order_only, _untracked


_SMOOTH_FORWARD = {
    "elu": lambda x, alpha: torch.nn.functional.elu(x, alpha),
    "gelu": lambda x, approximate: torch.nn.functional.gelu(x, approximate=approximate),
    "sigmoid": lambda x, _: torch.sigmoid(x),
    "tanh": lambda x, _: torch.tanh(x),
}


def _smooth_derivative(x: torch.Tensor, kind: str, param) -> torch.Tensor:
    """``f'(x)`` of ELU (``param`` = alpha), GELU (``param`` = approximate), sigmoid or tanh, by the ATen
    backward kernels."""
    ones = torch.ones_like(x)
    if kind == "elu":
        return torch.ops.aten.elu_backward(ones, param, 1, 1, False, x)
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(ones, x, approximate=param)
    if kind == "sigmoid":
        return torch.ops.aten.sigmoid_backward(ones, torch.sigmoid(x))
    return torch.ops.aten.tanh_backward(ones, torch.tanh(x))


class _Smooth(torch.autograd.Function):
    """ELU / GELU / sigmoid / tanh (exact forward).

    Backward is ``grad_x = g * f'(x)``: linear in the local derivative ``f'(x)``,
    not in ``x``. So forward computes ``f'(x)`` exactly and saves *it*
    compressed without projection (same bytes as the input: ``bits / 8`` per
    element plus block metadata); backward multiplies by the dequantized
    derivative, which is unbiased. (Saving ``x`` and evaluating ``f'`` on a
    rounded ``x`` would be biased: ``E[f'(x_hat)] != f'(x)`` for a curved
    ``f'``.) When ``x`` is resident it is saved by reference instead and the
    derivative is computed exactly in backward. Saves nothing unless the input
    gradient is needed.
    """

    @staticmethod
    def forward(ctx, x, kind, param, config):
        out = _SMOOTH_FORWARD[kind](x, param)
        ctx.bq_kind, ctx.bq_param = kind, param
        ctx.bq_state = ()
        ctx.bq_ref = False
        if ctx.needs_input_grad[0]:
            to_save, ctx.bq_state = keep_for_ctx(ctx, x, config, instead=lambda: save_policy.compress(
                _smooth_derivative(x.detach(), kind, param), without_projection(config)))
            ctx.save_for_backward(*to_save)
        return out

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if ctx.bq_ref:
            derivative = _smooth_derivative(ctx.saved_tensors[0].to(grad_out.dtype), ctx.bq_kind, ctx.bq_param)
        else:
            derivative = ctx.bq_state[0].dequantize().to(grad_out.dtype)
        return grad_out * derivative, None, None, None


def elu(x: torch.Tensor, alpha: float = 1.0, config: Optional[QuantConfig] = None) -> torch.Tensor:
    """``torch.nn.functional.elu`` whose saved derivative is compressed.

    Saved for backward: ``elu'(x)``, computed exactly in forward and compressed without projection (0.504 B per element
    at the default config); ``x`` by reference (0 B) instead when it is resident. ``config`` takes a
    :class:`QuantConfig` or a preset name."""
    config = _config(config, "elu")
    _check_float(x, "elu")
    if _untracked(x):
        return torch.nn.functional.elu(x, float(alpha))
    return _Smooth.apply(x, "elu", float(alpha), config)


def gelu(x: torch.Tensor, approximate: str = "none", config: Optional[QuantConfig] = None) -> torch.Tensor:
    """``torch.nn.functional.gelu`` whose saved derivative is compressed.

    Saved for backward: ``gelu'(x)``, computed exactly in forward and compressed without projection (0.504 B per element
    at the default config); ``x`` by reference (0 B) instead when it is resident. ``config`` takes a
    :class:`QuantConfig` or a preset name."""
    config = _config(config, "gelu")
    _check_float(x, "gelu")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh'; got {approximate!r}")
    if _untracked(x):
        return torch.nn.functional.gelu(x, approximate=approximate)
    return _Smooth.apply(x, "gelu", approximate, config)


def sigmoid(x: torch.Tensor, config: Optional[QuantConfig] = None) -> torch.Tensor:
    """``torch.sigmoid`` whose saved derivative is compressed (torch saves the output exactly: its
    backward ``g * y * (1 - y)`` is not linear in ``y``).

    Saved for backward: ``sigmoid'(x)``, computed exactly in forward and compressed without projection (0.504 B per
    element at the default config); ``x`` by reference (0 B) instead when it is resident."""
    config = _config(config, "sigmoid")
    _check_float(x, "sigmoid")
    if _untracked(x):
        return torch.sigmoid(x)
    return _Smooth.apply(x, "sigmoid", None, config)


def tanh(x: torch.Tensor, config: Optional[QuantConfig] = None) -> torch.Tensor:
    """``torch.tanh`` whose saved derivative is compressed (torch saves the output exactly: its
    backward ``g * (1 - y ** 2)`` is not linear in ``y``).

    Saved for backward: ``tanh'(x)``, computed exactly in forward and compressed without projection (0.504 B per
    element at the default config); ``x`` by reference (0 B) instead when it is resident."""
    config = _config(config, "tanh")
    _check_float(x, "tanh")
    if _untracked(x):
        return torch.tanh(x)
    return _Smooth.apply(x, "tanh", None, config)
