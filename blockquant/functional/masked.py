"""Ops whose backward is a mask: ReLU and LeakyReLU (:func:`~blockquant.functional.relu`,
:func:`~blockquant.functional.leaky_relu`) keep a 1-bit sign mask, dropout
(:func:`~blockquant.functional.dropout`) keeps only its seed and regenerates the mask in backward
(the ``blockquant::dropout_noise`` and ``blockquant::seeded_dropout`` custom ops)."""
from __future__ import annotations

from typing import List, Union

import torch

from blockquant.kernels import native_ops
from blockquant.kernels.bitmask import BitMask

from .._compat import custom_op
from ..packed import draw_seed_tensor, seed_value
from ._common import _check_float, _untracked


class _MaskedActivation(torch.autograd.Function):
    """ReLU / LeakyReLU (exact forward). Saves ``x > 0`` as a packed 1-bit
    :class:`BitMask` (``ceil(n / 8)`` bytes), only if the input gradient is needed.
    On CPU with the compiled ops (:mod:`blockquant.kernels.native_ops`) the activation and its
    mask are one pass, and so is the masked gradient."""

    @staticmethod
    def forward(ctx, x, negative_slope):
        ctx.bq_slope = negative_slope
        if ctx.needs_input_grad[0] and native_ops.enabled(x):
            out, bits = native_ops.relu_pack(x, negative_slope)
            ctx.bq_state = (BitMask(bits, x.shape),)
            return out
        if negative_slope is None:
            out = torch.relu(x)
        else:
            out = torch.nn.functional.leaky_relu(x, negative_slope)
        ctx.bq_state = (BitMask.pack(x > 0),) if ctx.needs_input_grad[0] else ()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None
        mask = ctx.bq_state[0]
        if native_ops.enabled(grad_out) and grad_out.shape == mask.shape:
            return native_ops.mask_grad(grad_out, mask.payload, ctx.bq_slope), None
        positive = mask.unpack()
        if ctx.bq_slope is None:
            grad = grad_out * positive.to(grad_out.dtype)
        else:
            scale = torch.where(positive, grad_out.new_ones(()), grad_out.new_full((), ctx.bq_slope))
            grad = grad_out * scale
        return grad, None


def relu(x: torch.Tensor) -> torch.Tensor:
    """``torch.relu`` storing a 1-bit mask for backward.

    Saved for backward: the sign mask ``x > 0``, 1 bit (0.125 B) per element, whatever the config."""
    _check_float(x, "relu")
    if _untracked(x):
        return torch.relu(x)
    return _MaskedActivation.apply(x, None)


def leaky_relu(x: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    """``torch.nn.functional.leaky_relu`` storing a 1-bit mask for backward.

    Saved for backward: the sign mask ``x > 0``, 1 bit (0.125 B) per element, whatever the config."""
    _check_float(x, "leaky_relu")
    if _untracked(x):
        return torch.nn.functional.leaky_relu(x, float(negative_slope))
    return _MaskedActivation.apply(x, float(negative_slope))


# ----------------------------------------------------------------------------
# dropout: the seed only
# ----------------------------------------------------------------------------

def _dropout_noise(like: torch.Tensor, p: float, seed: Union[int, torch.Tensor]) -> torch.Tensor:
    """Scaled keep-mask ``bernoulli(1 - p) / (1 - p)``, regenerated identically from ``seed``."""
    seed = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)
    return _dropout_noise_op(seed, list(like.shape), like.dtype, like.device, float(p))


# a custom op (with a shape-only fake) so that torch.compile keeps the seeded generator out of its graph
@custom_op("blockquant::dropout_noise", mutates_args=())
def _dropout_noise_op(seed: torch.Tensor, shape: List[int], dtype: torch.dtype, device: torch.device,
                      p: float) -> torch.Tensor:
    noise = torch.empty(shape, dtype=dtype, device=device)
    if p == 1.0:
        return noise.zero_()
    if native_ops.enabled(noise):  # a hash of (seed, index): one pass, no generator state
        return native_ops.dropout(None, p, seed, like=noise)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed_value(seed))
    noise.bernoulli_(1.0 - p, generator=gen)
    return noise.div_(1.0 - p)


@_dropout_noise_op.register_fake
def _(seed, shape, dtype, device, p):
    return torch.empty(shape, dtype=dtype, device=device)


@custom_op("blockquant::seeded_dropout", mutates_args=())
def _seeded_dropout(t: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``t`` times the keep-mask of ``seed``: the forward on ``x`` and the backward on ``grad_out``.
    One op for both, so that a compiled graph cannot merge the two mask draws into one
    saved mask (its common-subexpression pass would for two identical noise calls).
    On CPU with the compiled ops the mask is drawn and applied in one pass."""
    if p < 1.0 and native_ops.enabled(t):
        return native_ops.dropout(t, float(p), seed)
    return t * _dropout_noise_op(seed, list(t.shape), t.dtype, t.device, float(p))


@_seeded_dropout.register_fake
def _(t, seed, p):
    return torch.empty_like(t)


class _Dropout(torch.autograd.Function):
    """Dropout that saves one seed (a 0-d int64 CPU tensor, 8 bytes); backward
    regenerates the mask with the same generator type on the same device."""

    @staticmethod
    def forward(ctx, x, p):
        seed = draw_seed_tensor("dropout")
        ctx.bq_seed = seed
        ctx.bq_p = p
        ctx.bq_state = ()
        return _seeded_dropout(x, seed, p)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None
        return _seeded_dropout(grad_out, ctx.bq_seed, ctx.bq_p), None


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """Dropout with the same drop probability and ``1 / (1 - p)`` scaling as
    ``torch.nn.functional.dropout``, but its own RNG stream (seeded from
    PyTorch's default generator, so ``torch.manual_seed`` reproduces it; inside a
    converted model's forward, from that forward's seed stream: :mod:`blockquant.seeds`),
    also when no gradient is recorded.

    Saved for backward: the seed only (0 B per element); backward regenerates the mask."""
    _check_float(x, "dropout")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1]; got {p}")
    if not training:
        return x
    if _untracked(x):  # no graph: nothing to save, but the mask still comes from blockquant's stream
        return _seeded_dropout(x, draw_seed_tensor("dropout"), p)
    return _Dropout.apply(x, p)
