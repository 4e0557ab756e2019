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

That per-graph structure (:class:`_Structure`) is the one every layer over the graph
shares: aggregation uses its CSRs, attention (:class:`blockquant.attention.AttentionGraph`)
views the same CSR as edges sorted by target and adds what only it needs, and the
edge-chunk bounds of attention are computed from one host copy of its row pointers, once.
A graph derived from the user's (GAT's self loops, GCN's normalisation) is cached on the
user's object as well, under a name for the derivation (:func:`derived_adjacency`), so
that a training step after the first reads no index back from the device.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Callable, Dict, Hashable, List, Optional, Tuple, Union

import numpy
import torch

from ._compat import WeakIdKeyDictionary, tensor_version

try:  # optional dependency; not installed everywhere
    from torch_sparse import SparseTensor as _TorchSparseTensor  # type: ignore
except Exception:  # pragma: no cover - depends on the environment
    _TorchSparseTensor = None

NumNodes = Optional[Union[int, Tuple[int, int]]]


@contextlib.contextmanager
def quiet_sparse_warnings():
    """Silence the two warnings PyTorch gives when a sparse compressed (CSR/CSC) tensor is built: that the
    layout is in beta, and that invariant checks are off. blockquant (and its benchmark, for plain PyG's
    ``adj_t``) builds these from indices it made itself; a user can do nothing about either. Nothing else is
    silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Sparse (CSR|CSC|BSR|BSC) tensor support is in beta state",
                                category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Sparse invariant checks are implicitly disabled",
                                category=UserWarning)
        yield

_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)

# graph object (edge_index / sparse matrix / EdgeIndex / SparseTensor) ->
# {((num_src, num_dst), variant): (version, _Structure or Adjacency)}. Weak on the graph object: the
# CSR dies with the graph; the version check refuses a stale entry after an
# in-place change of the graph tensor.
_STRUCTURES: "WeakIdKeyDictionary" = WeakIdKeyDictionary()

_EXPECTED = ("an edge_index LongTensor of shape [2, E], a torch.sparse COO/CSR/CSC tensor, "
             "a torch_sparse.SparseTensor or a torch_geometric EdgeIndex")

_INT32_MAX = 2 ** 31 - 1


def _index_dtype(num_edges: int, num_rows: int, num_cols: int) -> torch.dtype:
    """int32 while every index and pointer fits (halves the cache, faster CPU products), else int64."""
    return torch.int32 if max(num_edges, num_rows, num_cols) < _INT32_MAX else torch.int64


def _rowptr(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Row pointers of entries with row ids ``rows`` (checked to lie in ``[0, num_rows)``)."""
    ptr = torch.zeros(num_rows + 1, dtype=torch.int64, device=rows.device)
    if rows.numel():
        # counts by index_add, not bincount: bincount's output size depends on the data, so on a GPU it
        # reads the maximum back to the host first
        counts = torch.zeros(num_rows, dtype=torch.int64, device=rows.device)
        counts.index_add_(0, rows.long(), torch.ones(1, dtype=torch.int64, device=rows.device).expand(rows.numel()))
        torch.cumsum(counts, 0, out=ptr[1:])
    return ptr


def _expand_ptr(rowptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """Row id of every one of the ``nnz`` stored entries of a CSR (``[nnz]`` int64)."""
    num_rows = rowptr.numel() - 1
    counts = rowptr.diff().long()
    # output_size: the size is known, so the device need not report it back to the host
    return torch.repeat_interleave(torch.arange(num_rows, device=rowptr.device), counts, output_size=nnz)


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
        with quiet_sparse_warnings():
            return torch.sparse_csr_tensor(self.rowptr, self.col, values, (self.num_rows, self.num_cols),
                                           check_invariants=False)

    def rows_of(self, start: int, stop: int) -> torch.Tensor:
        """Row id of stored entries ``start:stop`` (int64), without expanding the whole CSR."""
        pos = torch.arange(start, stop, device=self.col.device, dtype=self.rowptr.dtype)
        return torch.searchsorted(self.rowptr, pos, right=True).sub_(1).long()

    def transposed(self) -> "_CSR":
        rows = _expand_ptr(self.rowptr, self.num_edges)
        order = torch.argsort(self.col.long(), stable=True)
        rowptr_t = _rowptr(self.col.long(), self.num_cols)
        perm_t = order if self.perm is None else self.perm.long().index_select(0, order)
        return _CSR(rowptr_t, rows.index_select(0, order), perm_t, self.num_cols, self.num_rows)


def _csr_from_edges(rows: torch.Tensor, cols: torch.Tensor, num_rows: int, num_cols: int) -> _CSR:
    if rows.numel() < 2 or bool((rows[1:] >= rows[:-1]).all()):  # once per graph: already in row order
        return _CSR(_rowptr(rows, num_rows), cols, None, num_rows, num_cols)
    perm = torch.argsort(rows, stable=True)  # stable: equal rows keep the edge order
    return _CSR(_rowptr(rows, num_rows), cols.index_select(0, perm), perm, num_rows, num_cols)


class _Structure:
    """One graph's structure, shared by every layer over it: its CSR (rows are targets), and, each
    built on first use, the transpose (rows are sources), the pieces attention adds (each stored
    edge's target, the source-sorted order of the stored edges) and the edge-chunk bounds."""

    __slots__ = ("fwd", "_bwd", "owner", "derived_weight", "_dst", "_transpose_order", "_host_rowptr", "_chunks",
                 "_attention", "__weakref__")

    def __init__(self, fwd: _CSR, bwd: Optional[_CSR] = None):
        self.fwd = fwd
        self._bwd = bwd
        self.owner = None  # weak reference to the graph object it is cached on
        self.derived_weight = None  # the edge weights a derived graph was cached with (derived_adjacency)
        self._dst = None
        self._transpose_order = None
        self._host_rowptr = None
        self._chunks: Dict[int, List[Tuple[int, int, int, int]]] = {}
        self._attention = None

    def owned_by_a_live_graph(self) -> bool:
        return self.owner is not None and self.owner() is not None

    def tensors(self):
        parts = [self.fwd] + ([self._bwd] if self._bwd is not None else [])
        held = [t for c in parts for t in (c.rowptr, c.col, c.perm, *c._units.values()) if t is not None]
        extra = [self._dst] + list(self._transpose_order or ())
        return tuple(held) + tuple(t for t in extra if t is not None and all(t is not h for h in held))

    @property
    def bwd(self) -> _CSR:
        if self._bwd is None:
            fwd = self.fwd
            # attention's pieces are reused when it built them, and not kept when only aggregation needs them
            t_rowptr, t_order = self._transpose_order or self._sorted_by_source()
            rows = self._dst if self._dst is not None else _expand_ptr(fwd.rowptr, fwd.num_edges)
            perm_t = t_order if fwd.perm is None else fwd.perm.index_select(0, t_order)
            self._bwd = _CSR(t_rowptr, rows.index_select(0, t_order), perm_t, fwd.num_cols, fwd.num_rows)
        return self._bwd

    def dst(self) -> torch.Tensor:
        """The row (target) of every stored entry of :attr:`fwd`, ``[E]`` in its index dtype (kept)."""
        if self._dst is None:
            self._dst = _expand_ptr(self.fwd.rowptr, self.fwd.num_edges).to(self.fwd.col.dtype)
        return self._dst

    def transpose_order(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rowptr, order)`` of the transpose: ``order[k]`` is the :attr:`fwd` position of the
        transpose's stored entry ``k`` (entries sorted by source, stable). Kept."""
        if self._transpose_order is None:
            self._transpose_order = self._sorted_by_source()
        return self._transpose_order

    def _sorted_by_source(self) -> Tuple[torch.Tensor, torch.Tensor]:
        fwd = self.fwd
        order = torch.argsort(fwd.col.long(), stable=True)
        return _rowptr(fwd.col.long(), fwd.num_cols).to(fwd.rowptr.dtype), order.to(fwd.col.dtype)

    def target_chunks(self, edges: int) -> List[Tuple[int, int, int, int]]:
        """``[(a, b, da, db), ...]``: consecutive stored-entry ranges ``[a, b)`` of :attr:`fwd` holding
        all the entries of rows (targets) ``[da, db)``, about ``edges`` entries each (a row with more
        gets a chunk of its own). Computed once per size from one host copy of the row pointers
        (read from the device once per graph), so using them never reads the device again."""
        hit = self._chunks.get(edges)
        if hit is not None:
            return hit
        if self._host_rowptr is None:
            # the one device read per graph; a NumPy array on the host (no copy of a CPU tensor)
            self._host_rowptr = self.fwd.rowptr.cpu().numpy()
        ptr = self._host_rowptr
        num_rows = len(ptr) - 1
        chunks = []
        da = 0
        while da < num_rows:
            a = int(ptr[da])
            db = int(numpy.searchsorted(ptr, a + edges, side="right")) - 1
            db = min(max(db, da + 1), num_rows)
            chunks.append((a, int(ptr[db]), da, db))
            da = db
        self._chunks[edges] = chunks
        return chunks

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


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
            rows, cols = _expand_ptr(f.rowptr, f.num_edges), f.col.long()
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

    def tensors(self):
        """The tensors this adjacency keeps alive for a step (for memory accounting): the edge
        weights, and the CSR when nothing else holds it. The CSR of a graph the caller keeps
        (``data.edge_index``) is graph state cached for that graph's lifetime
        (:meth:`cache_nbytes`), like the ``edge_index`` itself; the CSR of a graph built inside
        the step (GCN's normalised graph without ``cached=True``) lives only as long as the
        autograd graph does, and is counted."""
        held = tuple(t for t in (self.edge_weight,) if t is not None)
        if self._structure.owned_by_a_live_graph():
            # a derived graph's weights (GCN's normalisation) are cached with it, like its CSR
            return tuple(t for t in held if t is not self._structure.derived_weight)
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
    # the four extremes read back together: one device read per graph
    lo_s, lo_d, hi_s, hi_d = torch.stack([src.min(), dst.min(), src.max(), dst.max()]).tolist()
    lo = min(lo_s, lo_d)
    if lo < 0 or hi_s >= num_src or hi_d >= num_dst:
        raise ValueError(f"{what} holds node indices outside [0, {num_src}) x [0, {num_dst}) "
                         f"(min {lo}, max source {hi_s}, max target {hi_d}); pass the right num_nodes or size")


def _cached(key_obj, sizes: Tuple[int, int], build, variant: Hashable = None):
    """What ``build()`` makes for ``key_obj`` at ``sizes`` (a structure, or for a ``variant`` what
    :func:`derived_adjacency` caches), rebuilt when the object changed in place."""
    version = tensor_version(key_obj) if isinstance(key_obj, torch.Tensor) else 0
    key = (sizes, variant)
    per_obj = _STRUCTURES.get(key_obj)
    if per_obj is not None:
        hit = per_obj.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
    else:
        per_obj = {}
        _STRUCTURES[key_obj] = per_obj
    built = build()
    structure = built._structure if isinstance(built, Adjacency) else built
    structure.owner = weakref.ref(key_obj)
    for stale in [k for k, v in per_obj.items() if v[0] != version]:
        del per_obj[stale]
    per_obj[key] = (version, built)
    return built


def derived_adjacency(key_obj, variant: Hashable, num_nodes: Tuple[int, int],
                      derive: Callable[[], object]) -> "Adjacency":
    """The :class:`Adjacency` of a graph derived from ``key_obj`` (the user's graph object), cached
    on it under ``variant`` (a hashable name of the derivation and its options), so that the
    derivation and its CSR are computed once per graph, not once per call.

    ``derive()`` returns the derived graph in any form :func:`as_adjacency` accepts (an
    :class:`Adjacency` included), or a ``(form, edge_weight)`` pair of constant weights; it is called
    only on a cache miss. The entry dies with
    ``key_obj`` and is rebuilt when ``key_obj`` is modified in place.
    """
    if torch.compiler.is_compiling():
        return _derived_adjacency_outside_the_graph(key_obj, variant, num_nodes, derive)
    return _derived_adjacency(key_obj, variant, num_nodes, derive)


@torch.compiler.disable
def _derived_adjacency_outside_the_graph(key_obj, variant: Hashable, num_nodes: Tuple[int, int],
                                         derive: Callable[[], object]) -> "Adjacency":
    """:func:`derived_adjacency` under ``torch.compile``, eagerly (one graph break), as
    :func:`_as_adjacency_outside_the_graph`: the transpose is built now for the compiled backward."""
    adj = _derived_adjacency(key_obj, variant, num_nodes, derive)
    for csr in (adj._structure.fwd, adj._structure.bwd):
        csr.values(None, torch.float32)
    return adj


def _derived_adjacency(key_obj, variant: Hashable, num_nodes: Tuple[int, int],
                       derive: Callable[[], object]) -> "Adjacency":
    def build():
        form = derive()
        weight = None
        if isinstance(form, tuple):
            form, weight = form
        adj = as_adjacency(form, num_nodes=num_nodes, edge_weight=weight)
        fwd, weight, edges = adj._structure.fwd, adj.edge_weight, adj._edges
        if weight is not None and fwd.perm is not None:
            # constant weights of a graph nobody sees the edges of: stored in CSR order (its edge
            # order from now on), so that products read them as they are, never a per-call gather
            weight = fwd.values(weight, weight.dtype)
            fwd, edges = _CSR(fwd.rowptr, fwd.col, None, fwd.num_rows, fwd.num_cols), None
            structure = _Structure(fwd)
        else:
            # its own structure (the derived form is a temporary, or shares the CSR of another object)
            structure = _Structure(fwd, adj._structure._bwd)
        structure.derived_weight = weight
        return Adjacency._of(structure, adj.num_src, adj.num_dst, weight, edges)

    return _cached(key_obj, (int(num_nodes[0]), int(num_nodes[1])), build, variant)


def cached_graph_tensors(key_obj) -> List[torch.Tensor]:
    """Every tensor cached with the graph object ``key_obj``: its CSRs, and the structures and
    weights of the graphs derived from it (:func:`derived_adjacency`)."""
    found: List[torch.Tensor] = []
    for _, built in (_STRUCTURES.get(key_obj) or {}).values():
        structure = built._structure if isinstance(built, Adjacency) else built
        found.extend(structure.tensors())
        if isinstance(built, Adjacency) and built.edge_weight is not None:
            found.append(built.edge_weight)
    return found


def cached_derived_weights() -> List[torch.Tensor]:
    """The edge weights :func:`derived_adjacency` keeps with live graph objects (GCN's normalised
    weights): graph state cached for the graph's lifetime, like its CSR, which memory accounting
    (:func:`blockquant.track_saved`) does not count as held by a step."""
    return [entry[1].edge_weight for per_obj in list(_STRUCTURES.values()) for entry in per_obj.values()
            if isinstance(entry[1], Adjacency) and entry[1].edge_weight is not None]


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
    the indices' extremes, the sort is skipped when the edges are already sorted): done here,
    eagerly and once per graph, it keeps the clear eager errors and leaves the compiled graph
    with fixed-size CSR tensors. The transpose is built now as well, for the compiled backward.
    """
    adj = _as_adjacency(edge_index_or_sparse, num_nodes, edge_weight)
    structure = adj._structure
    for csr in (structure.fwd, structure.bwd):  # builds and caches the transposed CSR
        # the unit edge values float32 products use, cached now: created inside a compiled
        # autograd Function, the cache write would make dynamo run that Function eagerly
        csr.values(None, torch.float32)
    return adj
