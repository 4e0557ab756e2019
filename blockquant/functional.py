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

What each op keeps of its inputs (by reference when resident, compressed once and
shared, compressed independently, or exact when backward is not linear in it) is
decided by one rule, :func:`blockquant.save_policy.keep`; its module docstring
states it. :func:`is_resident`, :func:`mark_resident` and :func:`compress_shared`
are re-exported here from :mod:`blockquant.save_policy`.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

from blockquant.kernels.bitmask import BitMask

from .adjacency import _CSR, Adjacency, _is_edge_index_type, as_adjacency
from .config import QuantConfig
from .packed import SUPPORTED_DTYPES, draw_seed_tensor
from . import save_policy
from .save_policy import compress_shared, is_resident, keep_for_ctx, mark_resident, without_projection

__all__ = [
    "linear", "aggregate", "aggregate_linear", "relu", "leaky_relu", "dropout", "batch_norm", "layer_norm", "elu",
    "gelu", "sigmoid", "tanh", "compress_shared", "is_resident", "mark_resident", "BitMask",
]

# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

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
        err = torch._C._functions.DelayedError(DOUBLE_BACKWARD_MESSAGE, len(tensors))
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


# ----------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------

_REDUCES = ("sum", "add", "mean", "max")



def _trailing(shape) -> int:
    return math.prod(shape[1:])


def _chunks(total: int, width: int):
    step = max(1, save_policy.CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, total, step):
        yield start, min(start + step, total)


def _spmm(csr: _CSR, values: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``csr(values) @ x2`` as one sparse-dense product (``[R, F]``; no per-edge tensor)."""
    return _csr_spmm(csr.rowptr, csr.col, values, x2, csr.num_cols)


# a custom op (with a shape-only fake) so that torch.compile keeps the product in its graph
@torch.library.custom_op("blockquant::csr_spmm", mutates_args=())
def _csr_spmm(rowptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, x2: torch.Tensor,
              num_cols: int) -> torch.Tensor:
    csr = _CSR(rowptr, col, None, rowptr.numel() - 1, num_cols)
    if x2.shape[1] == 0 or csr.num_edges == 0:
        return x2.new_zeros((csr.num_rows, x2.shape[1]))
    a = csr.matrix(values)
    x2 = x2.contiguous()
    if x2.device.type == "cpu":
        return torch.sparse.mm(a, x2, "sum")  # ATen's CPU CSR kernel: parallel, every float dtype
    try:
        return torch.sparse.mm(a, x2)  # cuSPARSE
    except (NotImplementedError, RuntimeError) as e:  # a dtype the device library lacks
        if "not implemented" not in str(e) and "not supported" not in str(e):
            raise
        return _chunked_sum(csr, values, x2)


@_csr_spmm.register_fake
def _(rowptr, col, values, x2, num_cols):
    return x2.new_empty((rowptr.shape[0] - 1, x2.shape[1]))


def _chunked_sum(csr: _CSR, values: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    out = x2.new_zeros((csr.num_rows, x2.shape[1]))
    for a, b in _chunks(csr.num_edges, x2.shape[1]):
        msg = x2.index_select(0, csr.col[a:b]) * values[a:b].view(-1, 1)
        out.index_add_(0, csr.rows_of(a, b), msg)
    return out


def _max_forward(csr: _CSR, values: Optional[torch.Tensor], x2: torch.Tensor, need_winner: bool):
    """Segment max over the CSR rows, edge-chunked; returns ``(out, winner)``. ``winner[j, f]``
    is the CSR position of the first entry reaching the maximum (``E`` for empty rows)."""
    num_e, width = csr.num_edges, x2.shape[1]
    deg = csr.rowptr.diff()
    if x2.device.type == "cpu" and num_e and width:
        v = values if values is not None else csr.values(None, x2.dtype)
        out = torch.sparse.mm(csr.matrix(v), x2.contiguous(), "amax")  # empty rows give 0
    else:
        out = x2.new_full((csr.num_rows, width), -math.inf)
        for a, b in _chunks(num_e, width):
            msg = x2.index_select(0, csr.col[a:b])
            if values is not None:
                msg = msg * values[a:b].view(-1, 1)
            rows = csr.rows_of(a, b).view(-1, 1).expand(-1, width)
            out.scatter_reduce_(0, rows, msg, reduce="amax", include_self=True)
        out.masked_fill_((deg == 0).view(-1, 1), 0)
    if not need_winner:
        return out, None
    winner = torch.full((csr.num_rows, width), num_e, dtype=torch.int64, device=x2.device)
    for a, b in _chunks(num_e, width):
        rows = csr.rows_of(a, b)
        msg = x2.index_select(0, csr.col[a:b])
        if values is not None:
            msg = msg * values[a:b].view(-1, 1)
        is_win = msg == out.index_select(0, rows)
        pos = torch.arange(a, b, device=x2.device).view(-1, 1)
        cand = torch.where(is_win, pos, num_e)
        winner.scatter_reduce_(0, rows.view(-1, 1).expand(-1, width), cand, reduce="amin", include_self=True)
    return out, (winner.to(torch.int32) if num_e < 2 ** 31 - 1 else winner)


def _max_backward(csr: _CSR, values, winner, g: torch.Tensor, x2, n_src: int, need_x: bool, need_w: bool):
    """Gradients of segment max, row-chunked: ``g[j, f]`` goes to the winning edge's source
    (times its weight) and, for ``grad_w``, ``g[j, f] * x[src, f]`` to the winning edge."""
    num_dst, width = g.shape
    num_e = csr.num_edges
    grad_x = g.new_zeros((n_src, width)) if need_x else None
    grad_v = g.new_zeros(num_e) if need_w else None
    if num_e == 0 or width == 0:
        return grad_x, grad_v
    col = csr.col.long()
    feat = torch.arange(width, device=g.device)
    for a, b in _chunks(num_dst, width):
        win = winner[a:b].long()
        valid = win < num_e
        win = win.clamp_(max=num_e - 1)
        src = col.index_select(0, win.view(-1)).view_as(win)
        gv = g[a:b] * valid.to(g.dtype)
        if need_w:
            xv = x2.reshape(-1).index_select(0, (src * width + feat).view(-1)).view_as(gv)
            grad_v.index_add_(0, win.view(-1), (gv * xv.to(gv.dtype)).view(-1))
        if need_x:
            if values is not None:
                gv = gv * values.index_select(0, win.view(-1)).view_as(gv)
            grad_x.view(-1).index_add_(0, (src * width + feat).view(-1), gv.reshape(-1))
    return grad_x, grad_v


def _weight_grad(csr: _CSR, g: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``grad_v[k] = <g[row_k], x[col_k]>`` for every stored entry, edge-chunked (CSR order)."""
    grad_v = g.new_empty(csr.num_edges)
    for a, b in _chunks(csr.num_edges, g.shape[1]):
        gr = g.index_select(0, csr.rows_of(a, b))
        gr.mul_(x2.index_select(0, csr.col[a:b]).to(gr.dtype))
        torch.sum(gr, dim=1, out=grad_v[a:b])
    return grad_v


def _to_edge_order(csr: _CSR, grad_v: torch.Tensor) -> torch.Tensor:
    if csr.perm is None:
        return grad_v
    out = torch.empty_like(grad_v)
    for a, b in _chunks(csr.num_edges, 1):
        out.index_copy_(0, csr.perm[a:b].long(), grad_v[a:b])
    return out


def _aggregate_forward(x2: torch.Tensor, weight: Optional[torch.Tensor], adj: Adjacency, reduce: str,
                       need_winner: bool):
    fwd = adj._structure.fwd
    values = None if weight is None else fwd.values(weight, x2.dtype)
    if reduce == "max":
        return _max_forward(fwd, values, x2, need_winner)
    out = _spmm(fwd, values if values is not None else fwd.values(None, x2.dtype), x2)
    if reduce == "mean":
        out = out.div_(adj.in_degree(out.dtype).clamp_(min=1).view(-1, 1))
    return out, None


class _Aggregate(torch.autograd.Function):
    """``out[j] = reduce_{e: dst_e = j} w_e * x[src_e]`` for sum / mean / max (exact forward,
    equal to ``torch_geometric.utils.scatter`` up to summation order; targets without edges
    get 0). Sum and mean are sparse-dense products ``A x`` over the graph's cached CSR;
    max is an edge-chunked segment reduction. No step allocates an ``[E, F]`` tensor:
    per-edge work runs in chunks of at most :data:`~blockquant.save_policy.CHUNK_ELEMENTS` elements.

    Saves:
      * sum / mean with constant weights: nothing of ``x``; backward is the
        product ``A^T g`` with the cached transposed CSR (``mean`` divides ``g``
        by the in-degree first).
      * learnable edge weights (``w.requires_grad``): ``x`` compressed with the
        config without projection (or by reference when resident), used only
        linearly in ``grad_w[e] = <g[dst_e], x[src_e]>``, computed edge-chunked.
      * edge weights (``[E]``, by reference) when a gradient needs them.
      * max: the winning edge of every output element as an int32 tensor
        ``[num_dst, F]`` (int64 beyond 2^31 edges; integers, not compressed);
        ties go to the first edge in CSR order (the lowest edge id for ``edge_index``).
    """

    @staticmethod
    def forward(ctx, x, weight, adj: Adjacency, reduce: str, config: QuantConfig):
        need_x, need_w = ctx.needs_input_grad[:2]
        x2 = x.reshape(x.shape[0], _trailing(x.shape))
        out, winner = _aggregate_forward(x2, weight, adj, reduce, need_x or need_w)
        ctx.bq_adj = adj
        ctx.bq_reduce = reduce
        ctx.bq_x_shape = x.shape
        ctx.bq_has_weight = weight is not None
        to_save = []
        state = [] if winner is None else [winner]
        if weight is not None and (need_x or need_w):
            to_save.append(weight)  # resident-sized ([E]) and needed for A^T g
        ctx.bq_ref = False
        if need_w:
            # grad_w is a per-edge inner product over few channels (one GAT head):
            # projection would be unbiased but far too noisy there
            refs, packed = keep_for_ctx(ctx, x, config, projection=False)
            to_save = refs + to_save
            state.extend(packed)
        ctx.save_for_backward(*to_save)
        ctx.bq_state = tuple(state)
        return out.view(adj.num_dst, *x.shape[1:])

    @staticmethod
    @_first_order_only
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
        fwd = adj._structure.fwd
        winner = state.pop(0) if reduce == "max" else None
        x2 = None
        if need_w:  # decoded once, only now, and only for the linear use in grad_w
            x = x_ref if x_ref is not None else state.pop(0).dequantize()
            x2 = x.reshape(n_src, _trailing(x.shape))
        grad_x = grad_w = None
        if reduce == "max":
            values = None if weight is None else fwd.values(weight, g.dtype)
            grad_x, grad_v = _max_backward(fwd, values, winner, g, x2, n_src, need_x, need_w)
        else:
            if reduce == "mean":
                g = g / adj.in_degree(g.dtype).clamp_(min=1).view(-1, 1)
            grad_v = _weight_grad(fwd, g, x2) if need_w else None
            del x2
            if need_x:
                bwd = adj._structure.bwd
                grad_x = _spmm(bwd, bwd.values(weight, g.dtype), g)
        if need_x:
            grad_x = grad_x.view(ctx.bq_x_shape)
        if need_w:
            grad_w = _to_edge_order(fwd, grad_v).to(weight.dtype)
        return grad_x, grad_w, None, None, None


def _sizes_unknown(adj) -> bool:
    """A plain ``edge_index`` (or an ``EdgeIndex`` without ``sparse_size``): sizes come from ``x``."""
    if isinstance(adj, torch.Tensor) and adj.layout != torch.strided:
        return False  # a sparse matrix has its shape
    if _is_edge_index_type(adj):
        return any(s is None for s in adj.sparse_size())
    return isinstance(adj, torch.Tensor)


def _adjacency_for(x: torch.Tensor, adj, num_nodes, op: str) -> Adjacency:
    """``adj`` as an :class:`Adjacency` whose sources are the rows of ``x``, on ``x``'s device."""
    if not isinstance(adj, Adjacency):
        if num_nodes is None and _sizes_unknown(adj):
            num_nodes = x.size(0)
        adj = as_adjacency(adj, num_nodes=num_nodes)
    if adj.num_src != x.size(0):
        raise ValueError(f"blockquant.functional.{op}: the adjacency has {adj.num_src} source nodes but x has "
                         f"{x.size(0)} rows")
    if adj.device != x.device:
        raise ValueError(f"blockquant.functional.{op}: the adjacency is on {adj.device} but x is on {x.device}; "
                         "move both to one device")
    return adj


def aggregate(x: torch.Tensor, adj, reduce: str = "sum", config: Optional[QuantConfig] = None, *,
              num_nodes=None) -> torch.Tensor:
    """Neighbourhood aggregation ``out[j] = reduce over edges i -> j of w_ij * x[i]``.

    Sum and mean run as sparse-dense matrix products over the graph's CSR, which
    :func:`~blockquant.adjacency.as_adjacency` builds once per graph and caches;
    max runs edge-chunked. Memory is ``O(N x F)``: no ``[E, F]`` message tensor
    exists in forward or backward.

    Args:
        x: source-node features ``[num_src, ...]``.
        adj: any form :func:`blockquant.adjacency.as_adjacency` accepts (an
            ``edge_index``, a torch.sparse matrix in ``adj_t`` layout, a PyG
            ``EdgeIndex``, a ``torch_sparse.SparseTensor``, an :class:`Adjacency`).
            Its edge weights, if any, multiply the messages; they may require grad.
        reduce: ``"sum"`` (alias ``"add"``), ``"mean"`` or ``"max"``.
        config: :class:`QuantConfig` or preset name, used only when edge weights require grad (``x`` is
            then compressed for the weight gradient).
        num_nodes: passed to :func:`as_adjacency` for ``edge_index`` input;
            defaults to ``(x.size(0), x.size(0))`` (an ``EdgeIndex`` with a
            ``sparse_size`` and a sparse matrix carry their own sizes).

    Returns: ``[num_dst, ...]``.

    Saved for backward: sum/mean with constant weights, nothing of ``x`` (the cached CSR serves backward); learnable
    edge weights, ``x`` compressed without projection (0.504 B per element at the default config) and the weights by
    reference; max, the winning edge per output element (int32, 4 B per output element).
    """
    _check_float(x, "aggregate")
    if reduce not in _REDUCES:
        raise ValueError(f"blockquant.functional.aggregate: reduce must be one of {_REDUCES}; got {reduce!r}")
    reduce = "sum" if reduce == "add" else reduce
    config = _config(config, "aggregate")
    if x.dim() < 1:
        raise ValueError("blockquant.functional.aggregate expects x of shape [num_nodes, ...]; got a scalar")
    adj = _adjacency_for(x, adj, num_nodes, "aggregate")
    if _untracked(x, adj.edge_weight):
        with torch.no_grad():
            x2 = x.reshape(x.shape[0], _trailing(x.shape))
            out, _ = _aggregate_forward(x2, adj.edge_weight, adj, reduce, False)
            return out.view(adj.num_dst, *x.shape[1:])
    return _Aggregate.apply(x, adj.edge_weight, adj, reduce, config)


# ----------------------------------------------------------------------------
# aggregation followed by a linear map
# ----------------------------------------------------------------------------

class _AggregateLinear(torch.autograd.Function):
    """``y = (A x) W^T + b`` with ``A`` a constant sum / mean aggregation (exact forward, equal
    to :func:`aggregate` then :func:`linear` up to summation order).

    Both gradients that need an activation are linear in ``x`` itself, not in the aggregate:
    ``grad_W = (A^T g)^T x`` and ``grad_x = (A^T g) W``. So the aggregate is never kept:

    Saves (only what the requested gradients need):
      * for the weight gradient: ``x`` by reference when resident, else compressed with the
        config (projection included) through :func:`compress_shared`, so a layer that also
        feeds ``x`` to :func:`linear` (SAGE's ``lin_r``) keeps one copy for both;
      * for the input gradient: ``W`` by reference;
      * the constant edge weights (``[E]``) by reference when the graph has them; the
        adjacency's cached CSR.

    The forward multiplies by ``W`` first when that narrows the features (``out < in``), so
    the ``[num_dst, in]`` aggregate is not even formed then. Backward forms ``h = A^T g``
    (``g`` divided by the in-degree first for mean) with one sparse product over the cached
    transposed CSR, then ``grad_W = h^T x_hat`` one compressed row block at a time and
    ``grad_x = h W``; only when the input gradient alone is needed and ``in < out`` does it
    use the narrower ``A^T (g W)`` instead.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, edge_weight, adj: Adjacency, reduce: str, config: QuantConfig):
        need_x, need_w = ctx.needs_input_grad[:2]
        out = _aggregate_linear_forward(x, weight, bias, edge_weight, adj, reduce)
        ctx.bq_adj = adj
        ctx.bq_reduce = reduce
        ctx.bq_in_dim = x.shape[1]
        ctx.bq_has_bias = bias is not None
        ctx.bq_has_edge_weight = edge_weight is not None
        to_save = _keep_linear_operands(ctx, x, weight, config, need_x, need_w)
        if edge_weight is not None and (need_x or need_w):
            to_save.append(edge_weight)
        ctx.save_for_backward(*to_save)
        return out

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        adj: Adjacency = ctx.bq_adj
        saved = list(ctx.saved_tensors)
        x_ref = saved.pop(0) if (need_w and ctx.bq_ref) else None
        weight = saved.pop(0) if need_x else None
        edge_weight = saved.pop(0) if (ctx.bq_has_edge_weight and (need_x or need_w)) else None
        grad_x = grad_w = grad_b = None
        if need_b and ctx.bq_has_bias:
            grad_b = grad_out.sum(0)
        if not (need_x or need_w):
            return grad_x, grad_w, grad_b, None, None, None, None
        g = grad_out
        if ctx.bq_reduce == "mean":
            g = g / adj.in_degree(g.dtype).clamp_(min=1).view(-1, 1)
        bwd = adj._structure.bwd
        if not need_w and ctx.bq_in_dim < g.shape[1]:
            grad_x = _spmm(bwd, bwd.values(edge_weight, g.dtype), g.mm(weight.to(g.dtype)))
            return grad_x, None, grad_b, None, None, None, None
        h = _spmm(bwd, bwd.values(edge_weight, g.dtype), g)  # A^T g: [num_src, out]
        del g
        if need_w:
            if x_ref is not None:
                grad_w = h.t().mm(x_ref.to(h.dtype))
            else:
                grad_w = ctx.bq_state[0].left_matmul(h.t())
        if need_x:
            grad_x = h.mm(weight.to(h.dtype))
        return grad_x, grad_w, grad_b, None, None, None, None


def _aggregate_linear_forward(x, weight, bias, edge_weight, adj: Adjacency, reduce: str) -> torch.Tensor:
    fwd = adj._structure.fwd
    if weight.shape[0] < weight.shape[1]:  # narrow first: A (x W^T), no [num_dst, in] aggregate
        h = torch.nn.functional.linear(x, weight)
        out = _spmm(fwd, fwd.values(edge_weight, h.dtype), h)
        if reduce == "mean":
            out = out.div_(adj.in_degree(out.dtype).clamp_(min=1).view(-1, 1))
        return out if bias is None else out.add_(bias.to(out.dtype))
    agg = _spmm(fwd, fwd.values(edge_weight, x.dtype), x)
    if reduce == "mean":
        agg = agg.div_(adj.in_degree(agg.dtype).clamp_(min=1).view(-1, 1))
    return torch.nn.functional.linear(agg, weight, bias)


def aggregate_linear(x: torch.Tensor, adj, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     reduce: str = "sum", config: Optional[QuantConfig] = None, *, num_nodes=None) -> torch.Tensor:
    """``linear(aggregate(x, adj, reduce), weight, bias)`` for a constant sum / mean aggregation,
    keeping only ``x`` for backward (never the aggregate).

    The weight gradient ``(A^T g)^T x`` and the input gradient ``(A^T g) W`` are both linear in
    ``x``, so the ``[num_dst, in]`` aggregate that ``aggregate`` then ``linear`` would keep
    compressed is not needed: a resident ``x`` (the graph's features) makes the weight gradient
    exact, and an intermediate ``x`` is compressed once and shared with other ops that keep the
    same ``x`` at the same config (SAGE's root weight, :func:`linear`). Memory is ``O(N x F)``:
    no ``[E, F]`` tensor in forward or backward.

    Args:
        x: source-node features ``[num_src, in_features]``.
        adj: any form :func:`aggregate` accepts; its edge weights, if any, must not require grad
            (learnable edge weights: use :func:`aggregate` then :func:`linear`).
        weight: ``[out_features, in_features]``.
        bias: optional ``[out_features]``.
        reduce: ``"sum"`` (alias ``"add"``) or ``"mean"`` (max is not linear: use :func:`aggregate`).
        config: :class:`QuantConfig` or preset name for ``x`` (default: the ``"default"`` preset).
        num_nodes: as for :func:`aggregate`.

    Returns: ``[num_dst, out_features]``.

    Saved for backward (only what the requested gradients need):
      * ``x`` for the weight gradient: by reference, 0 B, when resident (:func:`is_resident`), else compressed,
        0.504 B per element at the default config (a projected copy when ``config.rp_ratio > 1``), shared with
        any other op of this step that keeps the same ``x`` at the same config;
      * ``weight`` by reference (0 B extra) for the input gradient; constant edge weights by reference;
      * nothing of the aggregate; the bias gradient needs nothing.
    """
    _check_float(x, "aggregate_linear")
    _check_float(weight, "aggregate_linear", "weight")
    if reduce not in ("sum", "add", "mean"):
        raise ValueError(f"blockquant.functional.aggregate_linear: reduce must be 'sum', 'add' or 'mean'; got "
                         f"{reduce!r} (for max use aggregate() then linear())")
    reduce = "sum" if reduce == "add" else reduce
    config = _config(config, "aggregate_linear")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"blockquant.functional.aggregate_linear: expected x [num_nodes, in_features] and weight "
                         f"[out_features, in_features]; got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"blockquant.functional.aggregate_linear: expected bias of shape ({weight.shape[0]},); "
                         f"got {tuple(bias.shape)}")
    adj = _adjacency_for(x, adj, num_nodes, "aggregate_linear")
    edge_weight = adj.edge_weight
    if edge_weight is not None and edge_weight.requires_grad:
        raise ValueError("blockquant.functional.aggregate_linear: the edge weights require grad; their gradient "
                         "needs the messages: use aggregate() then linear() for learnable edge weights")
    if _untracked(x, weight, bias):
        with torch.no_grad():
            return _aggregate_linear_forward(x, weight, bias, edge_weight, adj, reduce)
    return _AggregateLinear.apply(x, weight, bias, edge_weight, adj, reduce, config)


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
@torch.library.custom_op("blockquant::dropout_noise", mutates_args=())
def _dropout_noise_op(seed: torch.Tensor, shape: List[int], dtype: torch.dtype, device: torch.device,
                      p: float) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    noise = torch.empty(shape, dtype=dtype, device=device)
    if p == 1.0:
        return noise.zero_()
    noise.bernoulli_(1.0 - p, generator=gen)
    return noise.div_(1.0 - p)


@_dropout_noise_op.register_fake
def _(seed, shape, dtype, device, p):
    return torch.empty(shape, dtype=dtype, device=device)


@torch.library.custom_op("blockquant::seeded_dropout", mutates_args=())
def _seeded_dropout(t: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``t`` times the keep-mask of ``seed``: the forward on ``x`` and the backward on ``grad_out``.
    One op for both, so that a compiled graph cannot merge the two mask draws into one
    saved mask (its common-subexpression pass would for two identical noise calls)."""
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


# ----------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------

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
@torch.library.custom_op("blockquant::seeded_positions", mutates_args=())
def _seeded_positions(seed: torch.Tensor, numel: int, k: int, device: torch.device) -> torch.Tensor:
    """``k`` positions in ``[0, numel)`` drawn uniformly with replacement from ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
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


def _normalized_row_blocks(shape, config: QuantConfig) -> List[Tuple[int, int]]:
    """Row ranges in which :func:`_keep_normalized` normalises and compresses an input of ``shape``."""
    n = shape[0] if len(shape) else 1
    rows = (save_policy.rows_per_chunk(shape[1], config)
            if len(shape) == 2 and math.prod(shape) > save_policy.CHUNK_ELEMENTS else n)
    if rows >= n:
        return [(0, n)]
    return [(a, min(a + rows, n)) for a in range(0, n, rows)]


def square_estimator_nbytes(shape, config: QuantConfig, count: int, packed_nbytes) -> int:
    """Exact bytes of what a normalisation over ``count`` elements keeps, beside ``xn``, for
    the diagonal term of its input gradient (0 under nearest rounding); ``packed_nbytes(shape,
    config)`` is the codec's byte formula. Mirrors :func:`_keep_normalized`."""
    cfg = without_projection(config)
    if cfg.rounding != "stochastic":
        return 0
    form, param = _square_estimator_form(cfg, count)
    total = 0
    for a, b in _normalized_row_blocks(tuple(shape), cfg):
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


def _keep_normalized(ctx, x: torch.Tensor, normalize, config: QuantConfig, diagonal_count: Optional[int]):
    """How a normalisation keeps its input (:func:`~blockquant.save_policy.keep_for_ctx`): ``x`` by
    reference when resident (backward recomputes ``xn`` exactly), else :func:`_compressed_normalized`.
    Returns ``(tensors to save, state)``; sets ``ctx.bq_ref``."""
    return keep_for_ctx(ctx, x, config, instead=lambda: _compressed_normalized(
        x, normalize, without_projection(config), diagonal_count))


def _compressed_normalized(x: torch.Tensor, normalize, cfg: QuantConfig, diagonal_count: Optional[int]):
    """``xn = normalize(rows)`` compressed and, when ``diagonal_count`` is given (the input gradient
    in training is needed), an independent estimator of ``xn ** 2`` for the diagonal term
    (:func:`_square_estimator`). A large 2-D input is normalised and compressed one row block at a
    time (``normalize`` takes a slice of rows), so no full-size ``xn`` is ever formed."""
    estimate = diagonal_count is not None and cfg.rounding == "stochastic"
    bounds = _normalized_row_blocks(tuple(x.shape), cfg)
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
            out, save_mean, save_invstd, _ = torch.ops.aten._batch_norm_with_update(
                x, weight, bias, running_mean, running_var, momentum, eps)
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
                                              config, count if (need_x and training) else None)
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


# ----------------------------------------------------------------------------
# smooth activations: compressed input
# ----------------------------------------------------------------------------

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
