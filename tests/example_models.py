"""Models written in the functional style, shaped like PyG's own examples, shared by the tests of
converted models (tests/test_functional_models.py) and the unbiasedness harness (tests/test_unbiased.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GATConv, GCNConv, SAGEConv

F_IN = 16


class GCNExample(nn.Module):
    """PyG's examples/gcn.py model."""

    def __init__(self, cin=F_IN, hidden=16, cout=7, p=0.5):
        super().__init__()
        self.conv1 = GCNConv(cin, hidden)
        self.conv2 = GCNConv(hidden, cout)
        self.p = p

    def forward(self, x, edge_index):
        x = F.dropout(x, p=self.p, training=self.training)
        x = self.conv1(x, edge_index).relu()
        x = F.dropout(x, p=self.p, training=self.training)
        return self.conv2(x, edge_index)


class GATExample(nn.Module):
    """PyG's examples/gat.py model (ELU between the layers)."""

    def __init__(self, cin=F_IN, hidden=8, cout=7, heads=4, attention_dropout=0.6):
        super().__init__()
        self.conv1 = GATConv(cin, hidden, heads, dropout=attention_dropout)
        self.conv2 = GATConv(hidden * heads, cout, heads=1, concat=False, dropout=attention_dropout)

    def forward(self, x, edge_index):
        x = F.dropout(x, p=0.6, training=self.training)
        x = F.elu(self.conv1(x, edge_index))
        x = F.dropout(x, p=0.6, training=self.training)
        return self.conv2(x, edge_index)


class GatedExample(nn.Module):
    """A hand-written model: torch.relu, a sigmoid gate written as a tensor method, a product."""

    def __init__(self, cin=F_IN, hidden=32, cout=7):
        super().__init__()
        self.conv = SAGEConv(cin, hidden)
        self.gate = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, cout)

    def forward(self, x, edge_index):
        h = torch.relu(self.conv(x, edge_index))
        gate = self.gate(h).sigmoid()
        return self.out(h * gate)
