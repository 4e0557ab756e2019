"""A converted GCNConv with PyG's default cached=False normalises a graph once per graph object and options,
not in every layer of every step, and stays equal to PyG's GCNConv (which normalises every call)."""
import pytest
import torch
from torch_geometric.nn import GCN2Conv, GCNConv
from torch_geometric.utils import to_torch_csc_tensor

import blockquant
import blockquant.nn.conv as qconv
from blockquant import QuantConfig

EXACT_CODEC = QuantConfig(bits=8, rounding="nearest")


def _graph(n=80, e=600, f=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, f, generator=g), torch.randint(0, n, (2, e), generator=g)


@pytest.fixture
def norm_calls(monkeypatch):
    calls = []
    real = qconv.gcn_norm

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(qconv, "gcn_norm", counting)
    return calls


def _pair(factory, config=EXACT_CODEC):
    torch.manual_seed(0)
    orig = factory()
    torch.manual_seed(0)
    return orig, blockquant.convert(factory(), config)


def _out_and_grads(module, x, graph, *extra):
    x = x.clone().requires_grad_()
    out = module(x, *extra, graph)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                [x, *module.parameters()])
    return out, grads


@pytest.mark.parametrize("form", ["edge_index", "csr"])
def test_normalised_once_per_graph_and_equal_to_pyg(norm_calls, form):
    x, ei = _graph()
    graph = ei if form == "edge_index" else to_torch_csc_tensor(ei, size=(80, 80)).t()
    layers = [_pair(lambda: GCNConv(12, 12)) for _ in range(3)]
    for step in range(2):
        for orig, conv in layers:
            out, grads = _out_and_grads(conv, x, graph)
            ref, ref_grads = _out_and_grads(orig, x, graph)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            for a, b in zip(grads, ref_grads):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # three layers, two steps: one normalisation of this graph, shared
    assert len(norm_calls) == 1
    # other options (improved, no self loops) are another normalisation of the same graph
    orig, conv = _pair(lambda: GCNConv(12, 12, improved=True, add_self_loops=False))
    torch.testing.assert_close(conv(x * 1.0, graph), orig(x, graph), rtol=1e-5, atol=1e-5)
    assert len(norm_calls) == 2


def test_renormalised_after_an_in_place_change_and_for_a_new_graph(norm_calls):
    x, ei = _graph(seed=1)
    orig, conv = _pair(lambda: GCNConv(12, 5))
    conv(x * 1.0, ei)
    ei[1, :100] = (ei[1, :100] + 3) % 80  # in place: the cached normalisation is stale
    torch.testing.assert_close(conv(x * 1.0, ei), orig(x, ei), rtol=1e-5, atol=1e-5)
    other = ei.clone()
    torch.testing.assert_close(conv(x * 1.0, other), orig(x, other), rtol=1e-5, atol=1e-5)
    assert len(norm_calls) == 3


def test_edge_weights_and_cached_true_keep_pyg_behaviour(norm_calls):
    x, ei = _graph(seed=2)
    w = torch.rand(ei.size(1))
    orig, conv = _pair(lambda: GCNConv(12, 5))
    for _ in range(2):
        torch.testing.assert_close(conv(x * 1.0, ei, w), orig(x, ei, w), rtol=1e-5, atol=1e-5)
    assert len(norm_calls) == 2  # given weights: normalised per call, as PyG does
    orig, conv = _pair(lambda: GCNConv(12, 5, cached=True))
    conv(x * 1.0, ei)
    conv(x * 1.0, ei.clone())  # cached=True: the first graph's normalisation is kept, as in PyG
    assert len(norm_calls) == 3


def test_gcn2_uses_the_cache_too(norm_calls):
    x, ei = _graph(seed=3)
    orig, conv = _pair(lambda: GCN2Conv(12, alpha=0.1))
    for _ in range(2):
        out, grads = _out_and_grads(conv, x, ei, x)
        ref, ref_grads = _out_and_grads(orig, x, ei, x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(norm_calls) == 1
