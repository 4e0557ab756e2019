"""Gradient noise against dropout's: paired dropout masks, blockquant.noise_report, and
tune(max_noise_ratio=...), on the small synthetic graph (about 40 s in all on a loaded 2-core machine)."""
import pytest
import torch
import torch.nn.functional as F

import blockquant
from blockquant import QuantConfig
from blockquant.bench.datasets import load_dataset
from blockquant.probes import PairedDropout
from blockquant.tune import TuneError, tune

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")


@pytest.fixture(scope="module")
def graph():
    return load_dataset("synthetic:tiny", seed=0)


class InputDropoutGCN(torch.nn.Module):
    """PyG's examples/gcn.py shape: dropout on the input features, then GCNConv -> relu -> dropout -> GCNConv."""

    def __init__(self, f, c, hidden=16, p=0.5):
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.conv1, self.conv2, self.p = GCNConv(f, hidden), GCNConv(hidden, c), p

    def forward(self, x, edge_index):
        x = F.dropout(x, p=self.p, training=self.training)
        x = self.conv1(x, edge_index).relu()
        x = F.dropout(x, p=self.p, training=self.training)
        return self.conv2(x, edge_index)


def make(graph, p=0.5):
    torch.manual_seed(0)
    return InputDropoutGCN(graph.num_features, graph.out_dim, p=p)


def test_paired_dropout_masks_ignore_other_draws_and_keep_torchs_distribution():
    x = torch.ones(20000)
    with PairedDropout(7):
        a = F.dropout(x, 0.3, training=True)
        b = torch.nn.Dropout(0.3)(x)
    torch.rand(100)  # other code drawing from the global generator in between
    with PairedDropout(7):
        a2 = F.dropout(x, 0.3, training=True)
        b2 = torch.nn.Dropout(0.3)(x)
    assert torch.equal(a, a2) and torch.equal(b, b2) and not torch.equal(a, b)
    assert a.unique().tolist() == [0.0, pytest.approx(1 / 0.7)]
    assert abs(float((a == 0).float().mean()) - 0.3) < 0.02
    with PairedDropout(7):
        assert torch.equal(F.dropout(x, 0.3, training=False), x)


def test_noise_report_orders_configs_and_sees_compressed_dropout_outputs(graph):
    model = make(graph)
    reports = {name: blockquant.noise_report(model, graph, name, probe_steps=(0,), draws=8, compression_draws=2)
               for name in ("iexact", "int2", "int4", "int8")}
    ratios = {n: r.ratio for n, r in reports.items()}
    assert ratios["iexact"] > ratios["int2"] > ratios["int4"] > ratios["int8"] > 0, ratios
    assert ratios["int8"] < 0.01, ratios
    # conv1 is fed dropout(x), a fresh tensor compressed in training: its noise is measured (not the
    # resident x a dropout-off comparison would feed it)
    conv1 = next(r for r in reports["iexact"].layers if r.layer == "conv1")
    assert conv1.compression_var > 0.05 * conv1.dropout_var, reports["iexact"].table()
    assert reports["iexact"].total.num_params == sum(p.numel() for p in model.parameters())
    assert "compr/dropout" in reports["iexact"].table()


def test_noise_report_without_dropout_has_no_ratio(graph):
    rep = blockquant.noise_report(make(graph, p=0.0), graph, "int2", probe_steps=(0,), draws=2, compression_draws=1)
    assert rep.ratio is None and rep.total.dropout_var == 0.0 and rep.total.compression_var > 0
    with pytest.raises(ValueError, match="draws must be at least 2"):
        blockquant.noise_report(make(graph), graph, "int2", draws=1)


def test_tune_under_a_noise_budget(graph):
    grid = [QuantConfig(bits=b, block_size=g, rp_ratio=r) for b in (1, 2, 4) for g in (64, 1024) for r in (1, 8)]
    fast = dict(candidates=grid, probe_steps=(0,), max_candidates_per_layer=4, uniform_grid=(), refine=False,
                progress=False, noise_draws=4)
    res = tune(make(graph), graph, max_noise_ratio=0.25, **fast)
    assert res.error_unit == "compression variance / dropout variance" and res.max_noise_ratio == 0.25
    assert res.predicted_error <= 0.25 and res.noise_ratio is not None
    assert "of the variance dropout causes" in res.table()
    looser = tune(make(graph), graph, max_noise_ratio=4.0, **fast)
    assert looser.measured_bytes <= res.measured_bytes
    with pytest.raises(TuneError, match="does not vary with dropout"):
        tune(make(graph, p=0.0), graph, max_noise_ratio=0.25, **fast)
    with pytest.raises(TuneError, match="exactly one of budget"):
        tune(make(graph), graph, budget="iexact", max_noise_ratio=0.25)


def test_cli_tune_takes_a_noise_budget(capsys):
    from blockquant.cli import main

    rc = main(["tune", "--dataset", "synthetic:tiny", "--model", "gcn", "--hidden", "16", "--layers", "2",
               "--max-noise-ratio", "0.5", "--probe-steps", "0", "--max-candidates", "2", "--uniform-configs", "none",
               "--no-refine", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "compression variance / dropout variance" in out and "of the variance dropout causes" in out
