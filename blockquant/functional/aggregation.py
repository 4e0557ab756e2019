"""Aggregation over an adjacency (:func:`~blockquant.functional.aggregate`: sum, mean, max) and aggregation
followed by a linear map (:func:`~blockquant.functional.aggregate_linear`), with the sparse product
(the ``blockquant::csr_spmm`` custom op) and the chunked max they run on."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..adjacency import _CSR, Adjacency, _is_edge_index_type, as_adjacency
from ..config import QuantConfig
from .. import save_policy
from ..save_policy import keep_for_ctx
from ._common import _check_float, _config, _first_order_only, _untracked
from .linear_map import _keep_linear_operands


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
      * edge weights (``[E]``, by reference) when a gradient needs them; none when they are constant
        values cached with the graph (GCN's normalisation, :func:`~blockquant.adjacency.derived_adjacency`).
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
        # constant weights cached with the graph (GCN's normalisation) are read from the adjacency
        ctx.bq_weight_in_adj = weight is not None and adj.weights_are_graph_state
        if weight is not None and (need_x or need_w) and not ctx.bq_weight_in_adj:
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
        weight = adj.edge_weight if ctx.bq_weight_in_adj else (saved.pop(0) if ctx.bq_has_weight else None)
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
                values_t = adj._structure.weights_t(g.dtype) if ctx.bq_weight_in_adj else bwd.values(weight, g.dtype)
                grad_x = _spmm(bwd, values_t, g)
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
