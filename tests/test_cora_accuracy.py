"""Real Cora: compressed training at the default config matches full precision, and
gradient error falls with the bit width.

Uses the raw Planetoid files in the shared data folder beside the repository
(downloads do not work in CI); the files are copied to a temporary directory before loading.
"""
import shutil
import warnings

import pytest
import torch

import blockquant
from blockquant import QuantConfig
from blockquant.conversion import ConversionWarning

from shared_data import require_cora
SEEDS = (0, 1, 2, 3, 4)
EVAL_EVERY = 5  # model selection on validation accuracy, every few epochs in the second half



pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")


@pytest.fixture(scope="module")
def cora(tmp_path_factory):
    from torch_geometric.datasets import Planetoid

    root = tmp_path_factory.mktemp("planetoid")
    shutil.copytree(require_cora(), root / "Cora" / "raw")
    return Planetoid(str(root), "Cora")[0]


def make_model(name: str, num_features: int, num_classes: int):
    """(model, lr, weight decay, epochs): the usual 2-layer settings, with epoch counts
    trimmed to where Cora has converged (CI time)."""
    from torch_geometric.nn.models import GAT, GCN, GraphSAGE

    if name == "gcn":
        return GCN(num_features, 16, 2, num_classes, dropout=0.5), 0.01, 5e-4, 100
    if name == "sage":
        return GraphSAGE(num_features, 64, 2, num_classes, dropout=0.5), 0.01, 5e-4, 50
    if name in ("gat", "gatv2"):
        return (GAT(num_features, 64, 2, num_classes, heads=8, dropout=0.6, act="elu", v2=name == "gatv2"),
                0.01, 5e-4, 60)
    raise ValueError(name)


def train_eval(data, name: str, seed: int, config) -> float:
    """Test accuracy (%) at the epoch of best validation accuracy."""
    torch.manual_seed(seed)
    model, lr, wd, epochs = make_model(name, data.num_features, int(data.y.max()) + 1)
    if config is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConversionWarning)  # everything must be covered
            model = blockquant.convert(model, config)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    best_val, test_at_best = -1.0, 0.0
    for epoch in range(epochs):
        model.train()
        opt.zero_grad()
        out = model(data.x, data.edge_index)
        torch.nn.functional.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        opt.step()
        if epoch < epochs // 2 or (epoch + 1) % EVAL_EVERY:
            continue
        model.eval()
        with torch.no_grad():
            pred = model(data.x, data.edge_index).argmax(-1)
        val = (pred[data.val_mask] == data.y[data.val_mask]).float().mean().item()
        if val > best_val:
            best_val = val
            test_at_best = (pred[data.test_mask] == data.y[data.test_mask]).float().mean().item()
    return 100.0 * test_at_best


@pytest.mark.parametrize("name", ["gcn", "sage", "gat"])
def test_default_config_matches_full_precision(cora, name):
    full = [train_eval(cora, name, s, None) for s in SEEDS]
    comp = [train_eval(cora, name, s, QuantConfig.preset("default")) for s in SEEDS]
    mean_full, mean_comp = sum(full) / len(full), sum(comp) / len(comp)
    assert mean_full > 70.0, f"full-precision {name} is not training properly: {full}"
    assert mean_comp >= mean_full - 1.0, (
        f"{name}: compressed {mean_comp:.2f} (runs {comp}) vs full precision {mean_full:.2f} (runs {full})")


def gradient_relative_error(data, config, seeds=(0, 1, 2)) -> float:
    """Mean ||g_q - g|| / ||g|| over all parameters' gradients of one step (no dropout)."""
    from torch_geometric.nn.models import GraphSAGE

    torch.manual_seed(123)
    ref = GraphSAGE(data.num_features, 64, 2, int(data.y.max()) + 1, dropout=0.0).train()
    loss = torch.nn.functional.cross_entropy(ref(data.x, data.edge_index)[data.train_mask],
                                             data.y[data.train_mask])
    exact = torch.autograd.grad(loss, list(ref.parameters()))
    exact = torch.cat([g.flatten() for g in exact])
    errs = []
    for seed in seeds:
        torch.manual_seed(123)
        model = GraphSAGE(data.num_features, 64, 2, int(data.y.max()) + 1, dropout=0.0).train()
        model.load_state_dict(ref.state_dict())
        model = blockquant.convert(model, config)
        torch.manual_seed(seed)
        loss = torch.nn.functional.cross_entropy(model(data.x, data.edge_index)[data.train_mask],
                                                 data.y[data.train_mask])
        g = torch.cat([t.flatten() for t in torch.autograd.grad(loss, list(model.parameters()))])
        errs.append(((g - exact).norm() / exact.norm()).item())
    return sum(errs) / len(errs)


def test_gradient_error_decreases_with_bits(cora):
    errors = {b: gradient_relative_error(cora, QuantConfig(bits=b, block_size=1024)) for b in (1, 2, 4, 8)}
    assert errors[1] > errors[2] > errors[4] > errors[8], errors
    assert errors[8] < 0.02, errors
    assert errors[2] < 0.5, errors
    # random projection trades memory for gradient variance
    with_rp = gradient_relative_error(cora, QuantConfig(bits=2, block_size=1024, rp_ratio=8))
    assert with_rp > errors[2], (with_rp, errors)
