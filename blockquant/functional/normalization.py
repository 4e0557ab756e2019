"""Batch and layer normalisation (:func:`~blockquant.functional.batch_norm`,
:func:`~blockquant.functional.layer_norm`): they keep the normalised input ``xn`` compressed
and, in training, an independent unbiased estimate of ``xn ** 2`` for the input gradient
(:class:`SquareSample`, :class:`SideRounding`), and count the bytes of what they keep."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

from blockquant.kernels import native_ops

from .._compat import batch_norm_with_update, custom_op
from ..config import QuantConfig
from .. import packed as _packed
from ..packed import PackedTensor, draw_seed_tensor, seed_value
from .. import save_policy
from ..save_policy import keep_for_ctx, without_projection
from ._common import _check_float, _config, _first_order_only, _untracked


class SquareSample:
    """An unbiased estimate of ``xn ** 2`` (elementwise) from a few exact values of ``xn``.

    ``k`` positions are drawn uniformly with replacement from a seed (regenerated in
    backward, not stored) and only ``xn`` at those positions is kept (float32, ``4 k``
    bytes). The estimate is ``(n / k) * sum over draws hitting i of xn_i ** 2``: its
    expectation is ``xn_i ** 2`` exactly, since each draw hits ``i`` with probability ``1 / n``.
    """

    __slots__ = ("values", "seed", "numel")

    def __init__(self, xn: torch.Tensor, fraction: float):
        flat = xn.detach().reshape(-1)
        self.numel = flat.numel()
        k = max(1, math.ceil(self.numel * fraction))
        self.seed = draw_seed_tensor()
        self.values = flat.index_select(0, self._positions(k, flat.device)).to(torch.float32)

    @classmethod
    def of_affine(cls, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, fraction: float) -> "SquareSample":
        """The sample of ``xn = (x - shift) * scale`` (column-wise, ``x`` ``[rows, C]``) without forming ``xn``:
        the same positions and values as ``SquareSample(xn, fraction)`` for the same seed."""
        self = cls.__new__(cls)
        flat = x.detach().reshape(-1)
        self.numel = flat.numel()
        k = max(1, math.ceil(self.numel * fraction))
        self.seed = draw_seed_tensor()
        idx = self._positions(k, flat.device)
        col = idx % x.shape[-1]
        self.values = ((flat.index_select(0, idx) - shift.index_select(0, col)) * scale.index_select(0, col)).to(
            torch.float32)
        return self

    def _positions(self, k: int, device) -> torch.Tensor:
        return _seeded_positions(self.seed, self.numel, k, device)

    @property
    def nbytes(self) -> int:
        return self.values.untyped_storage().nbytes()

    def storages(self):
        return (self.values,)

    def estimate(self, shape, dtype) -> torch.Tensor:
        k = self.values.numel()
        idx = self._positions(k, self.values.device)
        out = torch.zeros(self.numel, dtype=dtype, device=self.values.device)
        out.index_add_(0, idx, self.values.to(dtype).square())
        return out.mul_(self.numel / k).view(shape)


# a custom op (with a shape-only fake) so that torch.compile keeps the seeded generator out of its graph
@custom_op("blockquant::seeded_positions", mutates_args=())
def _seeded_positions(seed: torch.Tensor, numel: int, k: int, device: torch.device) -> torch.Tensor:
    """``k`` positions in ``[0, numel)`` drawn uniformly with replacement from ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed_value(seed))
    return torch.randint(0, numel, (k,), generator=gen, device=device)


@_seeded_positions.register_fake
def _(seed, numel, k, device):
    return torch.empty(k, dtype=torch.int64, device=device)


def _square_estimator(xn: torch.Tensor, config: QuantConfig, count: int):
    """An unbiased estimator of ``xn ** 2`` for the diagonal term of a normalisation over ``count``
    elements, independent of the main rounding of ``xn``, sized so that its noise stays of the
    order of the main rounding's (the diagonal term is divided by ``count``, the rank-one term by
    about ``sqrt(count)``), whichever of two forms is cheaper:

    * a second independent rounding of ``xn`` with a quarter of the main levels' resolution
      per bit halved: 1 bit for int1/int2, 2 bits for int4, 4 bits for int8 (``side / 8`` B per
      element plus metadata); ``xn_hat * xn_side`` is unbiased for ``xn ** 2``;
    * exact ``xn`` at a seeded fraction ``p = 2 * 4^(bits - 2) / count`` of the elements
      (:class:`SquareSample`, ``4 p`` B per element): cheaper when ``count`` is large, e.g. a
      BatchNorm over many nodes (int2 over 169k nodes: 0.0002 B per element).
    """
    form, param = _square_estimator_form(config, count)
    if form == "sample":
        return SquareSample(xn, param)
    return SideRounding(save_policy.compress(xn, param))


def _square_estimator_form(config: QuantConfig, count: int):
    """Which estimator :func:`_square_estimator` keeps: ``("sample", fraction)`` or
    ``("side", side_config)`` (the one rule, also read by :func:`square_estimator_nbytes`)."""
    side_bits = {1: 1, 2: 1, 4: 2, 8: 4}[config.bits]
    fraction = 2.0 * 4.0 ** (config.bits - 2) / max(count, 1)
    if 4.0 * fraction < side_bits / 8.0:
        return "sample", fraction
    return "side", config.replace(bits=side_bits, levels="uniform", rp_ratio=1)


class SideRounding:
    """The second, independent rounding of ``xn`` that :func:`_square_estimator` keeps for
    small channels / rows (a holder, so that byte accounting can tell it from the main rounding)."""

    __slots__ = ("packed",)

    def __init__(self, packed):
        self.packed = packed

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def storages(self):
        return self.packed.storages()

    def dequantize(self) -> torch.Tensor:
        return self.packed.dequantize()


def square_estimator_nbytes(shape, config: QuantConfig, count: int, packed_nbytes, device="cpu") -> int:
    """Exact bytes of what a normalisation over ``count`` elements keeps, beside ``xn``, for
    the diagonal term of its input gradient (0 under nearest rounding); ``packed_nbytes(shape,
    config)`` is the codec's byte formula. Mirrors :func:`_keep_normalized`."""
    cfg = without_projection(config)
    if cfg.rounding != "stochastic":
        return 0
    form, param = _square_estimator_form(cfg, count)
    total = 0
    for a, b in save_policy.row_blocks(shape, cfg, device):
        piece = (b - a, *shape[1:]) if len(shape) else ()
        if form == "sample":
            total += 4 * max(1, math.ceil(math.prod(piece) * param))
        else:
            total += packed_nbytes(piece, param)
    return total


class _EstimatorChunks:
    """Estimators of ``xn ** 2`` (see :func:`_square_estimator`), one per row block in which a
    normalisation input was compressed (one block for small inputs); each is unbiased on its rows."""

    __slots__ = ("parts", "bounds", "shape", "count")

    def __init__(self, parts, bounds, shape, count):
        self.parts = parts
        self.bounds = bounds
        self.shape = shape  # of the whole normalisation input
        self.count = count  # elements per channel / row (the normalisation's reduction)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def storages(self):
        return tuple(t for p in self.parts for t in p.storages())


def _keep_normalized(ctx, x: torch.Tensor, normalize, config: QuantConfig, diagonal_count: Optional[int],
                     affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """How a normalisation keeps its input (:func:`~blockquant.save_policy.keep_for_ctx`): ``x`` by
    reference when resident (backward recomputes ``xn`` exactly), else :func:`_compressed_normalized`
    (or, given ``affine = (shift, scale)`` with ``xn = (x - shift) * scale`` column-wise and the compiled
    ops available, :func:`_compressed_affine`: the same state, encoded without forming ``xn``).
    Returns ``(tensors to save, state)``; sets ``ctx.bq_ref``."""
    cfg = without_projection(config)
    if affine is not None and _fused_encode_applies(x):
        return keep_for_ctx(ctx, x, config, instead=lambda: _compressed_affine(x, *affine, cfg, diagonal_count))
    return keep_for_ctx(ctx, x, config, instead=lambda: _compressed_normalized(x, normalize, cfg, diagonal_count))


def _fused_encode_applies(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous() and native_ops.enabled(x)


def _pack_affine(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, cfg: QuantConfig) -> PackedTensor:
    """``quantize((x - shift) * scale, cfg)`` (column-wise, float32 ``[rows, C]``, no projection) in one pass
    of the compiled codec: the same seed draw, codes, finiteness check and :class:`PackedTensor`."""
    seed = draw_seed_tensor()
    block = cfg.block_size_for(x.shape[-1])
    levels = _packed._levels_for(cfg.bits, block, cfg.levels == "optimal")
    payload, meta = native_ops.quantize_affine(x, shift, scale, block, cfg.bits, cfg.meta_dtype, levels,
                                               cfg.rounding == "stochastic", seed)
    _packed.check_encoded(meta, x, cfg.meta_dtype)
    return PackedTensor(payload, meta, x.shape, torch.float32, cfg, block, seed)


def _compressed_affine(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, cfg: QuantConfig,
                       diagonal_count: Optional[int]):
    """:func:`_compressed_normalized` for ``xn = (x - shift) * scale`` (a batch norm's), encoded by the
    compiled codec straight from ``x``: the same state, the same seeds drawn in the same order."""
    estimate = diagonal_count is not None and cfg.rounding == "stochastic"
    bounds = save_policy.row_blocks(x.shape, cfg, x.device)
    shift, scale = shift.to(torch.float32).contiguous(), scale.to(torch.float32).contiguous()
    x = x.detach()
    main, side = [], []
    for a, b in bounds:
        rows = x[a:b]
        main.append(_pack_affine(rows, shift, scale, cfg))
        if estimate:
            form, param = _square_estimator_form(cfg, diagonal_count)
            side.append(SquareSample.of_affine(rows, shift, scale, param) if form == "sample"
                        else SideRounding(_pack_affine(rows, shift, scale, param)))
    state = (main[0] if len(bounds) == 1 else save_policy.RowChunks(main, bounds, x.shape, torch.float32, x.device),)
    if estimate:
        state = state + (_EstimatorChunks(side, bounds, tuple(x.shape), diagonal_count),)
    return state


def _compressed_normalized(x: torch.Tensor, normalize, cfg: QuantConfig, diagonal_count: Optional[int]):
    """``xn = normalize(rows)`` compressed and, when ``diagonal_count`` is given (the input gradient
    in training is needed), an independent estimator of ``xn ** 2`` for the diagonal term
    (:func:`_square_estimator`). A large 2-D input is normalised and compressed one row block at a
    time (``normalize`` takes a slice of rows), so no full-size ``xn`` is ever formed."""
    estimate = diagonal_count is not None and cfg.rounding == "stochastic"
    bounds = save_policy.row_blocks(x.shape, cfg, x.device)
    if len(bounds) == 1:
        xn = normalize(slice(None))
        state = (save_policy.compress(xn, cfg),)
        if estimate:
            state = state + (_EstimatorChunks([_square_estimator(xn, cfg, diagonal_count)], bounds,
                                              tuple(x.shape), diagonal_count),)
        return state
    main, side = [], []
    for a, b in bounds:
        xn = normalize(slice(a, b))
        main.append(save_policy.compress_whole(xn, cfg))
        if estimate:
            side.append(_square_estimator(xn, cfg, diagonal_count))
    state = (save_policy.RowChunks(main, bounds, x.shape, xn.dtype, x.device),)
    if estimate:
        state = state + (_EstimatorChunks(side, bounds, tuple(x.shape), diagonal_count),)
    return state


def _add_diagonal_term_(gw: torch.Tensor, xn: torch.Tensor, estimator, count: int) -> None:
    """``gw *= 1 + (xn ** 2 - S) / count`` in place, ``S`` the independent unbiased estimate
    of ``xn ** 2`` that ``estimator`` keeps (see :func:`_normalization_backward`)."""
    if isinstance(estimator, _EstimatorChunks):
        for (a, b), part in zip(estimator.bounds, estimator.parts):
            _add_diagonal_term_(gw[a:b], xn[a:b], part, count)
    elif isinstance(estimator, SquareSample):
        # gw * (1 + xn^2 / count) everywhere, minus gw_i S_i / count where S is non-zero (k positions)
        k = estimator.values.numel()
        idx = estimator._positions(k, gw.device)
        sampled = gw.reshape(-1).index_select(0, idx).mul_(estimator.values.to(gw.dtype).square())
        sampled.mul_(estimator.numel / k / count)
        gw.mul_(xn.square().div_(count).add_(1.0))
        gw.view(-1).index_add_(0, idx, sampled, alpha=-1.0)
    else:
        # S = xn_hat * side_hat (independent roundings): 1 + (xn^2 - S) / count = 1 + xn (xn - side) / count
        factor = torch.sub(xn, estimator.dequantize().to(gw.dtype)).mul_(xn)  # never in place on a decoded tensor
        gw.mul_(factor.div_(count).add_(1.0))


def _normalization_backward(g, xn, estimator, weight_view, invstd_view, dims, count, training, need_x):
    """grad_x of ``y = xn * w + b`` with ``xn = (x - mean) * invstd`` (batch statistics in training).

    In training, ``grad_x = invstd * (gw - mean(gw) - xn_i * mean_j(gw_j xn_j))`` with
    ``gw = g * w``. The last term is quadratic in ``xn``: when ``xn`` is a stochastically
    rounded estimate, the ``j = i`` part multiplies a rounded value by itself and is biased by
    ``gw_i Var(xn_i) / count``. It is replaced by ``gw_i S_i / count``, where ``S`` is an
    independent unbiased estimate of ``xn_i ** 2`` kept by ``estimator`` (see
    :func:`_square_estimator`); every other product is one of independent roundings, so the
    gradient is unbiased. ``estimator=None``: ``xn`` is exact, or rounded deterministically.

    Memory: works in place on ``gw``; besides ``g``, ``xn`` and the result it holds one
    more tensor of ``xn``'s size at a time.
    """
    if not need_x:
        return None
    gw = g * weight_view if weight_view is not None else g.clone()
    if not training:  # running statistics are constants: grad_x = g * w * invstd
        return gw.mul_(invstd_view)
    gw_mean = gw.mean(dims, keepdim=True)
    c = (gw * xn).sum(dims, keepdim=True).div_(count)
    if estimator is not None:
        _add_diagonal_term_(gw, xn, estimator, count)
    return gw.sub_(gw_mean).addcmul_(xn, c, value=-1.0).mul_(invstd_view)


class _BatchNorm(torch.autograd.Function):
    """Batch normalisation over dim 1 (exact forward; running statistics
    updated exactly as ``torch.nn.functional.batch_norm`` does).

    Backward needs the normalised input ``xn = (x - mean) * invstd``: linearly
    for the weight gradient (``sum g xn``) and, in training, for the input
    gradient through ``xn_i * mean_j(g_j w xn_j)``, which is *quadratic* in
    ``xn`` (see :func:`_normalization_backward`).

    Saves (only what the requested gradients need):
      * ``xn`` compressed with the config, no projection (``bits / 8`` B per
        element plus block metadata), if the weight gradient, or the input
        gradient in training mode, is needed;
      * in training, for the input gradient, an independent estimate of
        ``xn ** 2`` (:func:`_square_estimator`; ``M`` = elements per channel:
        an independent rounding of ``xn`` at 1 bit for int2, 2 bits for int4,
        4 bits for int8 when ``M`` is small, else exact ``xn`` at a seeded
        ``2 * 4^(bits-2) / M`` of the elements, about 0 B over many nodes;
        stochastic configs only), which makes the quadratic term unbiased;
      * the mean and inverse std used (``[C]`` each: the batch statistics in
        training, the running ones in eval) and the weight, by reference.

    When ``x`` is resident it is saved by reference instead and ``xn`` is
    recomputed exactly. Every gradient is then unbiased; none is exact unless
    ``x`` is resident.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, config):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if training and running_mean is not None:
            out, save_mean, save_invstd = batch_norm_with_update(x, weight, bias, running_mean, running_var,
                                                                 momentum, eps)
        else:
            out, save_mean, save_invstd = torch.native_batch_norm(
                x, weight, bias, running_mean, running_var, training, momentum, eps)
        acc = torch.promote_types(x.dtype, torch.float32)
        if not training:
            save_mean = running_mean.to(acc)
            save_invstd = torch.rsqrt(running_var.to(acc) + eps)
        ctx.bq_training = training
        ctx.bq_has = (weight is not None, bias is not None)
        ctx.bq_c = x.shape[1]
        need_input = bool(need_w or (need_x and training))
        ctx.bq_need_input = need_input
        ctx.bq_ref = False
        state: Tuple[object, ...] = ()
        tensors: List[torch.Tensor] = []
        if need_input and x.numel() > 0:
            view = [1] * x.dim()
            view[1] = -1
            mean_v, invstd_v = save_mean.view(view), save_invstd.view(view)
            count = x.numel() // max(x.shape[1], 1)
            tensors, state = _keep_normalized(ctx, x, lambda r: (x.detach()[r].to(acc) - mean_v) * invstd_v,
                                              config, count if (need_x and training) else None,
                                              affine=(save_mean, save_invstd) if x.dim() == 2 else None)
        tensors.extend((save_mean.to(acc), save_invstd.to(acc)))
        tensors.append(weight if weight is not None else x.new_empty(0))
        ctx.save_for_backward(*tensors)
        ctx.bq_state = state
        return out

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        has_w, has_b = ctx.bq_has
        saved = list(ctx.saved_tensors)
        x_ref = saved.pop(0) if ctx.bq_ref else None
        mean, invstd, weight = saved
        if (ctx.bq_need_input and x_ref is None and ctx.bq_training and grad_out.numel() > 0
                and _fused_backward_applies(ctx.bq_state, grad_out)):
            grad_x, grad_w, grad_b = _fused_batch_norm_backward(grad_out, ctx.bq_state, weight if has_w else None,
                                                                invstd, need_x, need_w and has_w, need_b and has_b)
            return grad_x, grad_w, grad_b, None, None, None, None, None, None
        dims = [d for d in range(grad_out.dim()) if d != 1]
        grad_b = grad_out.sum(dims) if (need_b and has_b) else None
        if grad_out.numel() == 0:
            return (torch.zeros_like(grad_out) if need_x else None,
                    torch.zeros_like(weight) if (need_w and has_w) else None,
                    grad_b, None, None, None, None, None, None)
        acc = mean.dtype
        view = [1] * grad_out.dim()
        view[1] = -1
        g = grad_out.to(acc)
        xn = estimator = None
        if ctx.bq_need_input:
            if x_ref is not None:
                xn = (x_ref.to(acc) - mean.view(view)) * invstd.view(view)
            else:
                xn = ctx.bq_state[0].dequantize().to(acc)
                estimator = ctx.bq_state[1] if len(ctx.bq_state) > 1 else None
        w_view = weight.to(acc).view(view) if has_w else None
        count = grad_out.numel() // max(ctx.bq_c, 1)
        grad_x = _normalization_backward(g, xn, estimator, w_view, invstd.view(view), dims, count, ctx.bq_training,
                                         need_x)
        grad_w = (g * xn).sum(dims).reshape(weight.shape).to(weight.dtype) if (need_w and has_w) else None
        grad_x = grad_x.to(grad_out.dtype) if grad_x is not None else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _compressed_parts(kept):
    """``(row_start, row_stop, PackedTensor)`` of a compressed ``xn``, or None if a part is not a plain
    (unprojected, float32) packed tensor."""
    parts = list(kept.chunks()) if isinstance(kept, save_policy.RowChunks) else (
        [(0, kept.shape[0], kept)] if isinstance(kept, PackedTensor) else None)
    if parts is None or any(p.proj_dims is not None or p.dtype != torch.float32 or len(p.shape) != 2
                            for _, _, p in parts):
        return None
    return parts


def _fused_backward_applies(state, grad_out: torch.Tensor) -> bool:
    if grad_out.dim() != 2 or grad_out.dtype != torch.float32 or not native_ops.enabled(grad_out):
        return False
    if _compressed_parts(state[0]) is None:
        return False
    if len(state) > 1:
        est = state[1]
        return isinstance(est, _EstimatorChunks) and all(isinstance(p, SquareSample) for p in est.parts)
    return True


def _fused_batch_norm_backward(grad_out, state, weight, invstd, need_x: bool, need_w: bool, need_b: bool):
    """Batch normalisation's backward in training (:func:`_normalization_backward`'s formula, the diagonal
    term from the :class:`SquareSample` estimator) over the compressed ``xn``, decoded block by block
    inside two passes of the compiled ops: no decoded ``[N, C]`` ``xn`` is formed."""
    g = grad_out.contiguous()
    parts = _compressed_parts(state[0])
    count, cols = g.shape[0], g.shape[1]
    sum_g = torch.zeros(cols, dtype=torch.float64, device=g.device)
    sum_gx = torch.zeros(cols, dtype=torch.float64, device=g.device)
    for a, b, part in parts:
        levels = _packed._levels_for(part.bits, part.block, part.config.levels == "optimal")
        sg, sx = native_ops.bn_backward(g[a:b], part.payload, part.meta, part.block, part.bits, levels)
        sum_g += sg
        sum_gx += sx
    grad_w = sum_gx.to(weight.dtype) if need_w else None
    grad_b = sum_g.to(grad_out.dtype) if need_b else None
    if not need_x:
        return None, grad_w, grad_b
    scale = invstd.to(torch.float32) * (weight.to(torch.float32) if weight is not None else 1.0)
    means = ((sum_g / count).to(torch.float32), (sum_gx / count).to(torch.float32))
    estimator = state[1] if len(state) > 1 else None
    samples = estimator.parts if estimator is not None else [None] * len(parts)
    grad_x = torch.empty_like(g)
    for (a, b, part), sample in zip(parts, samples):
        levels = _packed._levels_for(part.bits, part.block, part.config.levels == "optimal")
        native_ops.bn_backward(g[a:b], part.payload, part.meta, part.block, part.bits, levels, scale, count,
                               estimator is not None, sums=means, out=grad_x[a:b])
        if sample is not None:  # the diagonal term's exact part at the sampled positions
            k = sample.values.numel()
            idx = sample._positions(k, g.device)
            col = idx % cols
            corr = g[a:b].reshape(-1).index_select(0, idx).mul_(scale.index_select(0, col))
            corr.mul_(sample.values.square()).mul_(sample.numel / k / count)
            grad_x[a:b].view(-1).index_add_(0, idx, corr, alpha=-1.0)
    return grad_x, grad_w, grad_b


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, config: Optional[QuantConfig] = None) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` (same argument order) whose saved input is compressed.

    Saved for backward (only what the requested gradients need): the normalised input compressed without projection,
    0.504 B per element at the default config; in training, an independent unbiased estimate of its square for the input
    gradient (a 2-bit rounding at the default config, 0.25 B per element plus metadata, or an exact sample of a few
    elements per channel when channels are long: about 0 B per element); mean and inverse std (``[C]``) and the weight
    by reference. ``config`` takes a :class:`QuantConfig` or a preset name."""
    config = _config(config, "batch_norm")
    _check_float(x, "batch_norm")
    if x.dim() < 2:
        raise ValueError(f"blockquant.functional.batch_norm expects x of shape [N, C] or [N, C, L]; "
                         f"got {tuple(x.shape)}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("blockquant.functional.batch_norm: training=False needs running_mean and running_var")
    if training:
        reduce_size = x.numel() // max(x.shape[1], 1)
        if reduce_size == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    momentum = 0.0 if momentum is None else float(momentum)
    if _untracked(x, weight, bias):
        return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, bool(training),
                                              momentum, float(eps))
    return _BatchNorm.apply(x, weight, bias, running_mean, running_var, bool(training), momentum, float(eps),
                            config)


class _LayerNorm(torch.autograd.Function):
    """Layer normalisation over the trailing ``normalized_shape`` dims (exact forward).

    Keeps the normalised input ``xn = (x - mean) * rstd`` exactly as
    :class:`_BatchNorm` does, with the statistics of each row: ``xn``
    compressed (no projection) if the input or weight gradient is needed, an
    independent estimate of ``xn ** 2`` (:func:`_square_estimator` over the
    ``D`` elements of a row; for rows of a few hundred elements a rounding of
    ``xn`` at 1 / 2 / 4 bits for int2 / int4 / int8) if the
    input gradient is needed (the row-wise rank-one term of the input gradient
    is quadratic in ``xn``; see :func:`_normalization_backward`), the per-row mean and reciprocal std
    (``[..., 1]`` each) and the weight by reference. A resident ``x`` is saved
    by reference instead. Every gradient is unbiased.
    """

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, config):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]  # the bias gradient needs nothing saved
        out, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.bq_shape_norm = normalized_shape
        ctx.bq_has = (weight is not None, bias is not None)
        need_input = bool(need_x or need_w)
        ctx.bq_need_input = need_input
        ctx.bq_ref = False
        state: Tuple[object, ...] = ()
        tensors: List[torch.Tensor] = []
        if need_input:
            acc = torch.promote_types(x.dtype, torch.float32)
            mean, rstd = mean.to(acc), rstd.to(acc)
            if x.numel() > 0:
                count = math.prod(normalized_shape)
                tensors, state = _keep_normalized(ctx, x, lambda r: (x.detach()[r].to(acc) - mean[r]) * rstd[r],
                                                  config, count if need_x else None)
            tensors.extend((mean, rstd))
        tensors.append(weight if weight is not None else x.new_empty(0))
        tensors.append(bias if bias is not None else x.new_empty(0))
        ctx.save_for_backward(*tensors)
        ctx.bq_state = state
        return out

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out):
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        has_w, has_b = ctx.bq_has
        saved = list(ctx.saved_tensors)
        k = len(ctx.bq_shape_norm)
        lead = list(range(grad_out.dim() - k))
        rows = list(range(grad_out.dim() - k, grad_out.dim()))
        grad_b = grad_out.sum(lead) if (need_b and has_b) else None
        if not ctx.bq_need_input:  # only the bias gradient
            return None, None, None, grad_b, None, None
        x_ref = saved.pop(0) if ctx.bq_ref else None
        mean, rstd, weight, bias = saved
        if grad_out.numel() == 0:
            return (torch.zeros_like(grad_out) if need_x else None, None,
                    torch.zeros_like(weight) if (need_w and has_w) else None,
                    torch.zeros_like(bias) if (need_b and has_b) else None, None, None)
        acc = mean.dtype
        g = grad_out.to(acc)
        estimator = None
        if x_ref is not None:
            xn = (x_ref.to(acc) - mean) * rstd
        else:
            xn = ctx.bq_state[0].dequantize().to(acc)
            estimator = ctx.bq_state[1] if len(ctx.bq_state) > 1 else None
        count = math.prod(ctx.bq_shape_norm)
        grad_x = _normalization_backward(g, xn, estimator, weight.to(acc) if has_w else None, rstd, rows, count, True,
                                         need_x)
        grad_w = (g * xn).sum(lead).reshape(weight.shape).to(weight.dtype) if (need_w and has_w) else None
        grad_x = grad_x.to(grad_out.dtype) if grad_x is not None else None
        return grad_x, None, grad_w, grad_b, None, None


def layer_norm(x, normalized_shape: Union[int, Sequence[int]], weight=None, bias=None, eps: float = 1e-5,
               config: Optional[QuantConfig] = None) -> torch.Tensor:
    """``torch.nn.functional.layer_norm`` whose saved input is compressed.

    Saved for backward: as :func:`batch_norm`, over the normalised dimensions: the normalised input compressed (0.504 B
    per element at the default config), the square estimate for the input gradient, mean and inverse std per row and the
    weight by reference. ``config`` takes a :class:`QuantConfig` or a preset name."""
    config = _config(config, "layer_norm")
    _check_float(x, "layer_norm")
    shape = (int(normalized_shape),) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)
    if tuple(x.shape[x.dim() - len(shape):]) != shape or len(shape) > x.dim():
        raise ValueError(f"blockquant.functional.layer_norm: x's trailing dims must equal normalized_shape "
                         f"{list(shape)}; got x of shape {tuple(x.shape)}")
    if _untracked(x, weight, bias):
        return torch.nn.functional.layer_norm(x, shape, weight, bias, float(eps))
    return _LayerNorm.apply(x, list(shape), weight, bias, float(eps), config)
