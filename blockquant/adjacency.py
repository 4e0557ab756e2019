"""One compressed-sparse view of every adjacency form PyG accepts.

Convention (PyG's ``flow="source_to_target"``): messages travel from
``edge_index[0]`` (source) to ``edge_index[1]`` (target), so aggregation
computes ``out[dst] = reduce over edges (x[src] * w)``. A sparse matrix
follows PyG's ``adj_t`` convention: rows are targets, columns are sources,
and aggregation equals ``adj @ x``; its stored values are the edge weights.

Aggregation is a sparse-dense matrix product, never a gather of per-edge
messages: an :class:`Adjacency` therefore carries the graph as CSR in both
directions, ``A`` (``[num_dst, num_src]``, for the forward ``A x``) and
``A^T`` (``[num_src, num_dst]``, for the backward ``A^T g``), each built once
per graph and cached for the graph's lifetime (weakly keyed on the tensor the
user passed, and rebuilt when that tensor is modified in place).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Dict, Optional, Tuple, Union

import torch
from torch.utils.weak import WeakIdKeyDictionary

try:  # optional dependency; not installed everywhere
    from torch_sparse import SparseTensor as _TorchSparseTensor  # type: ignore
except Exception:  # pragma: no cover - depends on the environment
    _TorchSparseTensor = None

NumNodes = Optional[Union[int, Tuple[int, int]]]

_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)

# graph object (edge_index / sparse matrix / EdgeIndex / SparseTensor) ->
# {(num_src, num_dst): (version, _Structure)}. Weak on the graph object: the
# CSR dies with the graph; the version check refuses a stale entry after an
# in-place change of the graph tensor.
_STRUCTURES: "WeakIdKeyDictionary" = WeakIdKeyDictionary()

_EXPECTED = ("an edge_index LongTensor of shape [2, E], a torch.sparse COO/CSR/CSC tensor, "
             "a torch_sparse.SparseTensor or a torch_geometric EdgeIndex")

_INT32_MAX = 2 ** 31 - 1


def _index_dtype(num_edges: int, num_rows: int, num_cols: int) -> torch.dtype:
    # int32 indices halve the cache and make the CPU product faster
    return torch.int32 if max(num_edges, num_rows, num_cols) < _INT32_MAX else torch.int64


def _rowptr(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    ptr = torch.zeros(num_rows + 1, dtype=torch.int64, device=rows.device)
    if rows.numel():
        torch.cumsum(torch.bincount(rows, minlength=num_rows), 0, out=ptr[1:])
    return ptr


def _expand_ptr(rowptr: torch.Tensor) -> torch.Tensor:
    """Row id of every stored entry of a CSR (``[nnz]`` int64)."""
    num_rows = rowptr.numel() - 1
    counts = rowptr.diff().long()
    return torch.repeat_interleave(torch.arange(num_rows, device=rowptr.device), counts)


class _CSR:
    """One direction of a graph as CSR: ``rowptr`` ``[R + 1]``, ``col`` ``[E]`` and ``perm``
    (``[E]``: the edge id, in the adjacency's own edge order, of each stored entry; None when
    the stored order is the edge order)."""

    __slots__ = ("rowptr", "col", "perm", "num_rows", "num_cols", "_units", "__weakref__")

    def __init__(self, rowptr, col, perm, num_rows: int, num_cols: int):
        itype = _index_dtype(col.numel(), num_rows, num_cols)
        self.rowptr = rowptr.to(itype).contiguous()
        self.col = col.to(itype).contiguous()
        self.perm = None if perm is None else perm.to(itype).contiguous()
        self.num_rows = int(num_rows)
        self.num_cols = int(num_cols)
        self._units: Dict[Tuple[torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def num_edges(self) -> int:
        return self.col.numel()

    def nbytes(self) -> int:
        ts = [self.rowptr, self.col] + ([self.perm] if self.perm is not None else []) + list(self._units.values())
        return sum(t.numel() * t.element_size() for t in ts)

    def values(self, edge_weight: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Stored values in CSR order: the edge weights gathered by ``perm``, or ones (cached)."""
        if edge_weight is None:
            key = (dtype, self.col.device)
            unit = self._units.get(key)
            if unit is None:
                unit = torch.ones(self.num_edges, dtype=dtype, device=self.col.device)
                self._units[key] = unit
            return unit
        w = edge_weight.detach().to(dtype)
        return w if self.perm is None else w.index_select(0, self.perm)

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta state"
            return torch.sparse_csr_tensor(self.rowptr, self.col, values, (self.num_rows, self.num_cols),
                                           check_invariants=False)

    def rows_of(self, start: int, stop: int) -> torch.Tensor:
        """Row id of stored entries ``start:stop`` (int64), without expanding the whole CSR."""
        pos = torch.arange(start, stop, device=self.col.device, dtype=self.rowptr.dtype)
        return torch.searchsorted(self.rowptr, pos, right=True).sub_(1).long()

    def transposed(self) -> "_CSR":
        rows = _expand_ptr(self.rowptr)
        order = torch.argsort(self.col.long(), stable=True)
        rowptr_t = _rowptr(self.col.long(), self.num_cols)
        perm_t = order if self.perm is None else self.perm.long().index_select(0, order)
        return _CSR(rowptr_t, rows.index_select(0, order), perm_t, self.num_cols, self.num_rows)


def _csr_from_edges(rows: torch.Tensor, cols: torch.Tensor, num_rows: int, num_cols: int) -> _CSR:
    perm = torch.argsort(rows, stable=True)  # stable: equal rows keep the edge order
    return _CSR(_rowptr(rows, num_rows), cols.index_select(0, perm), perm, num_rows, num_cols)


class _Structure:
    """A graph's CSR (rows are targets) and, built on first use, its transpose (rows are sources);
    ``weights``: constant edge values cached with the graph (a derived graph's, such as GCN's
    normalisation: :func:`derived_adjacency`), in the adjacency's edge order, or None."""

    __slots__ = ("fwd", "_bwd", "owner", "weights", "_weights_t", "__weakref__")

    def __init__(self, fwd: _CSR, bwd: Optional[_CSR] = None, weights: Optional[torch.Tensor] = None):
        self.fwd = fwd
        self._bwd = bwd
        self.owner = None  # weak reference to the graph object it is cached on
        self.weights = weights
        self._weights_t = None

    def weights_t(self, dtype: torch.dtype) -> torch.Tensor:
        """:attr:`weights` in the transposed CSR's order (for the backward product), gathered once."""
        if self._weights_t is None:
            self._weights_t = self.bwd.values(self.weights, self.weights.dtype)
        return self._weights_t.to(dtype)

    def owned_by_a_live_graph(self) -> bool:
        return self.owner is not None and self.owner() is not None

    def tensors(self):
        parts = [self.fwd] + ([self._bwd] if self._bwd is not None else [])
        held = tuple(t for c in parts for t in (c.rowptr, c.col, c.perm, *c._units.values()) if t is not None)
        return held + tuple(w for w in (self.weights, self._weights_t) if w is not None)

    @property
    def bwd(self) -> _CSR:
        if self._bwd is None:
            self._bwd = self.fwd.transposed()
        return self._bwd

    def nbytes(self) -> int:
        w = sum(t.numel() * t.element_size() for t in (self.weights, self._weights_t) if t is not None)
        return self.fwd.nbytes() + (self._bwd.nbytes() if self._bwd is not None else 0) + w


class Adjacency:
    """A (possibly bipartite) graph ready for sparse-dense aggregation.

    Attributes:
        num_src, num_dst: number of source and target nodes.
        edge_weight: optional ``[E]`` tensor of edge weights in this adjacency's
            edge order (may require grad).

    The edge order is the ``edge_index`` column order, or the stored order of a
    sparse matrix (row-major for COO/CSR, column-major for CSC).

    Build one with :func:`as_adjacency`; ``Adjacency(src, dst, num_src, num_dst)``
    builds one from edge lists.
    """

    __slots__ = ("num_src", "num_dst", "edge_weight", "_structure", "_edges")

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, num_src: int, num_dst: int,
                 edge_weight: Optional[torch.Tensor] = None):
        src, dst = src.long(), dst.long()
        _check_range(src, dst, int(num_src), int(num_dst))
        structure = _Structure(_csr_from_edges(dst, src, int(num_dst), int(num_src)))
        self._init(structure, num_src, num_dst, edge_weight, None)

    @classmethod
    def _of(cls, structure: _Structure, num_src: int, num_dst: int, edge_weight: Optional[torch.Tensor],
            edges=None) -> "Adjacency":
        adj = cls.__new__(cls)
        adj._init(structure, num_src, num_dst, edge_weight, edges)
        return adj

    def _init(self, structure, num_src, num_dst, edge_weight, edges) -> None:
        self._structure = structure
        self.num_src = int(num_src)
        self.num_dst = int(num_dst)
        self.edge_weight = edge_weight
        self._edges = edges

    @property
    def num_edges(self) -> int:
        return self._structure.fwd.num_edges

    @property
    def device(self) -> torch.device:
        return self._structure.fwd.col.device

    def csr(self) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(rowptr, col, perm)`` of ``A`` (``[num_dst, num_src]``: row ``j`` lists the sources of
        target ``j``); ``perm[k]`` is the edge id of stored entry ``k`` (None: stored order is the
        edge order). Cached with the graph; int32 when the graph allows, else int64."""
        f = self._structure.fwd
        return f.rowptr, f.col, f.perm

    def csr_t(self) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(rowptr, col, perm)`` of ``A^T`` (``[num_src, num_dst]``: row ``i`` lists the targets of
        source ``i``), built on first call and cached with the graph."""
        b = self._structure.bwd
        return b.rowptr, b.col, b.perm

    @property
    def src(self) -> torch.Tensor:
        """Source of every edge in edge order (``[E]`` int64, built on demand)."""
        return self._edge_lists()[0]

    @property
    def dst(self) -> torch.Tensor:
        """Target of every edge in edge order (``[E]`` int64, built on demand)."""
        return self._edge_lists()[1]

    def _edge_lists(self):
        if self._edges is None:
            f = self._structure.fwd
            rows, cols = _expand_ptr(f.rowptr), f.col.long()
            if f.perm is None:
                self._edges = (cols, rows)
            else:
                src = torch.empty_like(cols)
                dst = torch.empty_like(rows)
                src[f.perm.long()] = cols
                dst[f.perm.long()] = rows
                self._edges = (src, dst)
        return self._edges

    def with_weight(self, edge_weight: Optional[torch.Tensor]) -> "Adjacency":
        _check_weight(edge_weight, self.num_edges)
        return Adjacency._of(self._structure, self.num_src, self.num_dst, edge_weight, self._edges)

    @property
    def weights_are_graph_state(self) -> bool:
        """Whether the edge weights are constant values cached with the graph (:func:`derived_adjacency`)."""
        return self.edge_weight is not None and self.edge_weight is self._structure.weights

    def tensors(self):
        """The tensors this adjacency keeps alive for a step (for memory accounting): the edge
        weights, and the CSR when nothing else holds it. The CSR of a graph the caller keeps
        (``data.edge_index``), and a derived graph cached with it (GCN's normalisation:
        :func:`derived_adjacency`), is graph state cached for that graph's lifetime
        (:meth:`cache_nbytes`), like the ``edge_index`` itself; the CSR of a graph built inside
        the step (GCN's normalised graph when it cannot be cached) lives only as long as the
        autograd graph does, and is counted."""
        if self._structure.owned_by_a_live_graph():
            return tuple(t for t in (self.edge_weight,) if t is not None and not self.weights_are_graph_state)
        held = tuple(t for t in (self.edge_weight,) if t is not None and not self.weights_are_graph_state)
        return held + self._structure.tensors()

    def cache_nbytes(self) -> int:
        """Bytes of the cached CSR (both directions once the transpose was built)."""
        return self._structure.nbytes()

    def in_degree(self, dtype=torch.float32) -> torch.Tensor:
        """Incoming edge count of every target node (``[num_dst]``; duplicate edges count)."""
        return self._structure.fwd.rowptr.diff().to(dtype)

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


def _check_range(src, dst, num_src, num_dst, what: str = "edge_index") -> None:
    # Runs once per graph (the CSR is cached): a bad index would corrupt memory in the sparse product.
    if src.numel() == 0:
        return
    lo = min(int(src.min()), int(dst.min()))
    hi_s, hi_d = int(src.max()), int(dst.max())
    if lo < 0 or hi_s >= num_src or hi_d >= num_dst:
        raise ValueError(f"{what} holds node indices outside [0, {num_src}) x [0, {num_dst}) "
                         f"(min {lo}, max source {hi_s}, max target {hi_d}); pass the right num_nodes or size")


def _cached(key_obj, sizes: Tuple[int, int], build) -> _Structure:
    """The structure cached for ``key_obj`` at ``sizes``, rebuilt when the object changed in place."""
    version = getattr(key_obj, "_version", 0)
    per_obj = _STRUCTURES.get(key_obj)
    if per_obj is not None:
        hit = per_obj.get(sizes)
        if hit is not None and hit[0] == version:
            return hit[1]
    else:
        per_obj = {}
        _STRUCTURES[key_obj] = per_obj
    structure = build()
    structure.owner = weakref.ref(key_obj)
    for stale in [k for k, v in per_obj.items() if v[0] != version]:
        del per_obj[stale]
    per_obj[sizes] = (version, structure)
    return structure


def derived_adjacency(graph, variant, build) -> Adjacency:
    """A graph derived from ``graph`` by a deterministic function of it (GCN's normalisation: self
    loops added, symmetric edge weights), cached with ``graph``: built once per ``graph`` object
    and ``variant`` (a hashable key naming the derivation and its options), rebuilt when ``graph``
    is modified in place, gone with ``graph``. Its edge weights are cached with it as graph state
    (:attr:`Adjacency.weights_are_graph_state`), stored in CSR order so that a step reads them
    without a gather. Only the CSR is kept, not the derived ``edge_index``.

    ``build()`` returns ``(adjacency, edge_weight, num_nodes)``: the derived graph in any form
    :func:`as_adjacency` takes; it runs only on a miss.
    """
    key = ("derived", variant)
    version = getattr(graph, "_version", 0)
    per_obj = _STRUCTURES.get(graph)
    if per_obj is None:
        per_obj = {}
        _STRUCTURES[graph] = per_obj
    hit = per_obj.get(key)
    if hit is None or hit[0] != version:
        derived, weight, num_nodes = build()
        adj = _as_adjacency(derived, num_nodes, weight)
        fwd = adj._structure.fwd
        w = None if adj.edge_weight is None else fwd.values(adj.edge_weight, adj.edge_weight.dtype).detach()
        structure = _Structure(_CSR(fwd.rowptr, fwd.col, None, fwd.num_rows, fwd.num_cols), None, w)
        structure.owner = weakref.ref(graph)
        for stale in [k for k, v in per_obj.items() if v[0] != version]:
            del per_obj[stale]
        hit = (version, structure, adj.num_src, adj.num_dst)
        per_obj[key] = hit
    return Adjacency._of(hit[1], hit[2], hit[3], hit[1].weights)


def _check_edge_index(ei: torch.Tensor) -> None:
    if ei.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"edge_index must be an int64 (or int32) tensor of shape [2, E]; got dtype {ei.dtype}")
    if ei.dim() != 2 or ei.size(0) != 2:
        raise ValueError(f"edge_index must have shape [2, E]; got {tuple(ei.shape)}")


def _from_edge_index(ei: torch.Tensor, num_nodes: NumNodes, key_obj=None) -> Adjacency:
    _check_edge_index(ei)
    plain = ei.long()
    src, dst = plain[0], plain[1]
    num_src, num_dst = _sizes(num_nodes, src, dst)

    def build():
        _check_range(src, dst, num_src, num_dst)
        return _Structure(_csr_from_edges(dst, src, num_dst, num_src))

    structure = _cached(ei if key_obj is None else key_obj, (num_src, num_dst), build)
    return Adjacency._of(structure, num_src, num_dst, None)


def _from_pyg_edge_index(ei, num_nodes: NumNodes) -> Adjacency:
    """PyG ``EdgeIndex``: its ``sparse_size`` when known, and its own CSR/CSC caches when sorted."""
    sizes = ei.sparse_size()
    if num_nodes is None and sizes[0] is not None and sizes[1] is not None:
        num_nodes = (int(sizes[0]), int(sizes[1]))
    plain = ei.as_tensor()
    _check_edge_index(plain)
    if not (ei.is_sorted_by_col or ei.is_sorted_by_row):
        return _from_edge_index(plain, num_nodes, key_obj=ei)
    src, dst = plain[0].long(), plain[1].long()
    num_src, num_dst = _sizes(num_nodes, src, dst)

    def build():
        _check_range(src, dst, num_src, num_dst, "EdgeIndex")
        (cptr, rows), cperm = ei.get_csc()  # columns are targets: A's CSR
        (rptr, cols), rperm = ei.get_csr()  # rows are sources: A^T's CSR
        fwd = _CSR(_fit_ptr(cptr, num_dst), rows, cperm, num_dst, num_src)
        bwd = _CSR(_fit_ptr(rptr, num_src), cols, rperm, num_src, num_dst)
        return _Structure(fwd, bwd)

    structure = _cached(ei, (num_src, num_dst), build)
    return Adjacency._of(structure, num_src, num_dst, None)


def _fit_ptr(ptr: torch.Tensor, num_rows: int) -> torch.Tensor:
    # EdgeIndex's pointer covers its own sparse_size (inferred as max index + 1 when unset)
    if ptr.numel() == num_rows + 1:
        return ptr
    if ptr.numel() > num_rows + 1:
        return ptr[:num_rows + 1]
    return torch.cat([ptr, ptr[-1:].expand(num_rows + 1 - ptr.numel())])


def _sparse_values(adj: torch.Tensor) -> torch.Tensor:
    if adj.layout == torch.sparse_coo:
        values = adj.values() if adj.is_coalesced() else adj.coalesce().values()
    else:
        values = adj.values()
    if values.dim() != 1:
        raise ValueError(f"sparse adjacency values must be one scalar per edge; got values of shape "
                         f"{tuple(values.shape)}")
    if not values.is_floating_point():
        raise TypeError(f"sparse adjacency values must be floating point (they are the edge weights); got "
                        f"{values.dtype}. Convert with adj.to(torch.float32)")
    return values


def _from_torch_sparse(adj: torch.Tensor, num_nodes: NumNodes) -> Adjacency:
    if adj.dim() != 2 or adj.dense_dim() != 0:
        raise ValueError(f"a sparse adjacency must be a 2-D matrix [num_dst, num_src] with scalar values; "
                         f"got shape {tuple(adj.shape)}")
    num_dst, num_src = (int(s) for s in adj.shape)
    if num_nodes is not None:
        none = torch.empty(0, dtype=torch.long)
        want_src, want_dst = _sizes(num_nodes, none, none)
        if (want_src, want_dst) != (num_src, num_dst):
            raise ValueError(f"the sparse adjacency is [{num_dst}, {num_src}] ([num_dst, num_src], adj_t layout) "
                             f"but {want_dst} targets and {want_src} sources were expected; transpose it or fix "
                             f"the sizes")
    values = _sparse_values(adj)

    def build():
        if adj.layout == torch.sparse_coo:
            c = adj if adj.is_coalesced() else adj.coalesce()
            row, col = c.indices()
            _check_range(col, row, num_src, num_dst, "the sparse adjacency")
            return _Structure(_CSR(_rowptr(row, num_dst), col, None, num_dst, num_src))
        if adj.layout == torch.sparse_csr:
            _check_compressed(adj.crow_indices(), adj.col_indices(), num_dst, num_src)
            return _Structure(_CSR(adj.crow_indices(), adj.col_indices(), None, num_dst, num_src))
        # CSC of A is CSR of A^T
        _check_compressed(adj.ccol_indices(), adj.row_indices(), num_src, num_dst)
        bwd = _CSR(adj.ccol_indices(), adj.row_indices(), None, num_src, num_dst)
        return _Structure(bwd.transposed(), bwd)

    structure = _cached(adj, (num_src, num_dst), build)
    return Adjacency._of(structure, num_src, num_dst, values)


def _check_compressed(ptr: torch.Tensor, idx: torch.Tensor, num_rows: int, num_cols: int) -> None:
    # torch builds sparse tensors without invariant checks by default; the product would read out of bounds
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_cols):
        raise ValueError(f"the sparse adjacency holds column indices outside [0, {num_cols}) "
                         f"(min {int(idx.min())}, max {int(idx.max())})")
    if ptr.numel() != num_rows + 1 or int(ptr[0]) != 0 or int(ptr[-1]) != idx.numel() or bool((ptr.diff() < 0).any()):
        raise ValueError(f"the sparse adjacency's compressed index pointer is malformed (expected {num_rows + 1} "
                         f"non-decreasing entries from 0 to {idx.numel()})")


def _from_sparse_tensor(adj) -> Adjacency:  # torch_sparse.SparseTensor, adj_t convention
    num_dst, num_src = (int(s) for s in adj.sparse_sizes())
    rowptr, col, value = adj.csr()

    def build():
        return _Structure(_CSR(rowptr, col, None, num_dst, num_src))

    structure = _cached(adj, (num_src, num_dst), build)
    return Adjacency._of(structure, num_src, num_dst, value)


def _is_edge_index_type(obj) -> bool:
    cls = type(obj)
    return cls.__name__ == "EdgeIndex" and cls.__module__.startswith("torch_geometric")


def as_adjacency(edge_index_or_sparse, num_nodes: NumNodes = None,
                 edge_weight: Optional[torch.Tensor] = None) -> Adjacency:
    """Normalise a graph given in any form PyG accepts to an :class:`Adjacency`.

    The CSR of the graph (and of its transpose, on first use) is built once per
    graph object and cached while that object lives; modifying the graph tensor
    in place invalidates the cache (checked through its ``_version``).

    Args:
        edge_index_or_sparse: one of
            * ``edge_index``: int64 tensor ``[2, E]`` (row 0 sources, row 1 targets);
            * a PyG ``EdgeIndex`` (its ``sparse_size`` is used when known, its CSR/CSC
              caches when it is sorted);
            * a ``torch.sparse`` COO, CSR or CSC matrix in ``adj_t`` layout
              (``[num_dst, num_src]``; values are edge weights);
            * a ``torch_sparse.SparseTensor`` (``adj_t`` layout), when installed;
            * an :class:`Adjacency` (returned as is, or with ``edge_weight`` attached).
        num_nodes: node count, or ``(num_src, num_dst)`` for bipartite graphs. For
            ``edge_index`` forms inferred as ``max index + 1`` when omitted; for a sparse
            matrix it must agree with the matrix's shape.
        edge_weight: optional ``[E]`` weights, overriding a sparse matrix's values.

    Raises:
        TypeError: an unsupported adjacency type or dtype.
        ValueError: a malformed shape or out-of-range node indices.
    """
    if torch.compiler.is_compiling():
        return _as_adjacency_outside_the_graph(edge_index_or_sparse, num_nodes, edge_weight)
    return _as_adjacency(edge_index_or_sparse, num_nodes, edge_weight)


def _as_adjacency(edge_index_or_sparse, num_nodes: NumNodes, edge_weight: Optional[torch.Tensor]) -> Adjacency:
    obj = edge_index_or_sparse
    if isinstance(obj, Adjacency):
        adj = obj
    elif _is_edge_index_type(obj):
        adj = _from_pyg_edge_index(obj, num_nodes)
    elif _TorchSparseTensor is not None and isinstance(obj, _TorchSparseTensor):
        adj = _from_sparse_tensor(obj)
    elif isinstance(obj, torch.Tensor):
        if obj.layout in _SPARSE_LAYOUTS:
            adj = _from_torch_sparse(obj, num_nodes)
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


@torch.compiler.disable
def _as_adjacency_outside_the_graph(edge_index_or_sparse, num_nodes: NumNodes,
                                    edge_weight: Optional[torch.Tensor]) -> Adjacency:
    """:func:`as_adjacency` under ``torch.compile``: run eagerly, one graph break per call.

    The CSR is cached per graph object (a weak dictionary keyed on its identity, which
    dynamo cannot trace), and building it has data-dependent steps (the bounds check reads
    the indices' extremes, the row counts come from a bincount): done here, eagerly and once
    per graph, it keeps the clear eager errors and leaves the compiled graph with fixed-size
    CSR tensors. The transpose is built now as well, for the compiled backward.
    """
    adj = _as_adjacency(edge_index_or_sparse, num_nodes, edge_weight)
    structure = adj._structure
    for csr in (structure.fwd, structure.bwd):  # builds and caches the transposed CSR
        # the unit edge values float32 products use, cached now: created inside a compiled
        # autograd Function, the cache write would make dynamo run that Function eagerly
        csr.values(None, torch.float32)
    return adj
