"""Compressed drop-in versions of PyG's graph convolutions.

Each wrapper subclasses the PyG layer it replaces and is built with
``from_module`` around the very same Parameter objects. Its behaviour:

* ``eval()`` or gradients disabled: the original ``forward`` runs unchanged.
* training: the output is computed by the same sequence of floating-point
  operations as the original (bit-identical for ``edge_index`` input, and up
  to summation order for sparse matrices), but what autograd keeps for
  backward is compressed:

  - inputs of the linear maps go through :func:`blockquant.functional.linear`
    (block-wise low-bit codes, random projection when the config asks for it;
    a leaf input such as ``data.x`` is kept by reference);
  - aggregation over a constant adjacency goes through
    :func:`blockquant.functional.aggregate` and keeps nothing of ``x``;
  - attention (GAT, GATv2) runs PyG's own attention code under
    :func:`blockquant.saved_hooks.compress_saved_tensors`, so the tensors the
    attention-parameter gradients need are kept compressed (dropout masks at
    1 bit), and GAT's weighted aggregation keeps the node features
    (``N x H x C``) compressed instead of the edge messages (``E x H x C``).

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
from torch_geometric.typing import SparseTensor
from torch_geometric.utils import add_self_loops, remove_self_loops, softmax

from .. import functional as BF
from ..adjacency import as_adjacency
from ..saved_hooks import compress_saved_tensors
from .registry import CompressedModule, lazy_reason, register_wrapper

__all__ = ["QGCNConv", "QSAGEConv", "QGATConv", "QGATv2Conv", "QGINConv", "QGraphConv", "QGCN2Conv"]

_AGGR_NAMES = {SumAggregation: "sum", MeanAggregation: "mean", MaxAggregation: "max"}

# Hook tables of MessagePassing; the compressed training path does not call
# ``propagate``/``message``/..., so registered hooks would silently not fire.
_HOOK_TABLES = ("_propagate_forward_pre_hooks", "_propagate_forward_hooks", "_message_forward_pre_hooks",
                "_message_forward_hooks", "_aggregate_forward_pre_hooks", "_aggregate_forward_hooks",
                "_message_and_aggregate_forward_pre_hooks", "_message_and_aggregate_forward_hooks")
# GAT/GATv2 do call PyG's ``edge_updater`` and ``propagate`` (inside the hooks
# context), but message hooks would see per-head pieces, so refuse those too.


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
        weight = lin.weight
        if isinstance(weight, torch.nn.parameter.UninitializedParameter):
            raise RuntimeError(f"{type(self).__name__}: lazy (in_channels=-1) weights must be initialised by one "
                               "forward pass before conversion")
        return BF.linear(x, weight, lin.bias if bias else None, self.bq_config)

    def _adjacency(self, edge_index, x_src: Tensor, x_dst: Optional[Tensor], size=None,
                   edge_weight: Optional[Tensor] = None, use_sparse_values: bool = True):
        """An :class:`~blockquant.adjacency.Adjacency` matching how PyG's propagate reads ``edge_index``."""
        if _is_torch_sparse_tensor_type(edge_index):
            adj = as_adjacency(edge_index)
            return adj if use_sparse_values else adj.with_weight(None)
        if isinstance(edge_index, Tensor) and edge_index.layout != torch.strided:
            # PyG's spmm multiplies by a torch.sparse matrix's values and ignores edge_weight
            return as_adjacency(edge_index)
        n_src = x_src.size(0)
        n_dst = x_dst.size(0) if x_dst is not None else n_src
        if size is not None:
            n_src = size[0] if size[0] is not None else n_src
            n_dst = size[1] if size[1] is not None else n_dst
        return as_adjacency(edge_index, num_nodes=(n_src, n_dst), edge_weight=edge_weight)

    def _aggregate_pairs(self, x, edge_index, size, **adjacency_options):
        """SAGE/GraphConv/GIN: aggregate source features over the adjacency (keeps nothing
        of ``x``); returns the aggregate and the target features (``x`` may be a pair)."""
        self._bq_check_runtime()
        x_src, x_dst = (x, x) if isinstance(x, Tensor) else x
        self._check_2d(x_src, type(self).__name__)
        adj = self._adjacency(edge_index, x_src, x_dst, size, **adjacency_options)
        return BF.aggregate(x_src, adj, self.bq_reduce, self.bq_config), x_dst

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
    """

    _reduces = ("sum",)

    def forward(self, x: Tensor, edge_index, edge_weight: Optional[Tensor] = None) -> Tensor:
        if not self.compressing():
            return GCNConv.forward(self, x, edge_index, edge_weight)
        self._bq_check_runtime()
        if isinstance(x, (tuple, list)):
            return GCNConv.forward(self, x, edge_index, edge_weight)  # raises PyG's own error
        self._check_2d(x, "QGCNConv")
        if self.normalize:
            edge_index, edge_weight = _gcn_normalized(self, x, edge_index, edge_weight, self.improved)
        h = self._linear(x, self.lin, bias=False)
        adj = self._adjacency(edge_index, h, None, edge_weight=edge_weight)
        out = BF.aggregate(h, adj, "sum", self.bq_config)
        if self.bias is not None:
            out = out + self.bias
        return out


# ============================================================================ SAGE
@register_wrapper(SAGEConv)
class QSAGEConv(_QConv, SAGEConv):
    """:class:`~torch_geometric.nn.conv.SAGEConv` with compressed saved activations.

    The neighbour aggregation keeps nothing of ``x`` (``mean``/``sum``) or the
    winning edge per output element (``max``, integers); ``lin_l`` keeps the
    aggregate compressed and ``lin_r`` keeps ``x`` compressed (by reference when
    ``x`` is a leaf). ``normalize=True`` runs the L2 normalisation under
    :func:`~blockquant.compress_saved_tensors`, which keeps what it saves exact
    (its backward is not linear in it).
    Supports ``aggr`` in ``"mean"``, ``"sum"``/``"add"``, ``"max"`` (as a string
    or the plain Mean/Sum/MaxAggregation object), ``normalize``, ``root_weight``,
    ``bias``, bipartite input and ``size``. Refuses ``project=True``, other
    aggregations (lists, LSTM, learnable ones) and ``flow="target_to_source"``.
    """

    @classmethod
    def _option_reason(cls, module) -> Optional[str]:
        if module.project:
            return "project=True (the projection before aggregation is not supported)"
        return None

    def forward(self, x, edge_index, size=None) -> Tensor:
        if not self.compressing():
            return SAGEConv.forward(self, x, edge_index, size)
        out, x_dst = self._aggregate_pairs(x, edge_index, size, use_sparse_values=False)
        out = self._linear(out, self.lin_l)
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

    Aggregation over a constant adjacency keeps nothing of ``x``; with
    learnable edge weights it keeps ``x`` compressed for their gradient.
    ``lin_rel`` and ``lin_root`` keep their inputs compressed.
    Supports ``aggr`` in ``"add"``/``"sum"``, ``"mean"``, ``"max"``, ``bias``,
    edge weights, bipartite input and ``size``. Refuses other aggregations
    and ``flow="target_to_source"``.
    """

    def forward(self, x, edge_index, edge_weight: Optional[Tensor] = None, size=None) -> Tensor:
        if not self.compressing():
            return GraphConv.forward(self, x, edge_index, edge_weight, size)
        out, x_dst = self._aggregate_pairs(x, edge_index, size, edge_weight=edge_weight)
        out = self._linear(out, self.lin_rel)
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
    """

    bq_convert_children = ("nn",)  # the MLP is ordinary modules: convert() swaps them

    def forward(self, x, edge_index, size=None) -> Tensor:
        if not self.compressing():
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
    """

    _reduces = ("sum",)

    def forward(self, x: Tensor, x_0: Tensor, edge_index, edge_weight: Optional[Tensor] = None) -> Tensor:
        if not self.compressing():
            return GCN2Conv.forward(self, x, x_0, edge_index, edge_weight)
        self._bq_check_runtime()
        self._check_2d(x, "QGCN2Conv")
        if self.normalize:
            edge_index, edge_weight = _gcn_normalized(self, x, edge_index, edge_weight, False)
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


# ============================================================================ GAT
def _gat_self_loops(self, edge_index, edge_attr, num_nodes: int):
    """GAT/GATv2's self-loop handling, as the originals do it."""
    if isinstance(edge_index, Tensor):
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


def _attention_aggregate(self, x_src: Tensor, alpha: Tensor, edge_index, num_dst: int) -> Tensor:
    """``out[j, h] = sum_{i -> j} alpha[e, h] * x_src[i, h]``, one head at a time, so the attention
    gradient keeps ``x_src`` (``N x H x C``, compressed) rather than the messages (``E x H x C``)."""
    adj = self._adjacency(edge_index, x_src, None, size=(x_src.size(0), num_dst), use_sparse_values=False)
    if adj.num_edges != alpha.size(0):
        raise RuntimeError(f"{type(self).__name__}: {alpha.size(0)} attention coefficients for "
                           f"{adj.num_edges} edges")
    adj = adj.with_weight(None)
    heads = [BF.aggregate(x_src[:, h], adj.with_weight(alpha[:, h]), "sum", self.bq_config)
             for h in range(x_src.size(1))]
    return torch.stack(heads, dim=1)


def _num_dst(x_src: Tensor, x_dst: Optional[Tensor], edge_index, size) -> int:
    if isinstance(edge_index, Tensor) and edge_index.layout != torch.strided:
        return edge_index.size(0)
    if _is_torch_sparse_tensor_type(edge_index):
        return edge_index.sparse_size(0)
    if size is not None and size[1] is not None:
        return size[1]
    return x_dst.size(0) if x_dst is not None else x_src.size(0)


@register_wrapper(GATConv)
class QGATConv(_QConv, GATConv):
    """:class:`~torch_geometric.nn.conv.GATConv` with compressed saved activations.

    ``lin``/``lin_src``/``lin_dst``/``res`` keep their inputs compressed. The
    attention coefficients are computed by PyG's own code with every saved
    tensor compressed (dropout masks at 1 bit), and the attention-weighted
    aggregation keeps the transformed features (``N x H x C``) compressed for
    the attention gradient instead of the per-edge messages.
    Supports ``heads``, ``concat``, ``negative_slope``, ``dropout``,
    ``add_self_loops``, ``edge_dim``/``edge_attr``, ``fill_value``, ``bias``,
    ``residual``, bipartite input, ``size`` and ``return_attention_weights``.
    Refuses ``aggr`` other than ``"add"``/``"sum"`` and ``flow="target_to_source"``.
    """

    _reduces = ("sum",)

    def forward(self, x, edge_index, edge_attr: Optional[Tensor] = None, size=None,
                return_attention_weights: Optional[bool] = None):
        if not self.compressing():
            return GATConv.forward(self, x, edge_index, edge_attr, size, return_attention_weights)
        self._bq_check_runtime()
        H, C = self.heads, self.out_channels
        res = None
        if isinstance(x, Tensor):
            self._check_2d(x, "QGATConv")
            if self.res is not None:
                res = self._linear(x, self.res, bias=False)
            if self.lin is not None:
                x_src = x_dst = self._linear(x, self.lin, bias=False).view(-1, H, C)
            else:
                x_src = self._linear(x, self.lin_src, bias=False).view(-1, H, C)
                x_dst = self._linear(x, self.lin_dst, bias=False).view(-1, H, C)
        else:
            x_src, x_dst = x
            self._check_2d(x_src, "QGATConv")
            if x_dst is not None and self.res is not None:
                res = self._linear(x_dst, self.res, bias=False)
            lin_s = self.lin if self.lin is not None else self.lin_src
            lin_d = self.lin if self.lin is not None else self.lin_dst
            x_src = self._linear(x_src, lin_s, bias=False).view(-1, H, C)
            if x_dst is not None:
                x_dst = self._linear(x_dst, lin_d, bias=False).view(-1, H, C)

        cfg = self.bq_config
        with compress_saved_tensors(cfg):
            alpha_src = (x_src * self.att_src).sum(dim=-1)
            alpha_dst = None if x_dst is None else (x_dst * self.att_dst).sum(-1)
            if self.add_self_loops:
                num_nodes = x_src.size(0)
                if x_dst is not None:
                    num_nodes = min(num_nodes, x_dst.size(0))
                num_nodes = min(size) if size is not None else num_nodes
                edge_index, edge_attr = _gat_self_loops(self, edge_index, edge_attr, num_nodes)
            alpha = self.edge_updater(edge_index, alpha=(alpha_src, alpha_dst), edge_attr=edge_attr, size=size)
        out = _attention_aggregate(self, x_src, alpha, edge_index, _num_dst(x_src, x_dst, edge_index, size))
        return _finish_attention(self, out, res, edge_index, alpha, return_attention_weights)


    def edge_update(self, alpha_j: Tensor, alpha_i: Optional[Tensor], edge_attr: Optional[Tensor],
                    index: Tensor, ptr: Optional[Tensor], dim_size: Optional[int]) -> Tensor:
        # Same computation as GATConv.edge_update; in compressed training the LeakyReLU keeps an
        # exact 1-bit sign mask instead of a quantized copy of its input.
        if not self.compressing():
            return GATConv.edge_update(self, alpha_j, alpha_i, edge_attr, index, ptr, dim_size)
        alpha = alpha_j if alpha_i is None else alpha_j + alpha_i
        if index.numel() == 0:
            return alpha
        if edge_attr is not None and self.lin_edge is not None:
            if edge_attr.dim() == 1:
                edge_attr = edge_attr.view(-1, 1)
            edge_attr = self.lin_edge(edge_attr)
            edge_attr = edge_attr.view(-1, self.heads, self.out_channels)
            alpha = alpha + (edge_attr * self.att_edge).sum(dim=-1)
        alpha = BF.leaky_relu(alpha, self.negative_slope)
        alpha = softmax(alpha, index, ptr, dim_size)
        alpha = torch.nn.functional.dropout(alpha, p=self.dropout, training=self.training)
        return alpha


def _finish_attention(self, out: Tensor, res: Optional[Tensor], edge_index, alpha: Tensor,
                      return_attention_weights):
    """GAT/GATv2 after aggregation: merge heads, add the residual and bias, attach weights."""
    out = out.reshape(-1, self.heads * self.out_channels) if self.concat else out.mean(dim=1)
    if res is not None:
        out = out + res
    if self.bias is not None:
        out = out + self.bias
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


# ============================================================================ GATv2
@register_wrapper(GATv2Conv)
class QGATv2Conv(_QConv, GATv2Conv):
    """:class:`~torch_geometric.nn.conv.GATv2Conv` with compressed saved activations.

    ``lin_l``/``lin_r``/``res`` keep their inputs compressed. GATv2 scores each
    edge from ``x_i + x_j`` through a LeakyReLU, so the attention gradient
    needs per-edge tensors (``E x H x C``); PyG's own attention code runs with
    every saved tensor compressed, and the weighted aggregation keeps the node
    features (``N x H x C``) compressed rather than the messages.
    Supports ``heads``, ``concat``, ``negative_slope``, ``dropout``,
    ``add_self_loops``, ``edge_dim``/``edge_attr``, ``fill_value``, ``bias``,
    ``share_weights``, ``residual``, bipartite input and
    ``return_attention_weights``. Refuses ``aggr`` other than
    ``"add"``/``"sum"`` and ``flow="target_to_source"``.
    """

    _reduces = ("sum",)

    def forward(self, x, edge_index, edge_attr: Optional[Tensor] = None,
                return_attention_weights: Optional[bool] = None):
        if not self.compressing():
            return GATv2Conv.forward(self, x, edge_index, edge_attr, return_attention_weights)
        self._bq_check_runtime()
        H, C = self.heads, self.out_channels
        res = None
        if isinstance(x, Tensor):
            self._check_2d(x, "QGATv2Conv")
            if self.res is not None:
                res = self._linear(x, self.res, bias=False)
            x_l = self._linear(x, self.lin_l).view(-1, H, C)
            x_r = x_l if self.share_weights else self._linear(x, self.lin_r).view(-1, H, C)
        else:
            x_l, x_r = x[0], x[1]
            self._check_2d(x_l, "QGATv2Conv")
            if x_r is not None and self.res is not None:
                res = self._linear(x_r, self.res, bias=False)
            x_l = self._linear(x_l, self.lin_l).view(-1, H, C)
            if x_r is not None:
                x_r = self._linear(x_r, self.lin_r).view(-1, H, C)
        if x_r is None:
            raise ValueError("QGATv2Conv: target node features must not be None (GATv2 scores x_i + x_j)")

        with compress_saved_tensors(self.bq_config):
            if self.add_self_loops:
                num_nodes = min(x_l.size(0), x_r.size(0))
                edge_index, edge_attr = _gat_self_loops(self, edge_index, edge_attr, num_nodes)
            alpha = self.edge_updater(edge_index, x=(x_l, x_r), edge_attr=edge_attr)
        out = _attention_aggregate(self, x_l, alpha, edge_index, _num_dst(x_l, x_r, edge_index, None))
        return _finish_attention(self, out, res, edge_index, alpha, return_attention_weights)

    def edge_update(self, x_j: Tensor, x_i: Tensor, edge_attr: Optional[Tensor], index: Tensor,
                    ptr: Optional[Tensor], dim_size: Optional[int]) -> Tensor:
        # Same computation as GATv2Conv.edge_update; in compressed training the LeakyReLU keeps an
        # exact 1-bit sign mask instead of a quantized copy of its E x H x C input.
        if not self.compressing():
            return GATv2Conv.edge_update(self, x_j, x_i, edge_attr, index, ptr, dim_size)
        x = x_i + x_j
        if edge_attr is not None:
            if edge_attr.dim() == 1:
                edge_attr = edge_attr.view(-1, 1)
            assert self.lin_edge is not None
            edge_attr = self.lin_edge(edge_attr)
            edge_attr = edge_attr.view(-1, self.heads, self.out_channels)
            x = x + edge_attr
        x = BF.leaky_relu(x, self.negative_slope)
        alpha = (x * self.att).sum(dim=-1)
        alpha = softmax(alpha, index, ptr, dim_size)
        alpha = torch.nn.functional.dropout(alpha, p=self.dropout, training=self.training)
        return alpha
