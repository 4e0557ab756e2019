"""Converted models under PyG's mini-batch loaders: training, per-step memory, resident batch features."""
import json
import os

import pytest
import torch
import torch_geometric.typing as pyg_typing

import blockquant
from blockquant import save_policy
from blockquant.bench.datasets import load_dataset
from blockquant.bench.minibatch import MiniBatchOptions, loss_nodes, make_loader, to_pyg
from blockquant.bench.models import build_model
from blockquant.cli import main

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")

HAS_SAMPLER = pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE
NO_SAMPLER = "NeighborLoader needs pyg-lib or torch-sparse, neither is installed (see docs/scaling.md, 'Mini-batch')"
NO_METIS = "ClusterLoader needs METIS from pyg-lib or torch-sparse, not installed (see docs/scaling.md, 'Mini-batch')"


def _model(ds, config=None, seed=0, hidden=64):
    torch.manual_seed(seed)
    model = build_model("sage", ds.num_features, hidden, ds.num_classes, num_layers=3, dropout=0.5)
    return blockquant.convert(model, config) if config is not None else model


def _held(model, x, edge_index, exclude=()):
    """Bytes held for backward after one training forward (and the output, so it stays alive)."""
    model.train()
    with blockquant.track_saved(model, exclude=exclude) as mem:
        out = model(x, edge_index)
    return mem, out


def _train(model, loader, epochs, lr=0.01):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    crit = torch.nn.CrossEntropyLoss()
    losses = []
    for _ in range(epochs):
        model.train()
        tot = cnt = 0
        for batch in loader:
            idx = loss_nodes(batch)
            opt.zero_grad()
            loss = crit(model(batch.x, batch.edge_index)[idx], batch.y[idx])
            loss.backward()
            opt.step()
            tot, cnt = tot + loss.item() * idx.numel(), cnt + idx.numel()
        losses.append(tot / cnt)
    return losses


def test_random_node_loader_trains_a_converted_model_unchanged():
    ds = load_dataset("synthetic:tiny")
    loader = make_loader(ds, MiniBatchOptions("random", 150), num_layers=3, seed=0)
    model = _model(ds, "iexact")
    losses = _train(model, loader, epochs=6)
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    with torch.no_grad():
        acc = ds.score(model(ds.x, ds.edge_index), ds.split["test"])
    assert acc > 0.6, acc  # 4 classes: chance is 0.25


@pytest.mark.parametrize("config", ["iexact", "default"])
def test_per_step_activation_memory_falls_as_in_full_batch(config):
    """compressed/fp32 bytes held for backward on one batch ~ the same ratio on the full graph."""
    ds = load_dataset("synthetic:small")
    batch = next(iter(make_loader(ds, MiniBatchOptions("random", 1000), num_layers=3, seed=0)))
    ratios = {}
    for where, (x, ei) in {"full": (ds.x, ds.edge_index), "batch": (batch.x, batch.edge_index)}.items():
        held = {}
        for name, cfg in (("fp32", None), ("q", config)):
            mem, out = _held(_model(ds, cfg), x, ei, exclude=(x, ei))
            held[name] = mem.total_bytes
            del out
        ratios[where] = held["q"] / held["fp32"]
    assert ratios["full"] < 0.15, ratios  # sanity: compression does save on the full graph
    assert 0.8 < ratios["batch"] / ratios["full"] < 1.25, ratios


def test_batch_features_are_resident_not_compressed(monkeypatch):
    """The loader's fresh batch.x is saved by reference: no compressed copy of it is ever made."""
    ds = load_dataset("synthetic:small")
    batch = next(iter(make_loader(ds, MiniBatchOptions("random", 1000), num_layers=3, seed=0)))
    assert batch.x.data_ptr() != ds.x.data_ptr()  # a fresh tensor, not a view of the dataset's
    quantized_ptrs = []
    real = save_policy.quantize

    def spy(x, *args, **kwargs):
        quantized_ptrs.append(x.data_ptr())
        return real(x, *args, **kwargs)

    monkeypatch.setattr(save_policy, "quantize", spy)
    model = _model(ds, "iexact")
    with_x, out = _held(model, batch.x, batch.edge_index, exclude=(batch.edge_index,))
    del out
    without_x, out = _held(model, batch.x, batch.edge_index, exclude=(batch.x, batch.edge_index))
    del out
    assert quantized_ptrs, "the converted model compressed nothing"
    assert batch.x.data_ptr() not in quantized_ptrs
    # held by reference: the graph keeps exactly batch.x's storage, at full precision
    assert with_x.total_bytes - without_x.total_bytes == batch.x.untyped_storage().nbytes()
    assert with_x.per_kind["plain"] - without_x.per_kind["plain"] == batch.x.untyped_storage().nbytes()


def test_cluster_loader_reports_what_it_needs():
    ds = load_dataset("synthetic:tiny")
    if pyg_typing.WITH_METIS:
        loader = make_loader(ds, MiniBatchOptions("cluster", 200), num_layers=3, seed=0)
        losses = _train(_model(ds, "iexact"), loader, epochs=4)
        assert losses[-1] < losses[0]
    else:
        with pytest.raises(blockquant.bench.errors.BenchError, match="pyg-lib or torch-sparse"):
            make_loader(ds, MiniBatchOptions("cluster", 200), num_layers=3, seed=0)


@pytest.mark.skipif(not HAS_SAMPLER, reason=NO_SAMPLER)
def test_neighbor_loader_trains_a_converted_model():
    ds = load_dataset("synthetic:tiny")
    loader = make_loader(ds, MiniBatchOptions("neighbor", 64), num_layers=3, seed=0)
    batch = next(iter(loader))
    assert int(batch.batch_size) == 64 and loss_nodes(batch).numel() == 64
    losses = _train(_model(ds, "iexact"), loader, epochs=4)
    assert losses[-1] < 0.8 * losses[0], losses


def test_neighbor_loader_error_names_the_packages():
    if HAS_SAMPLER:
        pytest.skip("pyg-lib or torch-sparse is installed: the loader runs (test above)")
    with pytest.raises(blockquant.bench.errors.BenchError, match="pip install pyg-lib torch-sparse"):
        make_loader(load_dataset("synthetic:tiny"), MiniBatchOptions("neighbor", 64), num_layers=3, seed=0)
    assert main(["bench", "--batch-size", "64", "--loader", "neighbor"]) == 2


def test_to_pyg_carries_the_train_mask():
    ds = load_dataset("synthetic:tiny")
    d = to_pyg(ds)
    assert int(d.train_mask.sum()) == ds.split["train"].numel()
    assert bool(d.train_mask[ds.split["train"]].all())


def test_bench_minibatch_cli(tmp_path, capsys):
    out = tmp_path / "mb"
    rc = main(["bench", "--dataset", "synthetic:tiny", "--batch-size", "200", "--loader", "random",
               "--epochs", "2", "--seeds", "1", "--hidden", "32", "--configs", "fp32,int2", "--quiet",
               "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "mini-batch: random loader, --batch-size 200, 3 steps per epoch" in stdout
    with open(os.path.join(out, "results.json")) as f:
        doc = json.load(f)
    assert doc["meta"]["loader"] == "random" and doc["meta"]["batch_size"] == 200
    recs = {r["config"]: r for r in doc["records"]}
    fp32, q = recs["fp32"], recs["int2"]
    assert fp32["batch_nodes"] == q["batch_nodes"] == 200
    assert q["activation_bytes"] < 0.2 * fp32["activation_bytes"]
    assert q["peak_step_bytes"] > 0 and fp32["peak_step_bytes"] > 0
    assert len(q["runs"][0]["step_times_s"]) == 2 * 3


def test_bench_minibatch_cli_errors(capsys):
    assert main(["bench", "--loader", "random"]) == 2
    assert "--loader random needs --batch-size" in capsys.readouterr().err
    assert main(["bench", "--batch-size", "0"]) == 2
    assert "--batch-size expects a positive integer" in capsys.readouterr().err
