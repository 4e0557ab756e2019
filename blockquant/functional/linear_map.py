"""The dense linear map ``y = x W^T + b`` (:func:`~blockquant.functional.linear`): it keeps ``x`` for the
weight gradient (by reference when resident, else compressed) and the weight for the input gradient."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..config import QuantConfig
from ..save_policy import keep_for_ctx
from ._common import _autocast_dtype, _check_float, _config, _first_order_only, _untracked


def _keep_linear_operands(ctx, x: torch.Tensor, weight: torch.Tensor, config: QuantConfig, need_x: bool,
                          need_w: bool) -> List[torch.Tensor]:
    """What a product with ``weight`` keeps: ``x`` for the weight gradient (through :func:`keep_for_ctx`:
    by reference when resident, else compressed into ``ctx.bq_state``) and ``weight`` for the input
    gradient. Returns the tensors for ``ctx.save_for_backward`` (``x`` first when kept by reference)."""
    to_save: List[torch.Tensor] = []
    state: Tuple[object, ...] = ()
    ctx.bq_ref = False
    if need_w:
        to_save, state = keep_for_ctx(ctx, x, config, dtype=_autocast_dtype(x))
    if need_x:
        to_save.append(weight)
    ctx.bq_state = state
    return to_save


class _Linear(torch.autograd.Function):
    """``y = x W^T + b`` (exact forward).

    Saves, only if the weight gradient is needed: ``x`` compressed with the
    config (random projection included; backward forms ``g^T x_hat`` with
    :meth:`~blockquant.PackedTensor.left_matmul`, which never decodes a
    projected ``x`` to full width), or ``x`` by reference if it is resident.
    Saves ``W`` by reference only if the input gradient is needed
    (``grad_x = g W`` is exact). The bias gradient needs nothing.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, config):
        out = torch.nn.functional.linear(x, weight, bias)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.bq_in_dim = x.shape[-1]
        ctx.bq_x_shape = x.shape
        ctx.bq_has_bias = bias is not None
        ctx.save_for_backward(*_keep_linear_operands(ctx, x, weight, config, need_x, need_w))
        return out

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        saved = list(ctx.saved_tensors)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if need_w:
            if ctx.bq_ref:
                x = saved.pop(0)
                grad_w = g2.t().mm(x.reshape(-1, ctx.bq_in_dim).to(g2.dtype))
            else:
                grad_w = ctx.bq_state[0].left_matmul(g2.t())
        if need_x:
            weight = saved.pop(0)
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)).reshape(ctx.bq_x_shape)
        if need_b and ctx.bq_has_bias:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           config: Optional[QuantConfig] = None) -> torch.Tensor:
    """``torch.nn.functional.linear`` whose saved input is compressed.

    Args:
        x: ``[..., in_features]`` floating tensor.
        weight: ``[out_features, in_features]``.
        bias: optional ``[out_features]``.
        config: :class:`QuantConfig` or preset name (default: the ``"default"`` preset).

    Saved for backward (only what the requested gradients need):
      * ``x`` compressed, at the default config (4 bits, 1024-element blocks, bf16 metadata): 0.504 B per element
        (a projected copy when ``config.rp_ratio > 1``), for the weight gradient; by reference, 0 B,
        when ``x`` is resident (:func:`is_resident`);
      * ``weight`` by reference (0 B extra), for the input gradient; the bias gradient needs nothing.
    """
    config = _config(config, "linear")
    _check_float(x, "linear")
    _check_float(weight, "linear", "weight")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"blockquant.functional.linear: x's last dimension must equal weight.shape[1] "
                         f"(in_features); got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if _untracked(x, weight, bias):
        return torch.nn.functional.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias, config)
