"""One edge-list view of every adjacency form PyG accepts.

Convention (PyG's ``flow="source_to_target"``): messages travel from
``edge_index[0]`` (source) to ``edge_index[1]`` (target), so aggregation
computes ``out[dst] = reduce over edges (x[src] * w)``. A sparse matrix
follows PyG's ``adj_t`` convention: rows are targets, columns are sources,
and aggregation equals ``adj @ x``; its stored values are the edge weights.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch.utils.weak import WeakIdKeyDictionary

try:  # optional dependency; not installed everywhere
    from torch_sparse import SparseTensor as _TorchSparseTensor  # type: ignore
except Exception:  # pragma: no cover - depends on the environment
    _TorchSparseTensor = None

NumNodes = Optional[Union[int, Tuple[int, int]]]

_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)

# Converted index tensors of sparse inputs, reused while the sparse object lives
# (the conversion allocates E-sized index tensors; doing it once per graph keeps
# repeated layers from paying for it, and the entry dies with the sparse object).
_CONVERTED: "WeakIdKeyDictionary" = WeakIdKeyDictionary()

_EXPECTED = ("an edge_index LongTensor of shape [2, E], a torch.sparse COO/CSR/CSC tensor, "
             "a torch_sparse.SparseTensor or a torch_geometric EdgeIndex")


class Adjacency:
    """Edge-list view of a (possibly bipartite) graph.

    Attributes:
        src, dst: int64 tensors of shape ``[E]`` (source and target of each edge).
        num_src, num_dst: number of source and target nodes.
        edge_weight: optional ``[E]`` tensor of edge weights (may require grad).
    """

    __slots__ = ("src", "dst", "num_src", "num_dst", "edge_weight")

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, num_src: int, num_dst: int,
                 edge_weight: Optional[torch.Tensor] = None):
        self.src = src
        self.dst = dst
        self.num_src = int(num_src)
        self.num_dst = int(num_dst)
        self.edge_weight = edge_weight

    @property
    def num_edges(self) -> int:
        return self.src.numel()

    @property
    def device(self) -> torch.device:
        return self.src.device

    def with_weight(self, edge_weight: Optional[torch.Tensor]) -> "Adjacency":
        _check_weight(edge_weight, self.num_edges)
        return Adjacency(self.src, self.dst, self.num_src, self.num_dst, edge_weight)

    def tensors(self):
        """The tensors this adjacency keeps alive (for memory accounting)."""
        return tuple(t for t in (self.src, self.dst, self.edge_weight) if t is not None)

    def in_degree(self, dtype=torch.float32) -> torch.Tensor:
        """Incoming edge count of every target node (``[num_dst]``)."""
        return torch.bincount(self.dst, minlength=self.num_dst).to(dtype)

    def __repr__(self) -> str:
        w = ", weighted" if self.edge_weight is not None else ""
        return f"Adjacency(num_src={self.num_src}, num_dst={self.num_dst}, num_edges={self.num_edges}{w})"


def _check_weight(edge_weight, num_edges: int) -> None:
    if edge_weight is None:
        return
    if not isinstance(edge_weight, torch.Tensor):
        raise TypeError(f"edge_weight must be a torch.Tensor of shape [{num_edges}]; got {type(edge_weight).__name__}")
    if not edge_weight.is_floating_point():
        raise TypeError(f"edge_weight must be a floating tensor; got {edge_weight.dtype}")
    if edge_weight.dim() != 1 or edge_weight.numel() != num_edges:
        raise ValueError(f"edge_weight must have shape [{num_edges}] (one weight per edge); "
                         f"got {tuple(edge_weight.shape)}")


def _sizes(num_nodes: NumNodes, src: torch.Tensor, dst: torch.Tensor) -> Tuple[int, int]:
    if num_nodes is None:
        if src.numel() == 0:
            return 0, 0
        n = int(max(int(src.max()), int(dst.max()))) + 1
        return n, n
    if isinstance(num_nodes, (tuple, list)):
        if len(num_nodes) != 2:
            raise ValueError(f"num_nodes must be an int or a (num_src, num_dst) pair; got {num_nodes!r}")
        num_src, num_dst = (int(v) for v in num_nodes)
    else:
        num_src = num_dst = int(num_nodes)
    if num_src < 0 or num_dst < 0:
        raise ValueError(f"num_nodes must be non-negative; got {num_nodes!r}")
    return num_src, num_dst


def _check_range(src, dst, num_src, num_dst) -> None:
    # A bad index would corrupt memory or fail deep inside a scatter; on CPU the check is cheap.
    if src.numel() == 0 or src.device.type != "cpu":
        return
    lo = min(int(src.min()), int(dst.min()))
    if lo < 0 or int(src.max()) >= num_src or int(dst.max()) >= num_dst:
        raise ValueError(f"edge_index holds node indices outside [0, {num_src}) x [0, {num_dst}) "
                         f"(min {lo}, max source {int(src.max())}, max target {int(dst.max())}); "
                         "pass the right num_nodes")


def _from_edge_index(ei: torch.Tensor, num_nodes: NumNodes) -> Adjacency:
    if ei.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"edge_index must be an int64 (or int32) tensor of shape [2, E]; got dtype {ei.dtype}")
    if ei.dim() != 2 or ei.size(0) != 2:
        raise ValueError(f"edge_index must have shape [2, E]; got {tuple(ei.shape)}")
    ei = ei.long()
    src, dst = ei[0], ei[1]
    num_src, num_dst = _sizes(num_nodes, src, dst)
    _check_range(src, dst, num_src, num_dst)
    return Adjacency(src, dst, num_src, num_dst)


def _from_torch_sparse(adj: torch.Tensor) -> Adjacency:
    if adj.dim() != 2:
        raise ValueError(f"a sparse adjacency must be a 2-D matrix [num_dst, num_src]; got {tuple(adj.shape)}")
    cached = _CONVERTED.get(adj)
    if cached is not None and cached[0] == adj._version:
        return cached[1]
    num_dst, num_src = adj.shape
    if adj.layout == torch.sparse_coo:
        if not adj.is_coalesced():
            adj = adj.coalesce()
        row, col = adj.indices()
        values = adj.values()
    elif adj.layout == torch.sparse_csr:
        crow, col = adj.crow_indices(), adj.col_indices()
        row = torch.repeat_interleave(torch.arange(num_dst, device=crow.device), crow.diff())
        values = adj.values()
    else:  # CSC
        ccol, row = adj.ccol_indices(), adj.row_indices()
        col = torch.repeat_interleave(torch.arange(num_src, device=ccol.device), ccol.diff())
        values = adj.values()
    if values.dim() != 1:
        raise ValueError(f"sparse adjacency values must be one scalar per edge; got values of shape "
                         f"{tuple(values.shape)}")
    weight = values if values.is_floating_point() else values.float()
    out = Adjacency(col.long(), row.long(), num_src, num_dst, weight)
    _CONVERTED[adj] = (adj._version, out)
    return out


def _from_sparse_tensor(adj) -> Adjacency:  # torch_sparse.SparseTensor, adj_t convention
    row, col, value = adj.coo()
    num_dst, num_src = adj.sparse_sizes()
    return Adjacency(col, row, num_src, num_dst, value)


def _is_edge_index_type(obj) -> bool:
    cls = type(obj)
    return cls.__name__ == "EdgeIndex" and cls.__module__.startswith("torch_geometric")


def as_adjacency(edge_index_or_sparse, num_nodes: NumNodes = None,
                 edge_weight: Optional[torch.Tensor] = None) -> Adjacency:
    """Normalise a graph given in any form PyG accepts to an :class:`Adjacency`.

    Args:
        edge_index_or_sparse: one of
            * ``edge_index``: int64 tensor ``[2, E]`` (row 0 sources, row 1 targets);
            * a PyG ``EdgeIndex`` (its ``sparse_size`` is used when known);
            * a ``torch.sparse`` COO, CSR or CSC matrix in ``adj_t`` layout
              (``[num_dst, num_src]``; values are edge weights);
            * a ``torch_sparse.SparseTensor`` (``adj_t`` layout), when installed;
            * an :class:`Adjacency` (returned as is, or with ``edge_weight`` attached).
        num_nodes: node count, or ``(num_src, num_dst)`` for bipartite graphs.
            Only used for ``edge_index`` forms; inferred as ``max index + 1`` when omitted.
        edge_weight: optional ``[E]`` weights, overriding a sparse matrix's values.

    Raises:
        TypeError: an unsupported adjacency type or dtype.
        ValueError: a malformed shape or out-of-range node indices.
    """
    obj = edge_index_or_sparse
    if isinstance(obj, Adjacency):
        adj = obj
    elif _is_edge_index_type(obj):
        sizes = obj.sparse_size()
        if num_nodes is None and sizes[0] is not None and sizes[1] is not None:
            num_nodes = (int(sizes[0]), int(sizes[1]))
        adj = _from_edge_index(obj.as_tensor(), num_nodes)
    elif _TorchSparseTensor is not None and isinstance(obj, _TorchSparseTensor):
        adj = _from_sparse_tensor(obj)
    elif isinstance(obj, torch.Tensor):
        if obj.layout in _SPARSE_LAYOUTS:
            adj = _from_torch_sparse(obj)
        elif obj.layout != torch.strided:
            raise TypeError(f"unsupported sparse layout {obj.layout}; expected {_EXPECTED}")
        elif obj.is_floating_point() and obj.dim() == 2 and obj.size(0) != 2:
            raise TypeError(f"dense adjacency matrices are not supported (got a {obj.dtype} tensor of shape "
                            f"{tuple(obj.shape)}); expected {_EXPECTED}. Convert with adj.to_sparse_csr()")
        else:
            adj = _from_edge_index(obj, num_nodes)
    else:
        raise TypeError(f"unsupported adjacency of type {type(obj).__module__}.{type(obj).__name__}; "
                        f"expected {_EXPECTED}")
    if edge_weight is not None:
        adj = adj.with_weight(edge_weight)
    else:
        _check_weight(adj.edge_weight, adj.num_edges)
    return adj
