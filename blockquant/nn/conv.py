"""Compressed drop-in versions of PyG's graph convolutions.

Each wrapper subclasses the PyG layer it replaces and is built with
``from_module`` around the very same Parameter objects. Its behaviour:

* ``eval()`` with gradients on: the original ``forward`` runs unchanged.
* gradients off (``torch.no_grad()``, evaluation): GCN, SAGE, GraphConv, GIN and
  GCN2 run the sparse path below and keep nothing, so evaluating a large graph
  never builds PyG's ``[E, F]`` message tensor (options or input shapes the sparse
  path does not handle run the original); GAT and GATv2 run the original.
* training: the output equals the original's up to floating-point summation
  order (aggregation is a sparse-dense product where PyG scatters messages;
  no ``[E, F]`` message tensor is ever built), and what autograd keeps for
  backward is compressed:

  - inputs of the linear maps go through :func:`blockquant.functional.linear`
    (block-wise low-bit codes, random projection when the config asks for it;
    a leaf input such as ``data.x`` is kept by reference);
  - aggregation over a constant adjacency goes through
    :func:`blockquant.functional.aggregate` (``A x`` forward, ``A^T g``
    backward over the graph's cached CSR) and keeps nothing of ``x``; a sum /
    mean aggregation followed by a linear map (SAGE's ``lin_l``, GraphConv's
    ``lin_rel``) goes through :func:`blockquant.functional.aggregate_linear`,
    which keeps ``x`` (shared with the root weight's copy), not the aggregate;
  - attention (GAT, GATv2) goes through :mod:`blockquant.attention`: the
    attention coefficients (``[E, heads]``) and LeakyReLU signs are kept
    exact (backward uses them non-linearly), only node features
    (``N x H x C``) are compressed, and no step builds an ``E x H x C`` tensor.
    Outputs equal the original's up to floating-point summation order.

Options a wrapper cannot honour are refused, never silently ignored:
:meth:`unsupported_reason` names the option (``convert()`` then leaves the
layer unconverted) and ``from_module`` raises ``ValueError`` with that text.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch_geometric.nn.aggr import MaxAggregation, MeanAggregation, SumAggregation
from torch_geometric.nn.conv import (GATConv, GATv2Conv, GCN2Conv, GCNConv, GINConv, GraphConv,
                                     MessagePassing, SAGEConv)
from torch_geometric.nn.conv.gcn_conv import gcn_norm
from torch_geometric.utils import add_self_loops, remove_self_loops

from .. import functional as BF
from ..adjacency import _is_edge_index_type, as_adjacency, derived_adjacency
from ..attention import attention_graph, gat_attention, gatv2_attention
from ..saved_hooks import compress_saved_tensors
from .registry import CompressedModule, lazy_reason, register_wrapper

__all__ = ["QGCNConv", "QSAGEConv", "QGATConv", "QGATv2Conv", "QGINConv", "QGraphConv", "QGCN2Conv"]

_AGGR_NAMES = {SumAggregation: "sum", MeanAggregation: "mean", MaxAggregation: "max"}

# Hook tables of MessagePassing; the compressed training path does not call
# ``propagate``/``message``/..., so registered hooks would silently not fire.
_HOOK_TABLES = ("_propagate_forward_pre_hooks", "_propagate_forward_hooks", "_message_forward_pre_hooks",
                "_message_forward_hooks", "_aggregate_forward_pre_hooks", "_aggregate_forward_hooks",
                "_message_and_aggregate_forward_pre_hooks", "_message_and_aggregate_forward_hooks")


def _is_torch_sparse_tensor_type(adj) -> bool:
    """A ``torch_sparse.SparseTensor`` (only possible when torch_sparse is installed)."""
    return type(adj).__name__ == "SparseTensor" and not isinstance(adj, Tensor)


def _reduce_of(module: MessagePassing) -> Optional[str]:
    """The aggregation as a reduce name blockquant supports, or None."""
    if not isinstance(module.aggr, str):
        return None
    return _AGGR_NAMES.get(type(module.aggr_module))


class _QConv(CompressedModule):
    """Shared behaviour of the PyG conv wrappers."""

    #: reduce names this wrapper accepts (subclasses narrow it where the operator needs one)
    _reduces: Tuple[str, ...] = ("sum", "mean", "max")

    @classmethod
    def unsupported_reason(cls, module: torch.nn.Module) -> Optional[str]:
        """Why ``module`` cannot be wrapped exactly, or None when every option it uses is supported."""
        if type(module) is not cls.wraps:
            return f"{cls.__name__} wraps exactly {cls.wraps.__name__}; got {type(module).__name__}"
        return cls._settings_reason(module)

    @classmethod
    def _settings_reason(cls, module) -> Optional[str]:
        lazy = lazy_reason(module)
        if lazy is not None:
            return lazy
        if module.flow != "source_to_target":
            return f"flow={module.flow!r} (only 'source_to_target' is supported)"
        reduce = _reduce_of(module)
        if reduce is None or reduce not in cls._reduces:
            allowed = ", ".join(repr(r) for r in cls._reduces)
            return f"aggr={module.aggr!r} (supported: {allowed})"
        if module.explain:
            return "explain=True (explainer masks need PyG's message path)"
        for table in _HOOK_TABLES:
            if getattr(module, table, None):
                return f"registered message-passing hooks ({table})"
        return cls._option_reason(module)

    @classmethod
    def _option_reason(cls, module) -> Optional[str]:
        return None

    def _bq_init(self) -> None:
        reason = type(self)._settings_reason(self)
        if reason is not None:
            raise ValueError(f"{type(self).__name__} cannot wrap this {self.wraps.__name__}: unsupported option "
                             f"{reason}. Leave the layer unconverted (blockquant.convert does so and reports it).")
        # PyG may have bound `propagate` to the original object (explain/decomposed_layers
        # setters); rebind such instance attributes to the wrapper.
        for name in ("propagate", "edge_updater"):
            bound = self.__dict__.get(name)
            if bound is not None and getattr(bound, "__self__", None) is not self:
                self.__dict__[name] = bound.__func__.__get__(self, type(self))
        self.bq_reduce = _reduce_of(self)

    def _runs_original(self, x) -> bool:
        """Whether ``forward`` runs the original PyG forward.

        Training compresses. In ``eval()`` with gradients on, the original runs (it
        saves exactly what PyG saves). With gradients off (``torch.no_grad()``,
        ``torch.inference_mode()``: evaluation, inference) the sparse path runs and
        keeps nothing, so it never builds the ``[E, F]`` message tensor that PyG's
        ``edge_index`` path does; the original still runs for an option or an input
        shape the sparse path does not handle.
        """
        if self.compressing():
            return False
        if torch.is_grad_enabled() or type(self)._settings_reason(self) is not None:
            return True
        x_src = x[0] if isinstance(x, (tuple, list)) else x
        return not (isinstance(x_src, Tensor) and x_src.dim() == 2)

    def _bq_check_runtime(self) -> None:
        """Settings can change after conversion (``conv.flow = ...``, ``conv.aggr_module = ...``,
        hooks, explain mode): honour what the compressed path supports, refuse the rest."""
        reason = type(self)._settings_reason(self)
        if reason is not None:
            raise RuntimeError(f"{type(self).__name__}: unsupported option {reason}, set after conversion: the "
                               "compressed training path cannot honour it. Set it back, or leave this layer exact "
                               "(blockquant.to_original(model), or convert again: convert() refuses the layer "
                               "and reports why); eval() runs the original forward.")
        self.bq_reduce = _reduce_of(self)

    def __repr__(self) -> str:
        # PyG convs define __repr__ themselves (extra_repr is not used): keep theirs,
        # with the original class name, and append the compression setting.
        text = super().__repr__()
        name = type(self).__name__
        if text.startswith(name):
            text = self.wraps.__name__ + text[len(name):]
        q = f"bq={self.bq_config.short()}"
        if text.endswith("()"):
            return f"{text[:-1]}{q})"
        if text.endswith(")"):
            return f"{text[:-1]}, {q})"
        return f"{text}({q})"

    # ------------------------------------------------------------------ helpers
    def _linear(self, x: Tensor, lin, bias: bool = True) -> Tensor:
        """``lin(x)`` for a PyG/torch Linear (or a wrapper of one) with the input saved compressed."""
        return BF.linear(x, self._weight_of(lin), lin.bias if bias else None, self.bq_config)

    def _weight_of(self, lin) -> Tensor:
        weight = lin.weight
        if isinstance(weight, torch.nn.parameter.UninitializedParameter):
            raise RuntimeError(f"{type(self).__name__}: lazy (in_channels=-1) weights must be initialised by one "
                               "forward pass before conversion")
        return weight

    def _adjacency(self, edge_index, x_src: Tensor, x_dst: Optional[Tensor], size=None,
                   edge_weight: Optional[Tensor] = None, use_sparse_values: bool = True):
        """An :class:`~blockquant.adjacency.Adjacency` sized as PyG's ``propagate`` sizes the graph.

        A sparse matrix (``[num_dst, num_src]``) and an ``EdgeIndex`` with a ``sparse_size``
        fix both sizes themselves (PyG ignores ``size`` for them); for ``edge_index``,
        ``size`` wins, then the feature counts, and the target count defaults to the source count.
        """
        if _is_torch_sparse_tensor_type(edge_index):
            adj = as_adjacency(edge_index)
            return adj if use_sparse_values else adj.with_weight(None)
        if isinstance(edge_index, Tensor) and edge_index.layout != torch.strided:
            # PyG's spmm multiplies by a torch.sparse matrix's values and ignores edge_weight
            return as_adjacency(edge_index)
        if _is_edge_index_type(edge_index):
            size = edge_index.sparse_size()
        sizes = [None, None] if size is None else list(size)
        for dim, feats in ((0, x_src), (1, x_dst)):
            if feats is None:
                continue
            if sizes[dim] is None:
                sizes[dim] = feats.size(0)
            elif sizes[dim] != feats.size(0):
                side = "source" if dim == 0 else "target"
                raise ValueError(f"{type(self).__name__}: the graph has {sizes[dim]} {side} nodes but the {side} "
                                 f"features have {feats.size(0)} rows; pass matching size/features")
        n_src = sizes[0]
        n_dst = sizes[1] if sizes[1] is not None else n_src
        return as_adjacency(edge_index, num_nodes=(n_src, n_dst), edge_weight=edge_weight)

    def _aggregate_pairs(self, x, edge_index, size, **adjacency_options):
        """SAGE/GraphConv/GIN: aggregate source features over the adjacency (keeps nothing
        of ``x``); returns the aggregate and the target features (``x`` may be a pair)."""
        x_src, x_dst, adj = self._source_adjacency(x, edge_index, size, **adjacency_options)
        return BF.aggregate(x_src, adj, self.bq_reduce, self.bq_config), x_dst

    def _source_adjacency(self, x, edge_index, size, **adjacency_options):
        self._bq_check_runtime()
        x_src, x_dst = (x, x) if isinstance(x, Tensor) else x
        self._check_2d(x_src, type(self).__name__)
        return x_src, x_dst, self._adjacency(edge_index, x_src, x_dst, size, **adjacency_options)

    def _aggregate_linear_pairs(self, x, edge_index, size, lin, **adjacency_options):
        """SAGE/GraphConv: ``lin(aggregate(x))`` and the target features. Sum / mean over a constant
        adjacency run as one :func:`~blockquant.functional.aggregate_linear`, which keeps only
        ``x`` (shared with the root weight's copy); max and learnable edge weights aggregate
        first and keep the aggregate for ``lin``."""
        x_src, x_dst, adj = self._source_adjacency(x, edge_index, size, **adjacency_options)
        weight_grad = adj.edge_weight is not None and adj.edge_weight.requires_grad
        if self.bq_reduce == "max" or weight_grad:
            return self._linear(BF.aggregate(x_src, adj, self.bq_reduce, self.bq_config), lin), x_dst
        return BF.aggregate_linear(x_src, adj, self._weight_of(lin), lin.bias, self.bq_reduce, self.bq_config), x_dst

    @staticmethod
    def _check_2d(x: Tensor, who: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{who} expects node features as a torch.Tensor; got {type(x).__name__}")
        if x.dim() == 3:
            raise ValueError(f"{who}: static-graph input of shape [batch, num_nodes, channels] {tuple(x.shape)} "
                             "is not supported in compressed training (eval() runs the original and accepts it); "
                             "give [batch * num_nodes, channels] with a block-diagonal edge_index "
                             "(torch_geometric.data.Batch), or leave this layer exact")
        if x.dim() != 2:
            raise ValueError(f"{who}: compressed training supports node features of shape [num_nodes, channels]; "
                             f"got shape {tuple(x.shape)}")


def _gcn_adjacency(self, x: Tensor, edge_index, edge_weight, improved: bool):
    """GCN/GCN2's normalised graph as an :class:`~blockquant.adjacency.Adjacency`, cached with the
    user's graph object when the layer does not cache it itself (``cached=False``, PyG's default):
    PyG normalises the same graph again in every layer of every step; here it is normalised once
    per graph object and options (rebuilt when the graph is modified in place, gone with it), and
    each step reuses its CSR. ``None`` when that cannot apply (``cached=True`` keeps PyG's own
    cache; edge weights given: normalised per call as PyG does)."""
    if self.cached or edge_weight is not None:
        return None
    if not (isinstance(edge_index, Tensor) or _is_torch_sparse_tensor_type(edge_index)):
        return None
    if torch.compiler.is_compiling():
        return _gcn_adjacency_outside_the_graph(edge_index, x.size(self.node_dim), improved, self.add_self_loops,
                                                self.flow, x.dtype)
    return _gcn_derived(edge_index, x.size(self.node_dim), improved, self.add_self_loops, self.flow, x.dtype)


def _gcn_derived(edge_index, num_nodes: int, improved: bool, add_loops: bool, flow: str, dtype):
    def build():
        normalized = gcn_norm(edge_index, None, num_nodes, improved, add_loops, flow, dtype)
        graph, weight = normalized if isinstance(normalized, tuple) else (normalized, None)  # SparseTensor: alone
        dense_index = isinstance(graph, Tensor) and graph.layout == torch.strided and not _is_edge_index_type(graph)
        return graph, weight, num_nodes if dense_index else None

    return derived_adjacency(edge_index, ("gcn_norm", num_nodes, improved, add_loops, flow, dtype), build)


@torch.compiler.disable
def _gcn_adjacency_outside_the_graph(*args):
    """Under ``torch.compile``: the cache lookup (a weak dictionary keyed on the graph's identity) runs
    eagerly, one graph break, in place of PyG's normalisation and the CSR lookup."""
    adj = _gcn_derived(*args)
    adj._structure.weights_t(adj.edge_weight.dtype)  # the transpose and its weights, built now for the backward
    return adj


def _gcn_normalized(self, x: Tensor, edge_index, edge_weight, improved: bool):
    """GCN/GCN2 symmetric normalisation, with the originals' caching, as the originals do it."""
    if isinstance(edge_index, Tensor):
        cache = self._cached_edge_index
        if cache is None:
            edge_index, edge_weight = gcn_norm(edge_index, edge_weight, x.size(self.node_dim), improved,
                                               self.add_self_loops, self.flow, x.dtype)
            if self.cached:
                self._cached_edge_index = (edge_index, edge_weight)
        else:
            edge_index, edge_weight = cache[0], cache[1]
    elif _is_torch_sparse_tensor_type(edge_index):
        cache = self._cached_adj_t
        if cache is None:
            edge_index = gcn_norm(edge_index, edge_weight, x.size(self.node_dim), improved,
                                  self.add_self_loops, self.flow, x.dtype)
            if self.cached:
                self._cached_adj_t = edge_index
        else:
            edge_index = cache
    return edge_index, edge_weight


# ============================================================================ GCN
@register_wrapper(GCNConv)
class QGCNConv(_QConv, GCNConv):
    """:class:`~torch_geometric.nn.conv.GCNConv` with compressed saved activations.

    Training saves ``x`` compressed for the weight gradient (or by reference
    when it is a leaf, e.g. ``data.x``) and nothing else of the features: the
    normalised aggregation is linear in ``x`` with a constant adjacency.
    Supports ``improved``, ``cached``, ``add_self_loops``, ``normalize``,
    ``bias``, edge weights and every adjacency form GCNConv takes.
    Refuses ``aggr`` other than ``"add"``/``"sum"`` and ``flow="target_to_source"``.

    Operator: ``X' = D^-1/2 (A + I) D^-1/2 X W`` (PyG's GCNConv, same Parameters).

    Saved for backward (bytes per element at the default config: 4 bits plus bf16 metadata per 1024 elements):
      * ``x``, compressed: ``[N, in_channels]`` at 0.504 B per element (0 B when resident, e.g. ``data.x``);
      * the aggregation: nothing of the features (the cached CSR); with learnable edge weights also
        ``x W`` compressed, ``[N, out_channels]`` at 0.504 B per element.
    """

    _reduces = ("sum",)

    def forward(self, x: Tensor, edge_index, edge_weight: Optional[Tensor] = None) -> Tensor:
        if self._runs_original(x):
            return GCNConv.forward(self, x, edge_index, edge_weight)
        self._bq_check_runtime()
        if isinstance(x, (tuple, list)):
            return GCNConv.forward(self, x, edge_index, edge_weight)  # raises PyG's own error
        self._check_2d(x, "QGCNConv")
        adj = _gcn_adjacency(self, x, edge_index, edge_weight, self.improved) if self.normalize else None
        if self.normalize and adj is None:
            edge_index, edge_weight = _gcn_normalized(self, x, edge_index, edge_weight, self.improved)
        h = self._linear(x, self.lin, bias=False)
        if adj is None:
            adj = self._adjacency(edge_index, h, None, edge_weight=edge_weight)
        out = BF.aggregate(h, adj, "sum", self.bq_config)
        if self.bias is not None:
            out = out + self.bias
        return out


# ============================================================================ SAGE
@register_wrapper(SAGEConv)
class QSAGEConv(_QConv, SAGEConv):
    """:class:`~torch_geometric.nn.conv.SAGEConv` with compressed saved activations.

    With ``mean``/``sum``, ``lin_l(aggr(x))`` runs as one
    :func:`~blockquant.functional.aggregate_linear`: its gradients are linear in
    ``x``, so the aggregate is never kept; ``x`` is kept once, compressed and
    shared by ``lin_l`` and ``lin_r`` (by reference when ``x`` is resident, e.g.
    ``data.x``: then both weight gradients are exact). With ``max`` the
    aggregation keeps the winning edge per output element (integers) and
    ``lin_l`` keeps the aggregate compressed. ``normalize=True`` runs the L2 normalisation under
    :func:`~blockquant.compress_saved_tensors`, which keeps what it saves exact
    (its backward is not linear in it).
    Supports ``aggr`` in ``"mean"``, ``"sum"``/``"add"``, ``"max"`` (as a string
    or the plain Mean/Sum/MaxAggregation object), ``normalize``, ``root_weight``,
    ``bias``, bipartite input and ``size``. Refuses ``project=True``, other
    aggregations (lists, LSTM, learnable ones) and ``flow="target_to_source"``.

    Operator: ``x_i' = W_1 x_i + W_2 aggr_(j in N(i)) x_j`` (PyG's SAGEConv, same Parameters).

    Saved for backward (bytes per element at the default config: 4 bits plus bf16 metadata per 1024 elements):
      * ``x`` for ``lin_l`` and ``lin_r``, compressed once: ``[N, in_channels]`` at 0.504 B per element (0 B when
        resident); nothing of the ``mean``/``sum`` aggregate;
      * ``max`` aggregation: the winning edge, int32 (4 B per element of ``[N, in_channels]``), and the aggregate
        for ``lin_l``, compressed: ``[N, in_channels]`` at 0.504 B per element;
      * ``normalize=True``: what the L2 normalisation saves, exact (4 B per float32 element).
    """

    @classmethod
    def _option_reason(cls, module) -> Optional[str]:
        if module.project:
            return "project=True (the projection before aggregation is not supported)"
        return None

    def forward(self, x, edge_index, size=None) -> Tensor:
        if self._runs_original(x):
            return SAGEConv.forward(self, x, edge_index, size)
        out, x_dst = self._aggregate_linear_pairs(x, edge_index, size, self.lin_l, use_sparse_values=False)
        if self.root_weight and x_dst is not None:
            out = out + self._linear(x_dst, self.lin_r, bias=False)
        if self.normalize:
            with compress_saved_tensors(self.bq_config):
                out = torch.nn.functional.normalize(out, p=2., dim=-1)
        return out


# ============================================================================ GraphConv
@register_wrapper(GraphConv)
class QGraphConv(_QConv, GraphConv):
    """:class:`~torch_geometric.nn.conv.GraphConv` with compressed saved activations.

    With ``add``/``mean`` over a constant adjacency, ``lin_rel(aggr(x))`` runs as
    one :func:`~blockquant.functional.aggregate_linear`, which keeps only ``x``
    (compressed once and shared with ``lin_root``; by reference when resident),
    never the aggregate. With ``max`` or learnable edge weights the aggregation
    runs first (keeping the winning edges, or ``x`` compressed for the edge
    weights' gradient) and ``lin_rel`` keeps the aggregate compressed.
    Supports ``aggr`` in ``"add"``/``"sum"``, ``"mean"``, ``"max"``, ``bias``,
    edge weights, bipartite input and ``size``. Refuses other aggregations
    and ``flow="target_to_source"``.

    Operator: ``x_i' = W_1 x_i + W_2 aggr_(j in N(i)) e_ji x_j`` (PyG's GraphConv, same Parameters).

    Saved for backward (bytes per element at the default config: 4 bits plus bf16 metadata per 1024 elements):
      * ``x`` for ``lin_rel`` and ``lin_root``, compressed once: ``[N, in_channels]`` at 0.504 B per element (0 B
        when resident); constant edge weights by reference;
      * ``max`` aggregation or learnable edge weights: also the aggregate for ``lin_rel``, compressed (0.504 B per
        element); learnable edge weights: ``x`` compressed once more without projection for their gradient
        (0.504 B per element); ``max``: the winning edge, int32 (4 B per element of ``[N, in_channels]``).
    """

    def forward(self, x, edge_index, edge_weight: Optional[Tensor] = None, size=None) -> Tensor:
        if self._runs_original(x):
            return GraphConv.forward(self, x, edge_index, edge_weight, size)
        out, x_dst = self._aggregate_linear_pairs(x, edge_index, size, self.lin_rel, edge_weight=edge_weight)
        if x_dst is not None:
            out = out + self._linear(x_dst, self.lin_root, bias=False)
        return out


# ============================================================================ GIN
@register_wrapper(GINConv)
class QGINConv(_QConv, GINConv):
    """:class:`~torch_geometric.nn.conv.GINConv` with compressed saved activations.

    Handles the aggregation (keeps nothing of ``x``) and the ``(1 + eps) x``
    term (keeps ``x`` compressed only when ``eps`` is trainable). The inner
    ``nn`` is called as is: its layers are ordinary submodules that
    :func:`blockquant.convert` converts on their own.
    Supports ``aggr`` in ``"add"``/``"sum"``, ``"mean"``, ``"max"``, ``eps``,
    ``train_eps``, bipartite input and ``size``. Refuses other aggregations and
    ``flow="target_to_source"``.

    Operator: ``x_i' = h((1 + eps) x_i + sum_(j in N(i)) x_j)`` (PyG's GINConv, same Parameters).

    Saved for backward (bytes per element at the default config: 4 bits plus bf16 metadata per 1024 elements):
      * the aggregation: nothing of ``x`` (``max``: the winning edge, int32, 4 B per element);
      * ``train_eps=True``: ``x`` compressed for ``eps``'s gradient, 0.504 B per element at the default config (0 B
        when resident);
      * ``h``: what its own (converted) layers save.
    """

    bq_convert_children = ("nn",)  # the MLP is ordinary modules: convert() swaps them

    def forward(self, x, edge_index, size=None) -> Tensor:
        if self._runs_original(x):
            return GINConv.forward(self, x, edge_index, size)
        out, x_dst = self._aggregate_pairs(x, edge_index, size, use_sparse_values=False)
        if x_dst is not None:
            if self.eps.requires_grad:
                with compress_saved_tensors(self.bq_config):
                    out = out + (1 + self.eps) * x_dst
            else:
                out = out + (1 + self.eps) * x_dst
        return self.nn(out)


# ============================================================================ GCN2
@register_wrapper(GCN2Conv)
class QGCN2Conv(_QConv, GCN2Conv):
    """:class:`~torch_geometric.nn.conv.GCN2Conv` with compressed saved activations.

    The normalised aggregation keeps nothing of ``x``; the two ``addmm``
    calls keep their matrix inputs compressed (the weight gradient needs
    them). Supports ``alpha``, ``theta``/``layer``, ``shared_weights``,
    ``cached``, ``add_self_loops``, ``normalize`` and edge weights. Refuses
    ``aggr`` other than ``"add"``/``"sum"`` and ``flow="target_to_source"``.

    Operator: ``X' = ((1 - alpha) P X + alpha X_0) ((1 - beta) I + beta W)`` with ``P`` the normalised
    adjacency (PyG's GCN2Conv, same Parameters).

    Saved for backward (bytes per element at the default config: 4 bits plus bf16 metadata per 1024 elements):
      * the aggregation: nothing of ``x``;
      * each ``addmm``'s matrix input, compressed: ``[N, channels]`` at 0.504 B per element (one or two of them).
    """

    _reduces = ("sum",)

    def forward(self, x: Tensor, x_0: Tensor, edge_index, edge_weight: Optional[Tensor] = None) -> Tensor:
        if self._runs_original(x):
            return GCN2Conv.forward(self, x, x_0, edge_index, edge_weight)
        self._bq_check_runtime()
        self._check_2d(x, "QGCN2Conv")
        adj = _gcn_adjacency(self, x, edge_index, edge_weight, False) if self.normalize else None
        if self.normalize and adj is None:
            edge_index, edge_weight = _gcn_normalized(self, x, edge_index, edge_weight, False)
        if adj is None:
            adj = self._adjacency(edge_index, x, None, edge_weight=edge_weight)
        h = BF.aggregate(x, adj, "sum", self.bq_config)
        h = h * (1 - self.alpha)
        x_0 = self.alpha * x_0[:h.size(0)]
        cfg = self.bq_config
        # min_numel=0: the addmm input is the one big activation here, always compress it
        with compress_saved_tensors(cfg, min_numel=0):
            if self.weight2 is None:
                out = h + x_0
                out = torch.addmm(out, out, self.weight1, beta=1. - self.beta, alpha=self.beta)
            else:
                out = torch.addmm(h, h, self.weight1, beta=1. - self.beta, alpha=self.beta)
                out = out + torch.addmm(x_0, x_0, self.weight2, beta=1. - self.beta, alpha=self.beta)
        return out


# ============================================================================ GAT / GATv2
def _gat_self_loops(self, edge_index, edge_attr, num_nodes: int):
    """GAT/GATv2's self-loop handling, as the originals do it (a CSC matrix, which PyG's
    loop helpers refuse, is first converted to CSR)."""
    if isinstance(edge_index, Tensor):
        if edge_index.layout == torch.sparse_csc:
            edge_index = edge_index.to_sparse_csr()
        if edge_index.layout != torch.strided and edge_attr is not None:
            raise ValueError(f"{type(self).__name__}: edge_attr with add_self_loops=True needs an edge_index "
                             f"adjacency; got a {edge_index.layout} matrix (PyG's self-loop helpers refuse it too)")
        edge_index, edge_attr = remove_self_loops(edge_index, edge_attr)
        edge_index, edge_attr = add_self_loops(edge_index, edge_attr, fill_value=self.fill_value,
                                               num_nodes=num_nodes)
    elif _is_torch_sparse_tensor_type(edge_index):
        if self.edge_dim is None:
            import torch_sparse  # only reachable when torch_sparse is installed

            edge_index = torch_sparse.set_diag(edge_index)
        else:
            raise NotImplementedError("The usage of 'edge_attr' and 'add_self_loops' simultaneously is currently "
                                      "not yet supported for 'edge_index' in a 'SparseTensor' form")
    return edge_index, edge_attr


def _attention_adjacency(self, edge_index, edge_attr, num_src: int, num_dst: int, loop_nodes: int):
    """The graph GAT/GATv2 attend over (self loops added when the layer asks for them), cached
    per adjacency object, and ``edge_attr`` in its edge order (``[E, edge_dim]`` or None)."""
    if not (isinstance(edge_index, Tensor) or _is_torch_sparse_tensor_type(edge_index)):
        raise TypeError(f"{type(self).__name__} expects edge_index as a LongTensor [2, E], a torch.sparse "
                        f"matrix or an EdgeIndex; got {type(edge_index).__name__}")
    if edge_attr is not None:
        given = edge_index.size(-1) if isinstance(edge_index, Tensor) and edge_index.layout == torch.strided \
            else as_adjacency(edge_index, num_nodes=(num_src, num_dst)).num_edges
        if edge_attr.size(0) != given:
            raise ValueError(f"{type(self).__name__}: edge_attr has {edge_attr.size(0)} rows for {given} edges")
    if self.add_self_loops:
        if edge_attr is not None:
            looped, edge_attr = _gat_self_loops(self, edge_index, edge_attr, loop_nodes)
            form = looped
        else:
            def form():
                return _gat_self_loops(self, edge_index, None, loop_nodes)[0]
        graph = attention_graph(form, num_src, num_dst, key=edge_index, variant=("self_loops", loop_nodes))
    else:
        graph = attention_graph(edge_index, num_src, num_dst)
    if edge_attr is not None and edge_attr.dim() == 1:
        edge_attr = edge_attr.view(-1, 1)
    return graph, edge_attr


def _num_dst(num_src: int, x_dst: Optional[Tensor], edge_index, size) -> int:
    if isinstance(edge_index, Tensor) and edge_index.layout != torch.strided:
        return edge_index.size(0)
    if _is_torch_sparse_tensor_type(edge_index):
        return edge_index.sparse_size(0)
    if size is not None and size[1] is not None:
        return size[1]
    return x_dst.size(0) if x_dst is not None else num_src


def _att_folded(lin_weight: Tensor, att: Tensor) -> Tensor:
    """``W_att[h] = sum_c att[h, c] W[h * C + c]`` (``[H, in]``), so that
    ``(lin(x).view(-1, H, C) * att).sum(-1) == x @ W_att^T`` up to summation order."""
    heads, channels = att.shape[-2:]
    return (lin_weight.view(heads, channels, -1) * att.view(heads, channels, 1)).sum(1)


def _check_attention_input(self, x) -> Tuple[Tensor, Optional[Tensor]]:
    who = type(self).__name__
    if isinstance(x, Tensor):
        self._check_2d(x, who)
        return x, x
    if not isinstance(x, (tuple, list)) or len(x) != 2:
        raise TypeError(f"{who} expects x as a Tensor [N, F] or a (x_src, x_dst) pair; got {type(x).__name__}")
    self._check_2d(x[0], who)
    if x[1] is not None:
        self._check_2d(x[1], who)
    return x[0], x[1]


@register_wrapper(GATConv)
class QGATConv(_QConv, GATConv):
    """:class:`~torch_geometric.nn.conv.GATConv` with compressed saved activations.

    Attention runs through :func:`blockquant.attention.gat_attention`: the
    attention coefficients (``[E, heads]``) and the LeakyReLU signs (1 bit per
    edge and head) are kept exact, the transformed source features
    (``N x heads x channels``) compressed, and no step builds an
    ``[E, heads * channels]`` tensor. The node scores
    ``(lin(x).view(-1, H, C) * att).sum(-1)`` are computed as ``x @ W_att^T``
    with ``W_att`` folded from ``lin.weight`` and ``att`` (equal up to summation
    order), so they reuse the compression of ``x`` that ``lin`` keeps, and
    ``lin_edge`` is folded the same way (``edge_attr @ W_edge_att^T``, ``[E, heads]``).
    ``lin``/``lin_src``/``lin_dst``/``res`` keep their inputs compressed.
    Outputs equal GATConv's up to floating-point summation order; attention
    dropout draws its mask from blockquant's seeded stream (not PyG's RNG
    calls), and returned attention weights carry no gradient.
    Supports ``heads``, ``concat``, ``negative_slope``, ``dropout``,
    ``add_self_loops``, ``edge_dim``/``edge_attr``, ``fill_value``, ``bias``,
    ``residual``, bipartite input, ``size``, ``return_attention_weights`` and
    every adjacency form (``edge_index``, ``EdgeIndex``, torch.sparse COO/CSR/CSC).
    Refuses ``aggr`` other than ``"add"``/``"sum"`` and ``flow="target_to_source"``.

    Operator: ``x_i' = sum_(j in N(i) + i) alpha_ij W x_j`` with
    ``alpha_ij = softmax_j(leaky_relu(a_s . W x_j + a_t . W x_i))`` (PyG's GATConv, same Parameters).

    Saved for backward (bytes per element at the default config: 4 bits plus bf16 metadata per 1024 elements):
      * ``lin``'s input ``x``, compressed: ``[N, in_channels]`` at 0.504 B per element (0 B when resident);
      * the transformed source features, compressed: ``[N, heads * out_channels]`` at 0.504 B per element;
      * the attention coefficients, exact: 4 B per edge and head; the LeakyReLU signs: 1 bit per edge and head.
    """

    _reduces = ("sum",)

    def forward(self, x, edge_index, edge_attr: Optional[Tensor] = None, size=None,
                return_attention_weights: Optional[bool] = None):
        if not self.compressing():
            return GATConv.forward(self, x, edge_index, edge_attr, size, return_attention_weights)
        self._bq_check_runtime()
        H, C = self.heads, self.out_channels
        cfg = self.bq_config
        x_src_in, x_dst_in = _check_attention_input(self, x)
        res = self._linear(x_dst_in, self.res, bias=False) if (self.res is not None and x_dst_in is not None) \
            else None
        lin_s = self.lin if self.lin is not None else self.lin_src
        lin_d = self.lin if self.lin is not None else self.lin_dst
        x_src = self._linear(x_src_in, lin_s, bias=False).view(-1, H, C)
        score_src = BF.linear(x_src_in, _att_folded(lin_s.weight, self.att_src), None, cfg)
        score_dst = None
        if x_dst_in is not None:
            score_dst = BF.linear(x_dst_in, _att_folded(lin_d.weight, self.att_dst), None, cfg)
        num_src = x_src.size(0)
        num_dst = _num_dst(num_src, x_dst_in, edge_index, size)
        loop_nodes = num_src if x_dst_in is None else min(num_src, x_dst_in.size(0))
        loop_nodes = min(size) if size is not None else loop_nodes
        graph, edge_attr = _attention_adjacency(self, edge_index, edge_attr, num_src, num_dst, loop_nodes)
        score_edge = None
        if edge_attr is not None and self.lin_edge is not None:
            score_edge = torch.nn.functional.linear(edge_attr, _att_folded(self.lin_edge.weight, self.att_edge))
        result = gat_attention(x_src, score_src, score_dst, graph, score_edge=score_edge,
                               negative_slope=self.negative_slope, dropout=self.dropout, training=self.training,
                               config=cfg, return_weights=bool(return_attention_weights))
        return _finish_attention(self, result, res, edge_index, loop_nodes, return_attention_weights)


def _finish_attention(self, result, res: Optional[Tensor], edge_index, loop_nodes: int, return_attention_weights):
    """GAT/GATv2 after aggregation: merge heads, add the residual and bias, attach weights."""
    out, alpha = result if return_attention_weights else (result, None)
    out = out.reshape(-1, self.heads * self.out_channels) if self.concat else out.mean(dim=1)
    if res is not None:
        out = out + res
    if self.bias is not None:
        out = out + self.bias
    if not return_attention_weights:
        return out
    if self.add_self_loops:
        edge_index = _gat_self_loops(self, edge_index, None, loop_nodes)[0]
    return _with_attention(out, edge_index, alpha, return_attention_weights)


def _with_attention(out, edge_index, alpha, return_attention_weights):
    if not return_attention_weights:
        return out
    from torch_geometric.utils import is_torch_sparse_tensor
    from torch_geometric.utils.sparse import set_sparse_value

    if isinstance(edge_index, Tensor):
        if is_torch_sparse_tensor(edge_index):
            return out, (set_sparse_value(edge_index, alpha), alpha)
        return out, (edge_index, alpha)
    return out, edge_index.set_value(alpha, layout="coo")


@register_wrapper(GATv2Conv)
class QGATv2Conv(_QConv, GATv2Conv):
    """:class:`~torch_geometric.nn.conv.GATv2Conv` with compressed saved activations.

    Attention runs through :func:`blockquant.attention.gatv2_attention`: the
    per-edge scores ``att . leaky_relu(x_l[src] + x_r[dst] (+ lin_edge(edge_attr)))``
    are computed over chunks of edges, never as one ``[E, heads, channels]``
    tensor; backward keeps the attention coefficients (``[E, heads]``) exact,
    the LeakyReLU signs as a 1-bit mask per edge, head and channel, ``x_l``
    compressed for the score gradient and an independent compression of
    ``x_l``/``x_r`` for ``att``'s gradient.
    ``lin_l``/``lin_r``/``res`` keep their inputs compressed.
    Outputs equal GATv2Conv's up to floating-point summation order; attention
    dropout draws its mask from blockquant's seeded stream, and returned
    attention weights carry no gradient.
    Supports ``heads``, ``concat``, ``negative_slope``, ``dropout``,
    ``add_self_loops``, ``edge_dim``/``edge_attr``, ``fill_value``, ``bias``,
    ``share_weights``, ``residual``, bipartite input,
    ``return_attention_weights`` and every adjacency form. Refuses ``aggr``
    other than ``"add"``/``"sum"`` and ``flow="target_to_source"``.

    Operator: ``x_i' = sum_(j in N(i) + i) alpha_ij W_s x_j`` with
    ``alpha_ij = softmax_j(a . leaky_relu(W_s x_j + W_t x_i))`` (PyG's GATv2Conv, same Parameters).

    Saved for backward (bytes per element at the default config: 4 bits plus bf16 metadata per 1024 elements):
      * ``lin_l``/``lin_r``'s input ``x``, compressed: ``[N, in_channels]`` at 0.504 B per element (0 B when resident);
      * ``x_l`` compressed for the score gradient and ``x_l``/``x_r`` compressed independently for ``att``'s
        gradient: ``[N, heads * out_channels]`` at 0.504 B per element each;
      * the attention coefficients, exact: 4 B per edge and head; the LeakyReLU signs: 1 bit per edge, head
        and channel.
    """

    _reduces = ("sum",)

    def forward(self, x, edge_index, edge_attr: Optional[Tensor] = None,
                return_attention_weights: Optional[bool] = None):
        if not self.compressing():
            return GATv2Conv.forward(self, x, edge_index, edge_attr, return_attention_weights)
        self._bq_check_runtime()
        H, C = self.heads, self.out_channels
        x_l_in, x_r_in = _check_attention_input(self, x)
        if x_r_in is None:
            raise ValueError("QGATv2Conv: target node features must not be None (GATv2 scores x_i + x_j)")
        res = self._linear(x_r_in, self.res, bias=False) if self.res is not None else None
        x_l = self._linear(x_l_in, self.lin_l).view(-1, H, C)
        if isinstance(x, Tensor) and self.share_weights:
            x_r = x_l
        else:
            x_r = self._linear(x_r_in, self.lin_r).view(-1, H, C)
        if edge_attr is not None and self.lin_edge is None:
            raise ValueError("QGATv2Conv: edge_attr was given but the layer has no edge_dim (lin_edge is None)")
        num_src = x_l.size(0)
        num_dst = _num_dst(num_src, x_r, edge_index, None)
        loop_nodes = min(num_src, x_r.size(0))
        graph, edge_attr = _attention_adjacency(self, edge_index, edge_attr, num_src, num_dst, loop_nodes)
        lin_edge_weight = self.lin_edge.weight if edge_attr is not None else None
        result = gatv2_attention(x_l, x_r, self.att, graph, edge_attr=edge_attr, lin_edge_weight=lin_edge_weight,
                                 negative_slope=self.negative_slope, dropout=self.dropout, training=self.training,
                                 config=self.bq_config, return_weights=bool(return_attention_weights))
        return _finish_attention(self, result, res, edge_index, loop_nodes, return_attention_weights)
