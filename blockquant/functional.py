"""Autograd operations that keep compressed tensors for backward.

Every forward here is computed exactly (it calls the same ATen op as
``torch.nn.functional``, so outputs are bit-identical); only what is *saved*
for backward changes. Each Function's docstring lists what it saves, and it
saves nothing a requested gradient does not need (``ctx.needs_input_grad``).

Memory accounting convention (read by :func:`blockquant.track_saved`): a
Function keeps its compressed state in ``ctx.bq_state``, a tuple of objects
that are tensors or have ``.storages()`` (:class:`~blockquant.PackedTensor`,
:class:`~blockquant.kernels.bitmask.BitMask`); plain tensors that are resident
anyway (parameters, the input features) go through ``ctx.save_for_backward``.

Resident inputs: a tensor with no ``grad_fn`` (a leaf such as ``data.x`` or a
parameter) is held by its owner for the whole step, so it is saved by
reference; compressing it would *add* memory.

Sharing: when one tensor feeds several compressing ops (SAGE's ``x`` feeds
the aggregation and ``lin_r``), it is compressed once per (tensor, version,
config); see :func:`compress_shared`.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.weak import WeakIdKeyDictionary

from blockquant.kernels.bitmask import BitMask

from .adjacency import Adjacency, as_adjacency
from .config import QuantConfig
from .packed import SUPPORTED_DTYPES, PackedTensor, draw_seed, quantize

__all__ = [
    "linear", "aggregate", "relu", "leaky_relu", "dropout", "batch_norm", "layer_norm", "elu", "gelu",
    "compress_shared", "is_resident", "mark_resident", "BitMask",
]

# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

# tensor -> {(version, config): PackedTensor}. Weak on the tensor: an entry goes
# away with its tensor, so nothing here outlives the activation it describes.
_SHARED: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def _config(config: Optional[QuantConfig], op: str) -> QuantConfig:
    if config is None:
        return QuantConfig.preset("default")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"blockquant.functional.{op} expects config to be a QuantConfig or None; "
                        f"got {type(config).__name__}")
    return config


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


_RESIDENT: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def mark_resident(*tensors: torch.Tensor) -> None:
    """Declare tensors that stay alive anyway (the graph's features, say), so compressed
    ops save them by reference instead of storing a compressed copy.

    :func:`blockquant.convert` marks every tensor passed to the converted model's
    ``forward`` automatically. Marks vanish with the tensors (weak references).
    """
    for t in tensors:
        if isinstance(t, torch.Tensor):
            _RESIDENT[t] = True


def _held_anyway(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad) or t in _RESIDENT


def is_resident(t: torch.Tensor) -> bool:
    """True when saving ``t`` by reference costs nothing extra: it is a parameter, a
    leaf that requires grad (held by the caller), a tensor marked with
    :func:`mark_resident`, or a view of one of those (e.g. ``weight.t()``).

    A tensor without ``grad_fn`` is not enough: ``dropout(data.x)`` or an
    aggregation of ``data.x`` has none either, yet it is a fresh intermediate
    that only the graph would keep alive. Guessing wrong that way would keep a
    full-precision copy; guessing wrong the other way only compresses a tensor
    that was resident, which costs a few percent of its size.
    """
    if _held_anyway(t):
        return True
    base = t._base
    return base is not None and _held_anyway(base)


class _Float64Packed:
    """float64 tensors are compressed through float32 (the codec's widest input)."""

    __slots__ = ("inner",)

    def __init__(self, inner: PackedTensor):
        self.inner = inner

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    def storages(self):
        return self.inner.storages()

    def dequantize(self) -> torch.Tensor:
        return self.inner.dequantize().to(torch.float64)

    def dequantize_stored(self) -> torch.Tensor:
        return self.inner.dequantize_stored().to(torch.float64)

    @property
    def proj_dims(self):
        return self.inner.proj_dims

    def projection(self, dtype=None) -> torch.Tensor:
        return self.inner.projection(dtype)


def _compress(x: torch.Tensor, config: QuantConfig):
    if x.dtype in SUPPORTED_DTYPES:
        return quantize(x.detach(), config)
    if x.dtype == torch.float64:
        return _Float64Packed(quantize(x.detach().to(torch.float32), config))
    raise TypeError(f"cannot compress a tensor of dtype {x.dtype}; expected a floating dtype")


def compress_shared(x: torch.Tensor, config: QuantConfig, *, dtype: Optional[torch.dtype] = None):
    """Compress ``x`` with ``config``, reusing an earlier result for the same tensor
    object, unchanged (same ``_version``) and the same config. With ``dtype``,
    ``x`` is cast to it first (autocast: the dtype the op computed in); the
    result decodes to ``dtype`` and is shared per ``dtype``.

    Only intermediates (tensors with a ``grad_fn``) are shared: they are rebuilt
    every step, so a shared result never outlives the graph it serves. A
    long-lived tensor without ``grad_fn`` that is not resident is compressed
    afresh each time; reusing it would repeat the same rounding noise in every
    step, and its gradient error would never average out.
    """
    source = x if dtype is None or dtype == x.dtype else x.detach().to(dtype)
    if x.grad_fn is None:
        return _compress(source, config)
    key = (x._version, config, source.dtype)
    per_tensor = _SHARED.get(x)
    if per_tensor is not None:
        hit = per_tensor.get(key)
        if hit is not None:
            return hit
    else:
        per_tensor = {}
        _SHARED[x] = per_tensor
    packed = _compress(source, config)
    # entries for older versions can never hit again
    for stale in [k for k in per_tensor if k[0] != x._version]:
        del per_tensor[stale]
    per_tensor[key] = packed
    return packed


def _keep_input(ctx, x: torch.Tensor, config: QuantConfig,
                dtype: Optional[torch.dtype] = None) -> Tuple[List[torch.Tensor], Tuple[object, ...]]:
    """How a Function keeps its input for backward: ``([x], ())`` by reference when
    resident, else ``([], (packed,))`` compressed with ``config`` (as ``dtype``
    when given: the dtype the op computed in under autocast; a resident ``x`` is
    cast in backward instead). Sets ``ctx.bq_ref``.

    The caller puts the first part into ``save_for_backward`` and the second into
    ``ctx.bq_state``; :func:`_load_input` undoes it.
    """
    ctx.bq_ref = is_resident(x)
    if ctx.bq_ref:
        return [x], ()
    return [], (compress_shared(x, config, dtype=dtype),)


def _load_input(ctx, saved: List[torch.Tensor], state: Tuple[object, ...]) -> torch.Tensor:
    """The input kept by :func:`_keep_input`: popped from ``saved`` or decompressed."""
    return saved.pop(0) if ctx.bq_ref else state[0].dequantize()


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype a matmul-like op computes ``x`` in: the autocast dtype when autocast
    is on for ``x``'s device and would cast ``x`` (float32/16/bf16), else ``None``
    (``x``'s own dtype)."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev) or x.dtype not in SUPPORTED_DTYPES:
        return None
    dtype = torch.get_autocast_dtype(dev)
    return None if dtype == x.dtype else dtype


def _no_proj(config: QuantConfig) -> QuantConfig:
    # Random projection is only cheap-and-unbiased where the input enters backward
    # linearly through a matmul; elementwise and normalisation ops get the plain codec.
    return config if config.rp_ratio == 1 else config.replace(rp_ratio=1)


# ----------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------

class _Linear(torch.autograd.Function):
    """``y = x W^T + b`` (exact forward).

    Saves, only if the weight gradient is needed: ``x`` compressed with the
    config (random projection included; backward forms ``(g^T Hp_hat) P^T``
    with ``P`` regenerated from the seed), or ``x`` by reference if it is
    resident. Saves ``W`` by reference only if the input gradient is needed
    (``grad_x = g W`` is exact). The bias gradient needs nothing.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, config):
        out = torch.nn.functional.linear(x, weight, bias)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.bq_in_dim = x.shape[-1]
        ctx.bq_x_shape = x.shape
        ctx.bq_has_bias = bias is not None
        to_save: List[torch.Tensor] = []
        state: Tuple[object, ...] = ()
        ctx.bq_ref = False
        if need_w:
            to_save, state = _keep_input(ctx, x, config, dtype=_autocast_dtype(x))
        if need_x:
            to_save.append(weight)
        ctx.save_for_backward(*to_save)
        ctx.bq_state = state
        return out

    @staticmethod
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
                packed = ctx.bq_state[0]
                if packed.proj_dims is not None:
                    hp = packed.dequantize_stored().reshape(-1, packed.proj_dims[1]).to(g2.dtype)
                    grad_w = g2.t().mm(hp).mm(packed.projection(g2.dtype).t())
                else:
                    grad_w = g2.t().mm(packed.dequantize().reshape(-1, ctx.bq_in_dim).to(g2.dtype))
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
        config: :class:`QuantConfig` (default: the ``"default"`` preset).
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


# ----------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------

_REDUCES = ("sum", "add", "mean", "max")


class _NoCtx:
    """Stand-in ctx for running a Function's forward without recording a graph."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *tensors) -> None:
        if tensors:
            raise AssertionError("nothing should be saved when no gradient is needed")


def _trailing(shape) -> int:
    return math.prod(shape[1:])


def _gather_scatter_sum(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    # index_add_ gives the same sums as PyG's scatter_add_ with an expanded index,
    # and is several times faster on multi-threaded CPUs
    out = values.new_zeros((size, values.shape[1]))
    return out.index_add_(0, index, values)


class _Aggregate(torch.autograd.Function):
    """``out[j] = reduce_{e: dst_e = j} w_e * x[src_e]`` for sum / mean / max (exact forward,
    matching ``torch_geometric.utils.scatter``; targets without edges get 0).

    Saves:
      * sum / mean with constant weights: nothing of ``x``; backward is
        ``A^T g``, using the adjacency the caller holds (degrees for ``mean``
        are recounted from it).
      * learnable edge weights (``w.requires_grad``): ``x`` compressed with the
        config (or by reference when resident), only for ``grad_w``.
      * max: the winning edge of every output element as an int32 tensor
        ``[num_dst, F]`` (int64 beyond 2^31 edges; integers, not compressed);
        ties go to the lowest edge id.
    """

    @staticmethod
    def forward(ctx, x, weight, adj: Adjacency, reduce: str, config: QuantConfig):
        need_x, need_w = ctx.needs_input_grad[:2]
        x2 = x.reshape(x.shape[0], _trailing(x.shape))
        src, dst = adj.src, adj.dst
        msg = x2.index_select(0, src)
        if weight is not None:
            msg = msg * weight.view(-1, 1).to(msg.dtype)
        if reduce == "max":
            out = msg.new_zeros((adj.num_dst, msg.shape[1]))
            index = dst.view(-1, 1).expand_as(msg)
            out.scatter_reduce_(0, index, msg, reduce="amax", include_self=False)
        else:
            out = _gather_scatter_sum(msg, dst, adj.num_dst)
            if reduce == "mean":
                count = adj.in_degree(out.dtype).clamp_(min=1)
                out = out / count.view(-1, 1)
        ctx.bq_adj = adj
        ctx.bq_reduce = reduce
        ctx.bq_x_shape = x.shape
        ctx.bq_has_weight = weight is not None
        to_save = []
        state = []
        if reduce == "max" and (need_x or need_w):
            num_e = msg.shape[0]
            is_win = msg == out.index_select(0, dst)
            edge_ids = torch.arange(num_e, device=msg.device).view(-1, 1).expand_as(msg)
            cand = torch.where(is_win, edge_ids, torch.full_like(edge_ids, num_e))
            winner = torch.full_like(out, num_e, dtype=torch.int64)
            winner.scatter_reduce_(0, index, cand, reduce="amin", include_self=True)
            state.append(winner.to(torch.int32) if num_e < 2 ** 31 - 1 else winner)
        if weight is not None and (need_x or need_w):
            to_save.append(weight)  # resident-sized ([E]) and needed for A^T g
        ctx.bq_ref = False
        if need_w:
            # grad_w is a per-edge inner product over few channels (one GAT head):
            # projection would be unbiased but far too noisy there
            refs, packed = _keep_input(ctx, x, _no_proj(config))
            to_save = refs + to_save
            state.extend(packed)
        ctx.save_for_backward(*to_save)
        ctx.bq_state = tuple(state)
        return out.view(adj.num_dst, *x.shape[1:])

    @staticmethod
    def backward(ctx, grad_out):
        need_x, need_w = ctx.needs_input_grad[:2]
        adj: Adjacency = ctx.bq_adj
        reduce = ctx.bq_reduce
        saved = list(ctx.saved_tensors)
        state = list(ctx.bq_state)
        x_ref = saved.pop(0) if ctx.bq_ref else None
        weight = saved.pop(0) if ctx.bq_has_weight else None
        n_src = ctx.bq_x_shape[0]
        g = grad_out.reshape(adj.num_dst, _trailing(grad_out.shape))
        if reduce == "max":
            winner = state.pop(0).long()
            num_e = adj.num_edges
            grad_msg = g.new_zeros((num_e + 1, g.shape[1]))
            grad_msg.scatter_(0, winner, g)
            grad_msg = grad_msg[:num_e]
        else:
            if reduce == "mean":
                g = g / adj.in_degree(g.dtype).clamp_(min=1).view(-1, 1)
            grad_msg = g.index_select(0, adj.dst)
        grad_x = grad_w = None
        if need_w:
            x = x_ref if x_ref is not None else state.pop(0).dequantize()
            x2 = x.reshape(n_src, _trailing(x.shape)).to(grad_msg.dtype)
            grad_w = (grad_msg * x2.index_select(0, adj.src)).sum(1).to(weight.dtype)
        if need_x:
            if weight is not None:
                grad_msg = grad_msg * weight.view(-1, 1).to(grad_msg.dtype)
            grad_x = _gather_scatter_sum(grad_msg, adj.src, n_src).view(ctx.bq_x_shape)
        return grad_x, grad_w, None, None, None


def aggregate(x: torch.Tensor, adj, reduce: str = "sum", config: Optional[QuantConfig] = None, *,
              num_nodes=None) -> torch.Tensor:
    """Neighbourhood aggregation ``out[j] = reduce over edges i -> j of w_ij * x[i]``.

    Args:
        x: source-node features ``[num_src, ...]``.
        adj: any form :func:`blockquant.adjacency.as_adjacency` accepts (an
            ``edge_index``, a torch.sparse matrix in ``adj_t`` layout, a PyG
            ``EdgeIndex``, a ``torch_sparse.SparseTensor``, an :class:`Adjacency`).
            Its edge weights, if any, multiply the messages; they may require grad.
        reduce: ``"sum"`` (alias ``"add"``), ``"mean"`` or ``"max"``.
        config: used only when edge weights require grad (``x`` is then
            compressed for the weight gradient).
        num_nodes: passed to :func:`as_adjacency` for ``edge_index`` input;
            defaults to ``(x.size(0), x.size(0))``.

    Returns: ``[num_dst, ...]``.
    """
    _check_float(x, "aggregate")
    if reduce not in _REDUCES:
        raise ValueError(f"blockquant.functional.aggregate: reduce must be one of {_REDUCES}; got {reduce!r}")
    reduce = "sum" if reduce == "add" else reduce
    config = _config(config, "aggregate")
    if x.dim() < 1:
        raise ValueError("blockquant.functional.aggregate expects x of shape [num_nodes, ...]; got a scalar")
    if not isinstance(adj, Adjacency):
        adj = as_adjacency(adj, num_nodes=x.size(0) if num_nodes is None else num_nodes)
    if adj.num_src != x.size(0):
        raise ValueError(f"blockquant.functional.aggregate: the adjacency has {adj.num_src} source nodes but x "
                         f"has {x.size(0)} rows")
    if _untracked(x, adj.edge_weight):
        with torch.no_grad():
            return _Aggregate.forward(_NoCtx((False, False)), x, adj.edge_weight, adj, reduce, config)
    return _Aggregate.apply(x, adj.edge_weight, adj, reduce, config)


# ----------------------------------------------------------------------------
# ReLU family: a 1-bit mask
# ----------------------------------------------------------------------------

class _MaskedActivation(torch.autograd.Function):
    """ReLU / LeakyReLU (exact forward). Saves ``x > 0`` as a packed 1-bit
    :class:`BitMask` (``ceil(n / 8)`` bytes), only if the input gradient is needed."""

    @staticmethod
    def forward(ctx, x, negative_slope):
        if negative_slope is None:
            out = torch.relu(x)
        else:
            out = torch.nn.functional.leaky_relu(x, negative_slope)
        ctx.bq_slope = negative_slope
        ctx.bq_state = (BitMask.pack(x > 0),) if ctx.needs_input_grad[0] else ()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None
        positive = ctx.bq_state[0].unpack()
        if ctx.bq_slope is None:
            grad = grad_out * positive.to(grad_out.dtype)
        else:
            scale = torch.where(positive, grad_out.new_ones(()), grad_out.new_full((), ctx.bq_slope))
            grad = grad_out * scale
        return grad, None


def relu(x: torch.Tensor) -> torch.Tensor:
    """``torch.relu`` storing a 1-bit mask for backward."""
    _check_float(x, "relu")
    if _untracked(x):
        return torch.relu(x)
    return _MaskedActivation.apply(x, None)


def leaky_relu(x: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    """``torch.nn.functional.leaky_relu`` storing a 1-bit mask for backward."""
    _check_float(x, "leaky_relu")
    if _untracked(x):
        return torch.nn.functional.leaky_relu(x, float(negative_slope))
    return _MaskedActivation.apply(x, float(negative_slope))


# ----------------------------------------------------------------------------
# dropout: the seed only
# ----------------------------------------------------------------------------

def _dropout_noise(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Scaled keep-mask ``bernoulli(1 - p) / (1 - p)``, regenerated identically from ``seed``."""
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    noise = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if p == 1.0:
        return noise.zero_()
    noise.bernoulli_(1.0 - p, generator=gen)
    return noise.div_(1.0 - p)


class _Dropout(torch.autograd.Function):
    """Dropout that saves one integer seed (0 tensor bytes); backward
    regenerates the mask with the same generator type on the same device."""

    @staticmethod
    def forward(ctx, x, p):
        seed = draw_seed()
        ctx.bq_seed = seed
        ctx.bq_p = p
        ctx.bq_state = ()
        return x * _dropout_noise(x, p, seed)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out * _dropout_noise(grad_out, ctx.bq_p, ctx.bq_seed), None


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """Dropout with the same drop probability and ``1 / (1 - p)`` scaling as
    ``torch.nn.functional.dropout``, but its own RNG stream (seeded from
    PyTorch's default generator, so ``torch.manual_seed`` reproduces it)."""
    _check_float(x, "dropout")
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1]; got {p}")
    if not training:
        return x
    if _untracked(x):
        return torch.nn.functional.dropout(x, p, True)
    return _Dropout.apply(x, p)


# ----------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------

class _BatchNorm(torch.autograd.Function):
    """Batch normalisation over dim 1 (exact forward; running statistics
    updated exactly as ``torch.nn.functional.batch_norm`` does).

    Saves: the input compressed without projection (or by reference when
    resident) if the input gradient in training mode or the weight gradient
    is needed; the batch mean and inverse std (``[C]`` each, training mode);
    the weight by reference if the input gradient is needed; in eval mode the
    running statistics by reference.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, config):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if training and running_mean is not None:
            out, save_mean, save_invstd, _ = torch.ops.aten._batch_norm_with_update(
                x, weight, bias, running_mean, running_var, momentum, eps)
        else:
            out, save_mean, save_invstd = torch.native_batch_norm(
                x, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.bq_training = training
        ctx.bq_eps = eps
        ctx.bq_has = (weight is not None, bias is not None)
        ctx.bq_c = x.shape[1] if x.dim() > 1 else 0
        need_input = need_w or (need_x and training)
        ctx.bq_ref = False
        state: Tuple[object, ...] = ()
        tensors: List[torch.Tensor] = []
        if need_input:
            tensors, state = _keep_input(ctx, x, _no_proj(config))
        ctx.bq_need_input = need_input
        stats = (save_mean, save_invstd) if training else (running_mean, running_var)
        tensors.extend(stats)
        tensors.append(weight if weight is not None else x.new_empty(0))
        ctx.save_for_backward(*tensors)
        ctx.bq_state = state
        ctx.bq_shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        saved = list(ctx.saved_tensors)
        x = None
        if ctx.bq_need_input:
            x = _load_input(ctx, saved, ctx.bq_state)
        stat_a, stat_b, weight = saved
        has_w, has_b = ctx.bq_has
        weight = weight if has_w else None
        if x is None:  # eval-mode input gradient only: g * w / sqrt(running_var + eps)
            scale = torch.rsqrt(stat_b.to(grad_out.dtype) + ctx.bq_eps)
            if weight is not None:
                scale = scale * weight.to(grad_out.dtype)
            view = [1] * grad_out.dim()
            view[1] = -1
            grad_x = grad_out * scale.view(view) if need_x else None
            dims = [d for d in range(grad_out.dim()) if d != 1]
            grad_b = grad_out.sum(dims) if (need_b and has_b) else None
            return grad_x, None, grad_b, None, None, None, None, None, None
        x = x.to(grad_out.dtype)
        if grad_out.numel() == 0:
            return (torch.zeros_like(grad_out) if need_x else None,
                    torch.zeros_like(weight) if (need_w and has_w) else None,
                    grad_out.new_zeros(ctx.bq_c) if (need_b and has_b) else None,
                    None, None, None, None, None, None)
        if ctx.bq_training:
            mean, invstd, rm, rv = stat_a, stat_b, None, None
        else:
            mean, invstd, rm, rv = None, None, stat_a, stat_b
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_out.contiguous(), x, weight, rm, rv, mean, invstd, ctx.bq_training, ctx.bq_eps,
            [bool(need_x), bool(need_w and has_w), bool(need_b and has_b)])
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, config: Optional[QuantConfig] = None) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` (same argument order) whose saved input is compressed."""
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

    Saves: the input compressed without projection (or by reference when
    resident) if the input or weight gradient is needed; the per-row mean and
    reciprocal std (``[..., 1]`` each); the weight by reference.
    """

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, config):
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        out, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.bq_shape_norm = normalized_shape
        ctx.bq_has = (weight is not None, bias is not None)
        need_input = need_x or need_w
        ctx.bq_need_input = need_input
        ctx.bq_ref = False
        state: Tuple[object, ...] = ()
        tensors: List[torch.Tensor] = []
        if need_input:
            tensors, state = _keep_input(ctx, x, _no_proj(config))
            tensors.extend((mean, rstd))
        tensors.append(weight if weight is not None else x.new_empty(0))
        tensors.append(bias if bias is not None else x.new_empty(0))
        ctx.save_for_backward(*tensors)
        ctx.bq_state = state
        return out

    @staticmethod
    def backward(ctx, grad_out):
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        has_w, has_b = ctx.bq_has
        saved = list(ctx.saved_tensors)
        if not ctx.bq_need_input:  # only the bias gradient
            k = len(ctx.bq_shape_norm)
            dims = list(range(grad_out.dim() - k))
            return None, None, None, grad_out.sum(dims) if (need_b and has_b) else None, None, None
        x = _load_input(ctx, saved, ctx.bq_state)
        mean, rstd, weight, bias = saved
        if grad_out.numel() == 0:  # the ATen kernel divides by the row count
            return (torch.zeros_like(grad_out) if need_x else None, None,
                    torch.zeros_like(weight) if (need_w and has_w) else None,
                    torch.zeros_like(bias) if (need_b and has_b) else None, None, None)
        grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
            grad_out.contiguous(), x.to(grad_out.dtype), ctx.bq_shape_norm, mean, rstd,
            weight if has_w else None, bias if has_b else None,
            [bool(need_x), bool(need_w and has_w), bool(need_b and has_b)])
        return grad_x, None, grad_w, grad_b, None, None


def layer_norm(x, normalized_shape: Union[int, Sequence[int]], weight=None, bias=None, eps: float = 1e-5,
               config: Optional[QuantConfig] = None) -> torch.Tensor:
    """``torch.nn.functional.layer_norm`` whose saved input is compressed."""
    config = _config(config, "layer_norm")
    _check_float(x, "layer_norm")
    shape = (int(normalized_shape),) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)
    if tuple(x.shape[x.dim() - len(shape):]) != shape or len(shape) > x.dim():
        raise ValueError(f"blockquant.functional.layer_norm: x's trailing dims must equal normalized_shape "
                         f"{list(shape)}; got x of shape {tuple(x.shape)}")
    if _untracked(x, weight, bias):
        return torch.nn.functional.layer_norm(x, shape, weight, bias, float(eps))
    return _LayerNorm.apply(x, list(shape), weight, bias, float(eps), config)


# ----------------------------------------------------------------------------
# smooth activations: compressed input
# ----------------------------------------------------------------------------

class _Smooth(torch.autograd.Function):
    """ELU / GELU (exact forward). Saves the input compressed without
    projection (or by reference when resident), only if its gradient is needed;
    backward calls the ATen derivative on the dequantized input.

    ELU's derivative jumps at 0 (from ``alpha`` to 1) unless ``alpha == 1``, so
    a compressed ELU input also keeps the 1-bit sign mask ``x > 0``
    (0.125 B/elem): rounding can then never put an element on the wrong side.
    """

    @staticmethod
    def forward(ctx, x, kind, param, config):
        if kind == "elu":
            out = torch.nn.functional.elu(x, param)
        else:
            out = torch.nn.functional.gelu(x, approximate=param)
        ctx.bq_kind, ctx.bq_param = kind, param
        ctx.bq_state = ()
        ctx.bq_ref = False
        if ctx.needs_input_grad[0]:
            refs, ctx.bq_state = _keep_input(ctx, x, _no_proj(config))
            ctx.save_for_backward(*refs)
            if kind == "elu" and not ctx.bq_ref:
                ctx.bq_state = ctx.bq_state + (BitMask.pack(x > 0),)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        x = _load_input(ctx, list(ctx.saved_tensors), ctx.bq_state).to(grad_out.dtype)
        if ctx.bq_kind == "elu":
            if not ctx.bq_ref:  # the exact sign decides the branch; x_hat only feeds exp()
                positive = ctx.bq_state[1].unpack()
                x = torch.where(positive, x.clamp(min=1.0), x.clamp(max=0.0))
            grad = torch.ops.aten.elu_backward(grad_out, ctx.bq_param, 1, 1, False, x)
        else:
            grad = torch.ops.aten.gelu_backward(grad_out, x, approximate=ctx.bq_param)
        return grad, None, None, None


def elu(x: torch.Tensor, alpha: float = 1.0, config: Optional[QuantConfig] = None) -> torch.Tensor:
    """``torch.nn.functional.elu`` whose saved input is compressed."""
    config = _config(config, "elu")
    _check_float(x, "elu")
    if _untracked(x):
        return torch.nn.functional.elu(x, float(alpha))
    return _Smooth.apply(x, "elu", float(alpha), config)


def gelu(x: torch.Tensor, approximate: str = "none", config: Optional[QuantConfig] = None) -> torch.Tensor:
    """``torch.nn.functional.gelu`` whose saved input is compressed."""
    config = _config(config, "gelu")
    _check_float(x, "gelu")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh'; got {approximate!r}")
    if _untracked(x):
        return torch.nn.functional.gelu(x, approximate=approximate)
    return _Smooth.apply(x, "gelu", approximate, config)
