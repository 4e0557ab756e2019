"""Plain PyG models in the shape of the OGB full-batch references.

Every hidden layer is a :class:`Block`: conv -> BatchNorm1d -> ReLU -> Dropout,
all as modules (never ``F.relu``/``F.dropout``) so that
:func:`blockquant.convert` can swap each one, exactly as it would in a user's
model. The last layer is a bare conv (or linear, for ``gcn2``) producing logits.

``GNN.checkpoint_layers = True`` runs every block through non-reentrant
``torch.utils.checkpoint``: the graph then keeps only each block's input.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import BenchError

MODEL_NAMES = ("sage", "gcn", "gcn-uncached", "gat", "gatv2", "gin", "graphconv", "gcn2")


class Block(nn.Module):
    """One hidden layer: ``dropout(relu(norm(conv(x, edge_index))))``; ``norm``/``act``/``drop`` may be absent."""

    def __init__(self, conv: nn.Module, norm: Optional[nn.Module], act: Optional[nn.Module],
                 drop: Optional[nn.Module], needs_x0: bool = False):
        super().__init__()
        self.conv = conv
        self.norm = norm
        self.act = act
        self.drop = drop
        self.needs_x0 = needs_x0

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.conv(x, x0, edge_index) if self.needs_x0 else self.conv(x, edge_index)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        if self.drop is not None:
            x = self.drop(x)
        return x


class GNN(nn.Module):
    """``pre`` (optional input transform) -> blocks -> ``post`` (optional output linear).

    Attributes set by the benchmark, not by users:
        checkpoint_layers: run each block under ``torch.utils.checkpoint``.
        record_checkpoint_inputs: keep references to the tensors handed to
            checkpoint during the next forward (for memory accounting).
    """

    def __init__(self, kind: str, blocks: List[Block], pre: Optional[nn.Module] = None,
                 post: Optional[nn.Module] = None):
        super().__init__()
        self.kind = kind
        self.pre = pre
        self.blocks = nn.ModuleList(blocks)
        self.post = post
        self.checkpoint_layers = False
        self.record_checkpoint_inputs = False
        self.checkpoint_inputs: List[torch.Tensor] = []

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        self.checkpoint_inputs = []
        use_ckpt = self.checkpoint_layers and self.training and torch.is_grad_enabled()
        if self.pre is not None:
            x = self._run(self.pre, use_ckpt, x)
        x0 = x if any(b.needs_x0 for b in self.blocks) else None
        for block in self.blocks:
            x = self._run(block, use_ckpt, x, edge_index, x0)
        if self.post is not None:
            x = self._run(self.post, use_ckpt, x)
        return x

    def _run(self, module: nn.Module, use_ckpt: bool, *args):
        if not use_ckpt:
            return module(*args)
        if self.record_checkpoint_inputs:
            self.checkpoint_inputs.extend(a for a in args if isinstance(a, torch.Tensor))
        return checkpoint(module, *args, use_reentrant=False)


def build_model(name: str, in_dim: int, hidden: int, out_dim: int, num_layers: int = 3,
                dropout: float = 0.5, heads: int = 8) -> GNN:
    """Build ``name`` (one of :data:`MODEL_NAMES`) with ``num_layers`` message-passing layers.

    GAT's and GATv2's hidden layers split ``hidden`` over ``heads`` heads (OGB's arxiv GAT: 128 = 8 x 16);
    their last layer has one head. ``gcn`` caches its normalised graph (``cached=True``, as OGB's
    full-batch reference does); ``gcn-uncached`` is GCNConv with PyG's defaults (``cached=False``:
    the graph is normalised again in every layer of every step)."""
    import torch_geometric.nn as pyg

    name = name.strip().lower()
    if name not in MODEL_NAMES:
        raise BenchError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if num_layers < 1 or (name == "gcn2" and num_layers < 1):
        raise BenchError(f"--layers must be >= 1; got {num_layers}")
    if hidden < 1:
        raise BenchError(f"--hidden must be >= 1; got {hidden}")

    def hidden_block(conv, needs_x0=False):
        return Block(conv, nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout), needs_x0=needs_x0)

    if name == "gcn2":
        # GCNII: linear in, num_layers GCN2Conv blocks (initial residual to x0), linear out
        pre = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.ReLU())
        blocks = [hidden_block(pyg.GCN2Conv(hidden, alpha=0.1, theta=0.5, layer=i + 1), needs_x0=True)
                  for i in range(num_layers)]
        post = nn.Linear(hidden, out_dim)
        return GNN(name, blocks, pre=pre, post=post)

    dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]

    def conv(i: int, last: bool):
        a, b = dims[i], dims[i + 1]
        if name == "sage":
            return pyg.SAGEConv(a, b)
        if name == "gcn":
            return pyg.GCNConv(a, b, cached=True)
        if name == "gcn-uncached":
            return pyg.GCNConv(a, b)
        if name == "graphconv":
            return pyg.GraphConv(a, b)
        if name in ("gat", "gatv2"):
            cls = pyg.GATConv if name == "gat" else pyg.GATv2Conv
            if last:
                return cls(a, b, heads=1)
            if b % heads:
                raise BenchError(f"--hidden must be divisible by the {heads} attention heads; got {b}")
            return cls(a, b // heads, heads=heads)
        # gin
        mlp = nn.Sequential(nn.Linear(a, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, b))
        return pyg.GINConv(mlp, train_eps=True)

    blocks = [hidden_block(conv(i, False)) for i in range(num_layers - 1)]
    blocks.append(Block(conv(num_layers - 1, True), None, None, None))
    return GNN(name, blocks)


ZOO_MODEL_NAMES = ("pyg-gcn", "pyg-gatv2", "pyg-graphconv")


class _GraphConvNet(nn.Module):
    """Two GraphConv layers with a ReLU between them (PyG's zoo has no GraphConv model)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        import torch_geometric.nn as pyg

        self.c1, self.act, self.c2 = pyg.GraphConv(in_dim, hidden), nn.ReLU(), pyg.GraphConv(hidden, out_dim)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.c2(self.act(self.c1(x, edge_index)), edge_index)


def build_zoo_model(name: str, in_dim: int, hidden: int, out_dim: int, num_layers: int = 2, dropout: float = 0.5,
                    heads: int = 4) -> nn.Module:
    """A PyG model-zoo model with its defaults, as users build them (the host-sync checks run these beside
    :func:`build_model`'s): ``pyg-gcn`` is ``torch_geometric.nn.GCN`` (GCNConv's default ``cached=False``),
    ``pyg-gatv2`` is ``GAT(v2=True)``, ``pyg-graphconv`` two GraphConv layers."""
    import torch_geometric.nn as pyg

    if name == "pyg-gcn":
        return pyg.GCN(in_dim, hidden, num_layers, out_dim, dropout=dropout, norm="batch_norm")
    if name == "pyg-gatv2":
        return pyg.GAT(in_dim, hidden, num_layers, out_dim, v2=True, heads=heads, dropout=dropout)
    if name == "pyg-graphconv":
        return _GraphConvNet(in_dim, hidden, out_dim)
    raise BenchError(f"unknown zoo model {name!r}; expected one of {', '.join(ZOO_MODEL_NAMES)}")
