"""Benchmark datasets: the synthetic generator, Planetoid from a local copy, OGB from a generated fixture."""
import os
import time

import pytest
import torch

from bench_fixtures import copy_cora, write_ogb_fixture
from blockquant.bench.datasets import (
    SYNTHETIC_PRESETS, DatasetError, generate_synthetic, load_dataset, ogb_required_files,
)


def _assert_partition(ds):
    parts = [ds.split[k] for k in ("train", "valid", "test")]
    allidx = torch.cat(parts)
    assert allidx.unique().numel() == allidx.numel(), "splits overlap"
    assert int(allidx.min()) >= 0 and int(allidx.max()) < ds.num_nodes


def test_synthetic_is_deterministic_and_seed_dependent():
    a = load_dataset("synthetic:tiny")
    b = load_dataset("synthetic:tiny")
    for k in ("x", "edge_index", "y"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    for k in ("train", "valid", "test"):
        assert torch.equal(a.split[k], b.split[k])
    c = generate_synthetic(SYNTHETIC_PRESETS["tiny"], seed=1)
    assert not torch.equal(a.y, c.y)


def test_synthetic_shape_and_splits():
    ds = load_dataset("synthetic")  # the default 'small' preset
    spec = SYNTHETIC_PRESETS["small"]
    assert ds.name == "synthetic:small"
    assert (ds.num_nodes, ds.num_features, ds.num_classes) == (spec.num_nodes, spec.num_features, spec.num_classes)
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    ei = ds.edge_index
    assert ei.shape[0] == 2 and int(ei.max()) < ds.num_nodes
    assert not bool((ei[0] == ei[1]).any()), "self loops"
    # undirected: every edge appears in both directions
    fwd = set(map(tuple, ei.t().tolist()))
    assert all((d, s) in fwd for s, d in list(fwd)[:2000])
    _assert_partition(ds)
    assert sum(v.numel() for v in ds.split.values()) == ds.num_nodes
    # structure is informative: most edges join nodes of the same class
    assert (ds.y[ei[0]] == ds.y[ei[1]]).float().mean() > 0.6


def test_synthetic_arxiv_like_is_fast_and_has_arxiv_shape():
    t = time.perf_counter()
    ds = load_dataset("synthetic:arxiv-like")
    elapsed = time.perf_counter() - t
    assert elapsed < 20, f"generation took {elapsed:.1f}s"
    assert ds.num_nodes == 169_343 and ds.num_features == 128 and ds.num_classes == 40
    undirected = ds.num_edges // 2
    assert abs(undirected - 1_166_243) / 1_166_243 < 0.01
    assert torch.bincount(ds.y, minlength=40).min() > 0


def test_synthetic_scale_option():
    ds = load_dataset("synthetic:small", scale=0.2)
    assert ds.num_nodes == round(SYNTHETIC_PRESETS["small"].num_nodes * 0.2)
    with pytest.raises(DatasetError, match="--scale"):
        load_dataset("synthetic", scale=-1.0)
    with pytest.raises(DatasetError, match="arxiv-like"):
        load_dataset("synthetic:huge")


def test_synthetic_labels_are_learnable():
    """A quick 2-layer SAGE beats chance by a wide margin, and beats a features-only MLP."""
    from torch_geometric.nn import SAGEConv

    ds = load_dataset("synthetic:tiny")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny graph: one thread is as fast and robust on a busy machine
    tr, te = ds.split["train"], ds.split["test"]

    class Sage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = SAGEConv(ds.num_features, 64), SAGEConv(64, ds.num_classes)

        def forward(self, x, ei):
            return self.c2(self.c1(x, ei).relu(), ei)

    mlp = torch.nn.Sequential(torch.nn.Linear(ds.num_features, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, ds.num_classes))
    accs = {}
    for name, model, call in (("sage", Sage(), lambda m: m(ds.x, ds.edge_index)), ("mlp", mlp, lambda m: m(ds.x))):
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(30):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(call(model)[tr], ds.y[tr]).backward()
            opt.step()
        with torch.no_grad():
            accs[name] = (call(model)[te].argmax(-1) == ds.y[te]).float().mean().item()
    torch.set_num_threads(threads)
    chance = 1.0 / ds.num_classes
    assert accs["sage"] > chance + 0.4, accs
    assert accs["sage"] > accs["mlp"] + 0.1, accs


def test_cora_from_local_copy(tmp_path):
    root = copy_cora(tmp_path)
    ds = load_dataset("cora", root)
    assert (ds.num_nodes, ds.num_features, ds.num_classes) == (2708, 1433, 7)
    assert {k: v.numel() for k, v in ds.split.items()} == {"train": 140, "valid": 500, "test": 1000}
    _assert_partition(ds)


def test_planetoid_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match=r"Cora raw files not found.*--root"):
        load_dataset("cora", str(tmp_path / "nothing"))
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet", str(tmp_path))


@pytest.mark.parametrize("name", ["ogbn-arxiv", "ogbn-products"])
def test_ogb_fixture_loads_with_split_and_evaluator(tmp_path, name):
    folder = write_ogb_fixture(str(tmp_path), name, num_nodes=80)
    ds = load_dataset(name, str(tmp_path))
    assert ds.num_nodes == 80 and ds.num_features == 16
    assert ds.task == "multiclass" and ds.metric == "acc"
    assert ds.num_classes == (40 if name == "ogbn-arxiv" else 47)
    _assert_partition(ds)
    assert {k: v.numel() for k, v in ds.split.items()} == {"train": 40, "valid": 20, "test": 20}
    # OGB's Evaluator scores a perfect prediction as 1 and a wrong one as 0
    onehot = torch.nn.functional.one_hot(ds.y, ds.num_classes).float()
    assert ds.score(onehot, ds.split["test"]) == 1.0
    assert ds.score(onehot.roll(1, dims=1), ds.split["test"]) == 0.0
    # graph is symmetric (arxiv is stored directed in OGB; the benchmark makes it undirected)
    pairs = set(map(tuple, ds.edge_index.t().tolist()))
    assert all((d, s) in pairs for s, d in pairs)
    # the second load reads the processed file (weights_only torch.load with registered PyG classes)
    assert os.path.isfile(os.path.join(folder, "processed", "geometric_data_processed.pt"))
    again = load_dataset(name, str(tmp_path))
    assert torch.equal(again.x, ds.x) and torch.equal(again.y, ds.y)


def test_ogb_proteins_fixture_multilabel_rocauc(tmp_path):
    write_ogb_fixture(str(tmp_path), "ogbn-proteins", num_nodes=70)
    ds = load_dataset("ogbn-proteins", str(tmp_path))
    assert ds.task == "multilabel" and ds.metric == "rocauc"
    assert ds.y.shape == (70, 112) and ds.out_dim == 112
    assert ds.num_features == 8  # mean of the 8 edge features
    assert ds.score(ds.y * 2 - 1, ds.split["valid"]) == pytest.approx(1.0)


def test_ogb_missing_pieces_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"no folder .*ogbn_arxiv.*--root"):
        load_dataset("ogbn-arxiv", str(tmp_path))
    write_ogb_fixture(str(tmp_path), "ogbn-arxiv", release=False)
    with pytest.raises(DatasetError, match="RELEASE_v1.txt"):
        load_dataset("ogbn-arxiv", str(tmp_path))
    folder = write_ogb_fixture(str(tmp_path / "b"), "ogbn-arxiv")
    os.remove(os.path.join(folder, "raw", "node_year.csv.gz"))
    with pytest.raises(DatasetError, match="node_year.csv.gz"):
        load_dataset("ogbn-arxiv", str(tmp_path / "b"))
    assert "raw/node-feat.csv.gz" in ogb_required_files("ogbn-arxiv")
    assert "raw/edge-feat.csv.gz" in ogb_required_files("ogbn-proteins")
