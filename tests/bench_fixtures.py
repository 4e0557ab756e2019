"""Test fixtures for the benchmark: tiny OGB datasets written in OGB's raw CSV layout,
and a temporary copy of the shared Cora files.

The layout mirrors what ``ogb.nodeproppred.PygNodePropPredDataset`` reads
offline: ``<root>/ogbn_<name>/RELEASE_v1.txt``, ``raw/*.csv.gz`` and
``split/<scheme>/{train,valid,test}.csv.gz``.
"""
from __future__ import annotations

import gzip
import os
import shutil

import torch

from shared_data import require_cora


def _write_csv_gz(path: str, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt") as f:
        for row in rows:
            if isinstance(row, (list, tuple)):
                f.write(",".join(str(v) for v in row) + "\n")
            else:
                f.write(f"{row}\n")


def write_ogb_fixture(root: str, name: str = "ogbn-arxiv", num_nodes: int = 90, num_edges: int = 400,
                      seed: int = 0, release: bool = True) -> str:
    """Write a small random ``name`` dataset under ``root``; returns its folder."""
    g = torch.Generator().manual_seed(seed)
    folder = os.path.join(root, name.replace("-", "_"))
    raw = os.path.join(folder, "raw")
    src = torch.randint(0, num_nodes, (num_edges,), generator=g)
    dst = torch.randint(0, num_nodes, (num_edges,), generator=g)
    keep = src != dst
    edges = torch.stack([src[keep], dst[keep]], 1).tolist()
    _write_csv_gz(os.path.join(raw, "edge.csv.gz"), edges)
    _write_csv_gz(os.path.join(raw, "num-node-list.csv.gz"), [num_nodes])
    _write_csv_gz(os.path.join(raw, "num-edge-list.csv.gz"), [len(edges)])
    if name == "ogbn-proteins":
        feats = torch.rand(len(edges), 8, generator=g)
        _write_csv_gz(os.path.join(raw, "edge-feat.csv.gz"), [[f"{v:.4f}" for v in r] for r in feats.tolist()])
        _write_csv_gz(os.path.join(raw, "node_species.csv.gz"), (torch.arange(num_nodes) % 3).tolist())
        labels = (torch.rand(num_nodes, 112, generator=g) < 0.3).long().tolist()
        _write_csv_gz(os.path.join(raw, "node-label.csv.gz"), labels)
        scheme = "species"
    else:
        num_classes = 40 if name == "ogbn-arxiv" else 47
        y = torch.randint(0, num_classes, (num_nodes,), generator=g)
        x = torch.randn(num_nodes, 16, generator=g) + 0.1 * y.unsqueeze(1).float()
        _write_csv_gz(os.path.join(raw, "node-feat.csv.gz"), [[f"{v:.5f}" for v in r] for r in x.tolist()])
        _write_csv_gz(os.path.join(raw, "node-label.csv.gz"), y.tolist())
        if name == "ogbn-arxiv":
            _write_csv_gz(os.path.join(raw, "node_year.csv.gz"), (2000 + torch.arange(num_nodes) % 20).tolist())
        scheme = "time" if name == "ogbn-arxiv" else "sales_ranking"
    perm = torch.randperm(num_nodes, generator=g)
    a, b = num_nodes // 2, (3 * num_nodes) // 4
    for part, idx in (("train", perm[:a]), ("valid", perm[a:b]), ("test", perm[b:])):
        _write_csv_gz(os.path.join(folder, "split", scheme, f"{part}.csv.gz"), sorted(idx.tolist()))
    if release:
        with open(os.path.join(folder, "RELEASE_v1.txt"), "w") as f:
            f.write("fixture\n")
    return folder


def copy_cora(tmp_path) -> str:
    """Copy the shared Cora raw files into ``tmp_path``; returns the --root to pass."""
    root = os.path.join(str(tmp_path), "planetoid")
    shutil.copytree(require_cora(), os.path.join(root, "Cora", "raw"))
    return root
