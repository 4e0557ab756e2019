"""Normalise every adjacency form PyG accepts into one edge-list view (work in progress)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch


class Adjacency:
    """Edge list view of a graph: ``src``, ``dst`` (int64, [E]), optional ``edge_weight`` ([E]),
    ``num_src`` and ``num_dst``. Messages flow source -> target: ``out[dst] += x[src]``."""

    def __init__(self, src, dst, num_src: int, num_dst: int, edge_weight=None):
        self.src, self.dst, self.num_src, self.num_dst, self.edge_weight = src, dst, num_src, num_dst, edge_weight


def as_adjacency(edge_index_or_sparse, num_nodes: Optional[Union[int, Tuple[int, int]]] = None,
                 edge_weight: Optional[torch.Tensor] = None) -> Adjacency:
    """Normalise ``edge_index`` [2, E], torch.sparse COO/CSR/CSC, ``torch_sparse.SparseTensor`` or PyG ``EdgeIndex``."""
    raise NotImplementedError
