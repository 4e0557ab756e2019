"""Graph attention (GAT, GATv2) with exact attention scalars and compressed node features.

One autograd Function per attention kind computes, from per-edge scores,
the edge softmax over each target's incoming edges, the optional dropout of
the coefficients and the attention-weighted aggregation, and its backward.

The unbiasedness rule: a stochastically rounded tensor may enter backward
only linearly. Here that means:

* kept **exact**: the attention coefficients ``alpha`` (``[E, heads]``, the
  softmax output; the softmax backward multiplies by it), what fixes the
  sign of every LeakyReLU argument (GAT: the per-node scores, ``[N, heads]``;
  GATv2: a 1-bit mask per edge, head and channel), and the dropout mask as
  one seed;
* kept **compressed**: node features (``[N, heads * channels]``), which
  backward uses only in ``<g[dst_e], x[src_e]>`` (the score gradient) and in
  GATv2's ``sum_e gs_e * leaky_relu(z_e)`` with the sign known, both linear
  in the features. Where backward multiplies two quantities that both come
  from a compressed tensor, each comes from its own independent compression.

Memory: no step allocates an ``[E, heads * channels]`` tensor. The
aggregation runs one sparse-dense product per head (``torch.sparse`` CSR,
values ``alpha[:, h]``); the softmax, its backward, the score gradient and
GATv2's per-edge scores run over chunks of edges (whole targets per chunk for
the softmax; at most :func:`~blockquant.save_policy.chunk_elements` elements per
per-edge feature transient).

The graph is held as an :class:`AttentionGraph` (edges sorted by target and a
permutation sorting them by source): a view of the graph's one cached structure
(:mod:`blockquant.adjacency`), built once per adjacency object and reused while
that object lives unchanged.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor

from blockquant.kernels import native_ops
from blockquant.kernels.bitmask import BitMask, pack_bits, unpack_bits

from .adjacency import _Structure, as_adjacency, derived_adjacency, quiet_sparse_warnings
from .config import QuantConfig
from .functional.masked import _dropout_noise
from .save_policy import chunk_elements, keep
from .packed import draw_seed_tensor

__all__ = ["AttentionGraph", "attention_graph", "gat_attention", "gatv2_attention"]

#: A chunk of edges also stays within ``max(N * F, 64 Ki)`` elements, so on small graphs it is
#: never larger than a node-feature tensor.
_MIN_CHUNK_ELEMENTS = 1 << 16


class AttentionGraph:
    """A graph's edges sorted by target, ready for per-head sparse products: a view of the graph's
    one cached structure (the CSR that aggregation over the same graph uses as well), plus the
    pieces only attention needs, built once per graph and kept with it.

    Attributes:
        num_src, num_dst, num_edges: sizes.
        order: ``[E]`` position in the caller's edge order of each target-sorted
            edge, or ``None`` when the caller's order is already sorted by target.
        crow: ``[num_dst + 1]`` CSR row pointers over the sorted edges.
        src, dst: ``[E]`` source and target of each sorted edge.
        t_order: ``[E]`` sorted-edge position of each edge in source order
            (stable), ``t_crow``: ``[num_src + 1]`` its row pointers.

    Index tensors are int32 below 2^31 nodes and edges (int64 above).
    """

    __slots__ = ("num_src", "num_dst", "num_edges", "order", "crow", "src", "dst", "t_order", "t_crow",
                 "_structure", "__weakref__")

    def __init__(self, structure: _Structure):
        fwd = structure.fwd
        self._structure = structure
        self.num_src, self.num_dst, self.num_edges = fwd.num_cols, fwd.num_rows, fwd.num_edges
        self.order, self.crow, self.src = fwd.perm, fwd.rowptr, fwd.col
        self.dst = structure.dst()
        self.t_crow, self.t_order = structure.transpose_order()

    def target_chunks(self, edges: int):
        """``[(a, b, da, db), ...]``: consecutive sorted-edge ranges ``[a, b)`` holding all the
        incoming edges of targets ``[da, db)``, about ``edges`` edges each (one target with
        more incoming edges gets a chunk of its own). Computed once per size and graph from one
        host copy of the row pointers: using them never reads the device."""
        return self._structure.target_chunks(edges)

    def _index_tensors(self) -> Tuple[Tensor, ...]:
        return tuple(t for t in (self.order, self.crow, self.src, self.dst, self.t_order, self.t_crow)
                     if t is not None)

    def tensors(self) -> Tuple[Tensor, ...]:
        """The tensors this graph keeps alive for a step (read by :func:`blockquant.track_saved`): none
        while it is cached for a graph the caller keeps (graph state for that graph's lifetime, like
        the adjacency's CSR, :meth:`blockquant.adjacency.Adjacency.tensors`); all of them otherwise."""
        if self._structure.owned_by_a_live_graph():
            return ()
        return self._index_tensors()

    @property
    def nbytes(self) -> int:
        """Bytes of the index tensors, cached or not."""
        return sum(t.numel() * t.element_size() for t in self._index_tensors())

    def to_sorted(self, per_edge: Tensor) -> Tensor:
        """Rows of a ``[E, ...]`` tensor in the caller's edge order, reordered by target."""
        return per_edge if self.order is None else per_edge.index_select(0, self.order)

    def to_caller(self, per_edge: Tensor) -> Tensor:
        """Inverse of :meth:`to_sorted`."""
        if self.order is None:
            return per_edge
        return torch.empty_like(per_edge).index_copy_(0, self.order.long(), per_edge)

    def __repr__(self) -> str:
        return (f"AttentionGraph(num_src={self.num_src}, num_dst={self.num_dst}, num_edges={self.num_edges}, "
                f"nbytes={self.nbytes})")


def _view(structure: _Structure) -> AttentionGraph:
    """The :class:`AttentionGraph` of a structure: the same object while one is alive (the structure
    refers to it weakly, so the two do not keep each other alive; what it needs is kept on the structure)."""
    graph = structure._attention() if structure._attention is not None else None
    if graph is None:
        graph = AttentionGraph(structure)
        structure._attention = weakref.ref(graph)
    return graph


def attention_graph(adjacency, num_src: int, num_dst: int, *, key=None, variant=None) -> AttentionGraph:
    """The :class:`AttentionGraph` of ``adjacency`` (any form :func:`blockquant.as_adjacency`
    accepts; edges keep its order), cached with the graph's structure.

    ``key`` (default: ``adjacency``) is the object the cache entry is tied to. A wrapper
    that derives the graph from a user's adjacency (adding self loops, say) passes the
    user's object as ``key``, a hashable ``variant`` naming the derivation, and as
    ``adjacency`` a zero-argument callable that derives it (called only on a cache miss;
    :func:`blockquant.adjacency.derived_adjacency`).
    An entry is rebuilt when the key tensor is changed in place (its ``_version``
    moves) and dies with the key object.
    """
    if torch.compiler.is_compiling():
        return _attention_graph_outside_the_graph(adjacency, num_src, num_dst, key=key, variant=variant)
    return _attention_graph(adjacency, num_src, num_dst, key=key, variant=variant)


@torch.compiler.disable
def _attention_graph_outside_the_graph(adjacency, num_src: int, num_dst: int, *, key=None,
                                       variant=None) -> AttentionGraph:
    """:func:`attention_graph` under ``torch.compile``: one graph break per call. The cache is keyed
    on the graph object's identity (a weak dictionary dynamo cannot trace) and building the sorted
    edges is data-dependent; done eagerly, once per graph, the compiled graph gets fixed-size tensors."""
    return _attention_graph(adjacency, num_src, num_dst, key=key, variant=variant)


def _attention_graph(adjacency, num_src: int, num_dst: int, *, key=None, variant=None) -> AttentionGraph:
    sizes = (int(num_src), int(num_dst))
    if key is None and variant is None:
        adj = as_adjacency(adjacency, num_nodes=sizes)
    else:
        key = adjacency if key is None else key
        derive = adjacency if callable(adjacency) and not isinstance(adjacency, Tensor) else (lambda: adjacency)
        try:
            adj = derived_adjacency(key, ("attention", variant), sizes, derive)
        except TypeError:  # a key that is not weak-referenceable: no caching
            adj = as_adjacency(derive(), num_nodes=sizes)
    if (adj.num_src, adj.num_dst) != sizes:
        raise ValueError(f"attention: the adjacency is {adj.num_dst} x {adj.num_src} (targets x sources) but the "
                         f"features give {num_dst} targets and {num_src} sources")
    return _view(adj._structure)


# ----------------------------------------------------------------------------
# per-edge building blocks (no autograd; all per-edge tensors are [E, H])
# ----------------------------------------------------------------------------

def _chunk_edges(graph: AttentionGraph, width: int) -> int:
    width = max(width, 1)
    budget = min(chunk_elements(graph.src.device), max(max(graph.num_src, graph.num_dst) * width, _MIN_CHUNK_ELEMENTS))
    # a multiple of 8, so chunked 1-bit masks start on byte boundaries
    return max(8, (budget // width) // 8 * 8)


def _target_chunks(graph: AttentionGraph, heads: int):
    if torch.compiler.is_compiling():
        return _target_chunks_outside_the_graph(graph, _chunk_edges(graph, heads))
    return graph.target_chunks(_chunk_edges(graph, heads))


@torch.compiler.disable
def _target_chunks_outside_the_graph(graph: AttentionGraph, edges: int):
    # the chunk bounds are data-dependent Python ints (from the graph's host copy of its row
    # pointers): computed eagerly and cached on the graph; the compiled code specialises on them
    return graph.target_chunks(edges)


def _segments(graph: AttentionGraph, a: int, b: int, da: int, db: int) -> Tuple[Tensor, Tensor]:
    """Offsets of targets ``[da, db)`` within their edge chunk ``[a, b)``, and each edge's local
    target index (device tensors: the bounds are the host's, never read back)."""
    offsets = graph.crow[da:db + 1].long() - a
    local = graph.dst[a:b] - da
    return offsets, local


def _segment_sum(values: Tensor, offsets: Tensor) -> Tensor:
    return torch.segment_reduce(values, "sum", offsets=offsets, axis=0, unsafe=True)


def _softmax_chunk_(s: Tensor, offsets: Tensor, local: Tensor) -> Tensor:
    """In place: softmax of a chunk's ``[c, H]`` scores over each target's incoming edges
    (as ``torch_geometric.utils.softmax``: max-shifted, ``+1e-16`` in the denominator)."""
    smax = torch.segment_reduce(s, "max", offsets=offsets, axis=0, unsafe=True)
    s.sub_(smax.index_select(0, local)).exp_()
    return s.div_(_segment_sum(s, offsets).add_(1e-16).index_select(0, local))


def _softmax_backward_chunk(alpha: Tensor, grad_alpha: Tensor, offsets: Tensor, local: Tensor) -> Tensor:
    """``d s = alpha * (d alpha - sum_{e' -> same target} alpha_e' d alpha_e')``, linear in ``grad_alpha``."""
    weighted = alpha * grad_alpha
    return weighted.sub_(alpha * _segment_sum(weighted, offsets).index_select(0, local))


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape) -> Tensor:
    with quiet_sparse_warnings():
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _aggregate_heads(graph: AttentionGraph, alpha: Tensor, x: Tensor) -> Tensor:
    """``out[j, h] = sum_{e: i -> j} alpha[e, h] * x[i, h]``: one sparse-dense product per head (on CPU
    with the compiled ops, all heads in one pass over the graph)."""
    if x.dim() == 3 and native_ops.heads_applies(graph.crow, graph.src, alpha, x):
        return native_ops.heads_spmm(graph.crow, graph.src, None, alpha, x, graph.num_dst)
    out = x.new_empty((graph.num_dst,) + tuple(x.shape[1:]))
    for h in range(x.size(1)):
        a = _csr(graph.crow, graph.src, alpha[:, h].contiguous(), (graph.num_dst, graph.num_src))
        out[:, h] = torch.sparse.mm(a, x[:, h])
    return out


def _aggregate_heads_t(graph: AttentionGraph, alpha: Tensor, g: Tensor) -> Tensor:
    """The transpose: ``grad_x[i, h] = sum_{e: i -> j} alpha[e, h] * g[j, h]``."""
    dst_t = graph.dst.index_select(0, graph.t_order)
    out = g.new_empty((graph.num_src,) + tuple(g.shape[1:]))
    for h in range(g.size(1)):
        values = alpha[:, h].index_select(0, graph.t_order)
        a = _csr(graph.t_crow, dst_t, values, (graph.num_src, graph.num_dst))
        out[:, h] = torch.sparse.mm(a, g[:, h])
    return out


def _sampled_dot(graph: AttentionGraph, g: Tensor, x: Tensor, a: int, b: int) -> Tensor:
    """``out[e, h] = <g[dst_e, h, :], x[src_e, h, :]>`` for sorted edges ``[a, b)`` (``[b - a, H]``),
    gathering at most :func:`_chunk_edges` edges' features at a time (on CPU with the compiled ops,
    gathering nothing)."""
    if g.dim() == 3 and native_ops.heads_applies(graph.src, graph.dst, g, x):
        return native_ops.heads_sddmm(graph.src, graph.dst, g, x, a, b)
    heads = g.size(1)
    width = g[0].numel() if g.size(0) else heads
    g2, x2 = g.reshape(g.size(0), width), x.reshape(x.size(0), width)
    out = g.new_empty((b - a, heads))
    step = _chunk_edges(graph, width)
    for lo in range(a, b, step):
        hi = min(lo + step, b)
        prod = g2.index_select(0, graph.dst[lo:hi])
        prod.mul_(x2.index_select(0, graph.src[lo:hi]))
        torch.sum(prod.view(hi - lo, heads, -1), dim=-1, out=out[lo - a:hi - a])
    return out


def _load(kept) -> Tensor:
    """A tensor kept by :func:`~blockquant.save_policy.keep`, decoded if it was compressed."""
    return kept if isinstance(kept, Tensor) else kept.dequantize()


class _DropMask:
    """Attention dropout: the scaled keep-mask of target chunk ``k`` regenerated from ``seed + k``."""

    def __init__(self, p: float):
        self.p = p
        self.seed = draw_seed_tensor("dropout") if p > 0 else None

    def chunk(self, like: Tensor, k: int) -> Optional[Tensor]:
        if self.seed is None:
            return None
        return _dropout_noise(like, self.p, self.seed + k)

    def apply(self, graph: AttentionGraph, alpha: Tensor) -> Tensor:
        """``alpha`` with dropout (``alpha`` itself when ``p == 0``)."""
        if self.seed is None:
            return alpha
        out = torch.empty_like(alpha)
        for k, (a, b, _, _) in enumerate(_target_chunks(graph, alpha.size(1))):
            torch.mul(alpha[a:b], self.chunk(alpha[a:b], k), out=out[a:b])
        return out


def _outputs(ctx, graph: AttentionGraph, out: Tensor, alpha_d: Tensor, return_weights: bool):
    if not return_weights:
        return out
    weights = graph.to_caller(alpha_d)
    ctx.mark_non_differentiable(weights)
    return out, weights


def _check_graph(graph, num_src: int, num_dst: int, who: str) -> None:
    if not isinstance(graph, AttentionGraph):
        raise TypeError(f"{who} expects graph to be an AttentionGraph (see blockquant.attention.attention_graph); "
                        f"got {type(graph).__name__}")
    if (graph.num_src, graph.num_dst) != (num_src, num_dst):
        raise ValueError(f"{who}: the graph has {graph.num_src} sources and {graph.num_dst} targets; the features "
                         f"give {num_src} sources and {num_dst} targets")


# ----------------------------------------------------------------------------
# GAT
# ----------------------------------------------------------------------------

class _GATAttention(torch.autograd.Function):
    """GAT attention from per-node (and per-edge) scores; see :func:`gat_attention`."""

    @staticmethod
    def forward(ctx, x_src, score_src, score_dst, score_edge, graph: AttentionGraph, negative_slope: float,
                p: float, config: QuantConfig, return_weights: bool):
        need_x, need_ss, need_sd, need_se = ctx.needs_input_grad[:4]
        heads = x_src.size(1)
        alpha = x_src.new_empty((graph.num_edges, heads))
        for a, b, da, db in _target_chunks(graph, heads):
            s = _gat_scores(graph, score_src, score_dst, score_edge, negative_slope, a, b)
            _softmax_chunk_(s, *_segments(graph, a, b, da, db))
            alpha[a:b] = s
            del s
        drop = _DropMask(p)
        alpha_d = drop.apply(graph, alpha)
        out = _aggregate_heads(graph, alpha_d, x_src)
        ctx.bq_graph, ctx.bq_slope, ctx.bq_drop = graph, negative_slope, drop
        ctx.bq_state = ()
        ctx.bq_x = None  # x_src compressed, when not kept by reference
        if need_ss or need_sd or need_se:
            kept = keep(x_src, config, projection=False)
            refs = []
            if isinstance(kept, Tensor):
                refs.append(kept)
            else:
                ctx.bq_x = kept
                ctx.bq_state = (kept,)
            # the scores are kept exact: backward recomputes the LeakyReLU signs from them
            ctx.save_for_backward(alpha, score_src, score_dst, score_edge, *refs)
        elif need_x:
            ctx.save_for_backward(alpha)
        return _outputs(ctx, graph, out, alpha_d, return_weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *_grad_weights):
        need_x, need_ss, need_sd, need_se = ctx.needs_input_grad[:4]
        graph: AttentionGraph = ctx.bq_graph
        drop: _DropMask = ctx.bq_drop
        grads = [None] * 9
        saved = ctx.saved_tensors
        g = grad_out.contiguous()
        alpha = saved[0].to(g.dtype)
        if need_x:
            grads[0] = _aggregate_heads_t(graph, drop.apply(graph, alpha), g)
        if not (need_ss or need_sd or need_se):
            return tuple(grads)
        score_src, score_dst, score_edge = saved[1:4]
        x = (saved[4] if ctx.bq_x is None else ctx.bq_x.dequantize()).to(g.dtype)
        heads = alpha.size(1)
        grad_ss = g.new_zeros((graph.num_src, heads)) if need_ss else None
        grad_sd = g.new_empty((graph.num_dst, heads)) if need_sd else None
        grad_se = g.new_empty((graph.num_edges, heads)) if need_se else None
        for k, (a, b, da, db) in enumerate(_target_chunks(graph, heads)):
            offsets, local = _segments(graph, a, b, da, db)
            grad_alpha = _sampled_dot(graph, g, x, a, b)  # linear in the compressed x
            noise = drop.chunk(grad_alpha, k)
            if noise is not None:
                grad_alpha.mul_(noise)
            gs = _softmax_backward_chunk(alpha[a:b], grad_alpha, offsets, local)
            del grad_alpha
            positive = _gat_scores(graph, score_src, score_dst, score_edge, None, a, b) > 0  # exact signs
            gs = torch.where(positive, gs, gs * ctx.bq_slope)
            if need_ss:
                grad_ss.index_add_(0, graph.src[a:b], gs)
            if need_sd:
                grad_sd[da:db] = _segment_sum(gs, offsets)
            if need_se:
                grad_se[a:b] = gs
        grads[1], grads[2] = grad_ss, grad_sd
        grads[3] = graph.to_caller(grad_se) if need_se else None
        return tuple(grads)


def _gat_scores(graph: AttentionGraph, score_src: Tensor, score_dst: Optional[Tensor], score_edge: Optional[Tensor],
                negative_slope: Optional[float], a: int, b: int) -> Tensor:
    """``leaky_relu(score_src[src] + score_dst[dst] + score_edge)`` for sorted edges ``[a, b)``
    (before the LeakyReLU when ``negative_slope`` is None); the same operations in forward and
    backward, so the signs backward recomputes are the forward's."""
    s = score_src.index_select(0, graph.src[a:b])
    if score_dst is not None:
        s.add_(score_dst.index_select(0, graph.dst[a:b]))
    if score_edge is not None:
        s.add_(score_edge[a:b] if graph.order is None else score_edge.index_select(0, graph.order[a:b]))
    if negative_slope is not None:
        torch.nn.functional.leaky_relu(s, negative_slope, inplace=True)
    return s


def gat_attention(x_src: Tensor, score_src: Tensor, score_dst: Optional[Tensor], graph: AttentionGraph, *,
                  score_edge: Optional[Tensor] = None, negative_slope: float = 0.2, dropout: float = 0.0,
                  training: bool = True, config: Optional[QuantConfig] = None,
                  return_weights: bool = False):
    """GAT attention and aggregation (``GATConv``'s ``edge_update`` + ``propagate``)::

        s_e     = leaky_relu(score_src[src_e] + score_dst[dst_e] + score_edge[e])   # [E, H]
        alpha   = softmax of s over the incoming edges of each target
        alpha_d = dropout(alpha, dropout)                                           # in training
        out[j]  = sum_{e: i -> j} alpha_d[e, h] * x_src[i, h, :]                   # [N_dst, H, C]

    Args:
        x_src: ``[N_src, H, C]`` source features (the values aggregated).
        score_src, score_dst: ``[N_src, H]`` and ``[N_dst, H]`` per-node scores (``score_dst`` may be None).
        graph: an :class:`AttentionGraph` (``attention_graph(edge_index, N_src, N_dst)``).
        score_edge: optional ``[E, H]`` per-edge score term, in the graph's edge order.
        dropout: drop probability of the attention coefficients (applied when ``training``);
            the mask comes from its own seeded stream (like :func:`blockquant.functional.dropout`).
        config: codec for ``x_src`` (random projection is not used here).

    Returns: ``out``, or ``(out, alpha_d)`` with ``return_weights``; ``alpha_d``
    (``[E, H]``, the graph's edge order, after dropout) carries no gradient.

    Saves for backward (only what the requested gradients need):
      * ``alpha`` exact (``[E, H]``, 4 B per edge and head in fp32): the softmax
        backward multiplies by it, and the input gradient aggregates with it;
      * ``score_src``, ``score_dst`` exact (``[N, H]``) and ``score_edge`` exact
        (``[E, H]``, only when given): backward recomputes the LeakyReLU signs from them;
      * the dropout seed (no tensor);
      * ``x_src`` compressed (or by reference when resident) only for the score
        gradients: they use it in ``<g[dst_e], x_src[src_e]>``, linear in ``x_src``;
      * the graph (shared by every layer using it).

    Transients: ``[E, H]`` tensors (the coefficients with dropout, one head's
    values at a time), ``[N, H, C]`` tensors, and chunks of edges bounded by
    :func:`~blockquant.save_policy.chunk_elements`; never ``[E, H, C]``.
    """
    who = "blockquant.attention.gat_attention"
    for name, t in (("x_src", x_src), ("score_src", score_src)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{who} expects {name} to be a floating torch.Tensor; got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if x_src.dim() != 3:
        raise ValueError(f"{who} expects x_src of shape [N_src, heads, channels]; got {tuple(x_src.shape)}")
    heads = x_src.size(1)
    num_dst = graph.num_dst if isinstance(graph, AttentionGraph) else -1
    _check_graph(graph, x_src.size(0), num_dst, who)
    _check_shape(score_src, (x_src.size(0), heads), "score_src", who)
    if score_dst is not None:
        _check_shape(score_dst, (graph.num_dst, heads), "score_dst", who)
    if score_edge is not None:
        _check_shape(score_edge, (graph.num_edges, heads), "score_edge", who)
    config = QuantConfig.resolve(config, who)
    p = float(dropout) if training else 0.0
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{who}: dropout must be in [0, 1]; got {dropout}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x_src, score_src, score_dst, score_edge)):
        return _GATAttention.apply(x_src, score_src, score_dst, score_edge, graph, float(negative_slope), p, config,
                                   bool(return_weights))
    with torch.no_grad():
        return _GATAttention.forward(_Untracked(), x_src, score_src, score_dst, score_edge, graph,
                                     float(negative_slope), p, config, bool(return_weights))


def _check_shape(t: Tensor, shape, name: str, who: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{who}: {name} must have shape {list(shape)}; got {list(t.shape)}")


class _Untracked:
    """ctx stand-in when no graph is recorded: nothing is saved."""

    needs_input_grad = (False,) * 12

    def save_for_backward(self, *tensors) -> None:
        pass

    def mark_non_differentiable(self, *tensors) -> None:
        pass


# ----------------------------------------------------------------------------
# GATv2
# ----------------------------------------------------------------------------

def _gatv2_z(graph: AttentionGraph, x_l: Tensor, x_r: Tensor, edge_attr: Optional[Tensor],
             w_edge: Optional[Tensor], a: int, b: int) -> Tensor:
    """``z_e = x_l[src_e] + x_r[dst_e] (+ edge_attr_e W_edge^T)`` for sorted edges ``a:b`` (``[b-a, H, C]``)."""
    z = x_l.index_select(0, graph.src[a:b])
    z.add_(x_r.index_select(0, graph.dst[a:b]))
    if w_edge is not None:
        ea = edge_attr[a:b] if graph.order is None else edge_attr.index_select(0, graph.order[a:b])
        z.add_(torch.nn.functional.linear(ea.to(z.dtype), w_edge.to(z.dtype)).view_as(z))
    return z


class _GATv2Attention(torch.autograd.Function):
    """GATv2 attention from per-edge features; see :func:`gatv2_attention`."""

    @staticmethod
    def forward(ctx, x_l, x_r, att, edge_attr, w_edge, graph: AttentionGraph, negative_slope: float, p: float,
                config: QuantConfig, return_weights: bool):
        need_l, need_r, need_att, need_ea, need_we = ctx.needs_input_grad[:5]
        num_e = graph.num_edges
        heads, channels = x_l.shape[1:]
        width = heads * channels
        need_scores = need_l or need_r or need_att or need_ea or need_we
        att_hc = att.reshape(heads, channels)
        scores = x_l.new_empty((num_e, heads))
        mask = torch.empty(math.ceil(num_e * width / 8) if need_scores else 0, dtype=torch.uint8,
                           device=x_l.device)
        step = _chunk_edges(graph, width)
        for a in range(0, num_e, step):
            b = min(a + step, num_e)
            z = _gatv2_z(graph, x_l, x_r, edge_attr, w_edge, a, b)
            if need_scores:
                packed = pack_bits(z > 0)
                mask[a * width // 8:a * width // 8 + packed.numel()] = packed
            torch.nn.functional.leaky_relu(z, negative_slope, inplace=True)
            torch.sum(z.mul_(att_hc), dim=-1, out=scores[a:b])
            del z
        alpha = scores  # softmax in place, chunk by chunk
        for a, b, da, db in _target_chunks(graph, heads):
            _softmax_chunk_(alpha[a:b], *_segments(graph, a, b, da, db))
        drop = _DropMask(p)
        alpha_d = drop.apply(graph, alpha)
        out = _aggregate_heads(graph, alpha_d, x_l)
        ctx.bq_graph, ctx.bq_drop = graph, drop
        ctx.bq_slope = negative_slope
        ctx.bq_shape = (heads, channels)
        ctx.bq_has = (edge_attr is not None, w_edge is not None)
        ctx.bq_same_lr = x_r is x_l
        ctx.bq_state = ()
        ctx.bq_kept = ()
        if need_scores:
            # [0]: x_l for <g[dst], x_l[src]> (the score gradient); [1], [2]: x_l and x_r for z in
            # att's gradient, compressed independently of [0]: that gradient multiplies the score
            # gradient (linear in [0]) by z, and a product of two roundings of one tensor is biased
            kept = [keep(x_l, config, projection=False)]
            if need_att:
                kept.append(keep(x_l, config, projection=False, shared=False))
                if not ctx.bq_same_lr:
                    kept.append(keep(x_r, config, projection=False, shared=False))
            ctx.bq_kept = tuple(None if isinstance(k, Tensor) else k for k in kept)
            ctx.bq_state = (BitMask(mask, (num_e, heads, channels)),) + tuple(k for k in ctx.bq_kept if k is not None)
            refs = [k for k in kept if isinstance(k, Tensor)]
            ctx.save_for_backward(alpha, att, edge_attr, w_edge, *refs)
        else:
            ctx.save_for_backward(alpha)
        return _outputs(ctx, graph, out, alpha_d, return_weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *_grad_weights):
        need_l, need_r, need_att, need_ea, need_we = ctx.needs_input_grad[:5]
        graph: AttentionGraph = ctx.bq_graph
        grads = [None] * 10
        if not (need_l or need_r or need_att or need_ea or need_we):
            return tuple(grads)
        saved = list(ctx.saved_tensors)
        g = grad_out.contiguous()
        alpha = saved[0].to(g.dtype)
        drop: _DropMask = ctx.bq_drop
        grad_l = _aggregate_heads_t(graph, drop.apply(graph, alpha), g) if need_l else None
        att, edge_attr, w_edge = saved[1:4]
        refs = iter(saved[4:])
        kept = [next(refs) if k is None else k for k in ctx.bq_kept]
        values = _load(kept[0]).to(g.dtype)
        heads, channels = ctx.bq_shape
        gs = torch.empty_like(alpha)  # d score, [E, H]
        for k, (a, b, da, db) in enumerate(_target_chunks(graph, heads)):
            grad_alpha = _sampled_dot(graph, g, values, a, b)  # linear in the compressed x_l
            noise = drop.chunk(grad_alpha, k)
            if noise is not None:
                grad_alpha.mul_(noise)
            gs[a:b] = _softmax_backward_chunk(alpha[a:b], grad_alpha, *_segments(graph, a, b, da, db))
        del values, alpha
        width = heads * channels
        att_hc = att.reshape(heads, channels).to(g.dtype)
        z_l = z_r = None
        if need_att:
            z_l = _load(kept[1]).to(g.dtype)
            z_r = z_l if ctx.bq_same_lr else _load(kept[2]).to(g.dtype)
        grad_r = g.new_zeros((graph.num_dst, heads, channels)) if need_r else None
        if need_l and grad_l is None:
            grad_l = g.new_zeros((graph.num_src, heads, channels))
        grad_att = g.new_zeros((heads, channels)) if need_att else None
        grad_we = torch.zeros_like(w_edge, dtype=g.dtype) if need_we else None
        grad_ea = torch.zeros_like(edge_attr, dtype=g.dtype) if need_ea else None
        mask: BitMask = ctx.bq_state[0]
        slope = ctx.bq_slope
        step = _chunk_edges(graph, width)
        for a in range(0, graph.num_edges, step):
            b = min(a + step, graph.num_edges)
            byte0 = a * width // 8
            positive = unpack_bits(mask.payload[byte0:byte0 + math.ceil((b - a) * width / 8)],
                                   (b - a) * width).view(b - a, heads, channels)
            factor = torch.where(positive, g.new_ones(()), g.new_full((), slope))
            gs_c = gs[a:b].unsqueeze(-1)
            if need_att:
                z = _gatv2_z(graph, z_l, z_r, edge_attr, w_edge, a, b)
                grad_att.add_((z.mul_(factor).mul_(gs_c)).sum(0))  # sum_e gs_e * leaky_relu(z_e)
                del z
            grad_z = factor.mul_(gs_c).mul_(att_hc)  # [b-a, H, C]
            if grad_l is not None:
                grad_l.index_add_(0, graph.src[a:b], grad_z)
            if grad_r is not None:
                grad_r.index_add_(0, graph.dst[a:b], grad_z)
            if need_we or need_ea:
                rows = torch.arange(a, b, device=g.device) if graph.order is None else graph.order[a:b].long()
                gz2 = grad_z.view(b - a, width)
                if need_we:
                    grad_we.add_(gz2.t().mm(edge_attr.index_select(0, rows).to(g.dtype)))
                if need_ea:
                    grad_ea.index_copy_(0, rows, gz2.mm(w_edge.to(g.dtype)))
        grads[:5] = [grad_l if need_l else None, grad_r, grad_att.view_as(att) if need_att else None,
                     grad_ea, grad_we]
        return tuple(grads)


def gatv2_attention(x_l: Tensor, x_r: Tensor, att: Tensor, graph: AttentionGraph, *,
                    edge_attr: Optional[Tensor] = None, lin_edge_weight: Optional[Tensor] = None,
                    negative_slope: float = 0.2, dropout: float = 0.0, training: bool = True,
                    config: Optional[QuantConfig] = None, return_weights: bool = False):
    """GATv2 attention and aggregation (``GATv2Conv``'s ``edge_update`` + ``propagate``)::

        z_e     = x_l[src_e] + x_r[dst_e] + edge_attr_e @ lin_edge_weight^T             # [E, H, C], per chunk
        s_e     = sum_c att[h, c] * leaky_relu(z_e)[h, c]                            # [E, H]
        alpha   = softmax of s over the incoming edges of each target; alpha_d = dropout(alpha)
        out[j]  = sum_{e: i -> j} alpha_d[e, h] * x_l[i, h, :]                       # [N_dst, H, C]

    Args:
        x_l: ``[N_src, H, C]``; x_r: ``[N_dst, H, C]`` (may be ``x_l`` itself, shared weights).
        att: ``[1, H, C]`` or ``[H, C]``.
        graph: an :class:`AttentionGraph`.
        edge_attr: optional ``[E, D]`` edge features in the graph's edge order, with
            ``lin_edge_weight`` ``[H * C, D]`` (``lin_edge.weight``; no bias).
        dropout, training, config: as in :func:`gat_attention`.

    Returns: ``out``, or ``(out, alpha_d)`` with ``return_weights``, as :func:`gat_attention`.

    Saves for backward (only what the requested gradients need):
      * ``alpha`` exact (``[E, H]``);
      * the sign of every LeakyReLU argument ``z``, 1 bit per edge, head and
        channel (``E * H * C / 8`` bytes: cheaper than keeping ``x_l``, ``x_r`` exact
        while the mean in-degree is below about 58 (int2) or 52 (int4));
      * the dropout seed (no tensor);
      * ``x_l`` compressed for the score gradient ``<g[dst_e], x_l[src_e]>``;
      * for ``att``'s gradient ``sum_e gs_e * leaky_relu(z_e)`` (``z`` rebuilt per
        chunk, its sign from the mask): a second, independent compression of
        ``x_l`` and one of ``x_r`` (one when they are the same tensor);
      * ``att``, ``edge_attr`` and ``lin_edge_weight`` by reference.

      Resident inputs are kept by reference instead of compressed.
    """
    who = "blockquant.attention.gatv2_attention"
    for name, t in (("x_l", x_l), ("x_r", x_r), ("att", att)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{who} expects {name} to be a floating torch.Tensor; got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if x_l.dim() != 3 or x_r.dim() != 3 or x_l.shape[1:] != x_r.shape[1:]:
        raise ValueError(f"{who} expects x_l [N_src, heads, channels] and x_r [N_dst, heads, channels]; got "
                         f"{tuple(x_l.shape)} and {tuple(x_r.shape)}")
    heads, channels = x_l.shape[1:]
    _check_graph(graph, x_l.size(0), x_r.size(0), who)
    if att.numel() != heads * channels:
        raise ValueError(f"{who}: att must have {heads} x {channels} elements; got shape {tuple(att.shape)}")
    if (edge_attr is None) != (lin_edge_weight is None):
        raise ValueError(f"{who}: edge_attr and lin_edge_weight go together; got only one of them")
    if edge_attr is not None:
        if edge_attr.dim() != 2 or edge_attr.size(0) != graph.num_edges:
            raise ValueError(f"{who}: edge_attr must have shape [{graph.num_edges}, edge_dim]; got "
                             f"{tuple(edge_attr.shape)}")
        _check_shape(lin_edge_weight, (heads * channels, edge_attr.size(1)), "lin_edge_weight", who)
    config = QuantConfig.resolve(config, who)
    p = float(dropout) if training else 0.0
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{who}: dropout must be in [0, 1]; got {dropout}")
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                              for t in (x_l, x_r, att, edge_attr, lin_edge_weight))
    if not tracked:
        with torch.no_grad():
            return _GATv2Attention.forward(_Untracked(), x_l, x_r, att, edge_attr, lin_edge_weight, graph,
                                           float(negative_slope), p, config, bool(return_weights))
    return _GATv2Attention.apply(x_l, x_r, att, edge_attr, lin_edge_weight, graph, float(negative_slope), p, config,
                                 bool(return_weights))
