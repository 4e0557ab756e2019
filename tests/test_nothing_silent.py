"""Inputs and uses the compressed path cannot honour are refused with a clear error, never
silently wrong: second-order gradients, options changed after conversion, lazy layers,
static-graph input, TorchScript, and what happens to the children of a refused layer."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch_geometric.nn import GCNConv, GINConv, GraphConv, SAGEConv
from torch_geometric.nn.aggr import MaxAggregation
from torch_geometric.nn.dense.linear import Linear as PyGLinear
from torch_geometric.utils import coalesce, remove_self_loops

import blockquant
from blockquant import QuantConfig
from blockquant.conversion import ConversionWarning
from blockquant.nn import CompressedModule

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")

N, F = 50, 8
# 8-bit nearest rounding: deterministic, so runs can be compared exactly
DETERMINISTIC = QuantConfig(bits=8, block_size=64, rounding="nearest")


def _graph():
    g = torch.Generator().manual_seed(0)
    ei = remove_self_loops(coalesce(torch.randint(0, N, (2, 200), generator=g), num_nodes=N))[0]
    return torch.randn(N, F, generator=g), ei


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(F, 16)
        self.norm = nn.BatchNorm1d(16)
        self.act = nn.ELU()
        self.conv = SAGEConv(16, 4)

    def forward(self, x, ei):
        return self.conv(self.act(self.norm(self.lin(x))), ei)


def _quiet_convert(model, config=DETERMINISTIC):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)
        return blockquant.convert(model, config)


# ------------------------------------------------------------------ second-order gradients

def test_gradient_penalty_through_a_converted_model_raises_and_names_the_fix():
    torch.manual_seed(0)
    x, ei = _graph()
    model = _quiet_convert(_Net())
    params = list(model.parameters())
    loss = model(x, ei).pow(2).sum()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in grads)
    with pytest.raises(RuntimeError, match=r"second-order gradients are not supported.*to_original"):
        penalty.backward()
    # the first-order gradients computed with create_graph=True are the usual ones
    plain = torch.autograd.grad(model(x, ei).pow(2).sum(), params)
    for a, b in zip(grads, plain):
        assert torch.allclose(a.detach(), b, rtol=1e-5, atol=1e-6)
    # the named fix works: the same Parameters, exact second order
    exact = blockquant.to_original(model)
    assert not any(isinstance(m, CompressedModule) for m in exact.modules())
    grads = torch.autograd.grad(exact(x, ei).pow(2).sum(), params, create_graph=True)
    sum(g.pow(2).sum() for g in grads).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


# ------------------------------------------------------------------ options changed after conversion

def _pair(factory):
    torch.manual_seed(0)
    orig = factory()
    wrapped = _quiet_convert(copy.deepcopy(orig))
    return orig, wrapped


def test_flow_changed_after_conversion_is_refused_at_the_next_training_forward():
    x, ei = _graph()
    orig, conv = _pair(lambda: GCNConv(F, 4))
    conv.flow = "target_to_source"
    orig.flow = "target_to_source"
    with pytest.raises(RuntimeError, match=r"flow='target_to_source'.*set after conversion"):
        conv(x, ei)
    conv.eval()
    orig.eval()
    assert torch.equal(conv(x, ei), orig(x, ei))  # eval runs the original forward
    # converting again leaves the layer exact and says why
    with pytest.warns(ConversionWarning, match="flow"):
        again = blockquant.convert(conv)
    assert type(again) is GCNConv


@pytest.mark.parametrize("change", ["normalize", "add_self_loops", "improved", "cached"])
def test_gcn_flags_changed_after_conversion_are_honoured(change):
    x, ei = _graph()
    orig, conv = _pair(lambda: GCNConv(F, 4))
    for m in (orig, conv):
        setattr(m, change, not getattr(m, change))
    assert torch.allclose(conv(x, ei), orig(x, ei), atol=1e-6)


def test_aggregation_changed_after_conversion_is_honoured():
    x, ei = _graph()
    orig, conv = _pair(lambda: SAGEConv(F, 4))
    for m in (orig, conv):
        m.aggr_module = MaxAggregation()
    assert torch.allclose(conv(x, ei), orig(x, ei), atol=1e-6)


def test_module_hooks_registered_after_conversion_run_in_training():
    x, ei = _graph()
    orig, conv = _pair(lambda: GraphConv(F, 4))
    calls = []
    for m in (orig, conv):
        m.register_forward_pre_hook(lambda mod, args: (args[0] * 2, *args[1:]))
        m.register_forward_hook(lambda mod, args, out: calls.append(type(mod).__name__) or out + 1)
    assert torch.allclose(conv(x, ei), orig(x, ei), atol=1e-6)
    assert calls == ["QGraphConv", "GraphConv"]


def test_message_passing_hooks_registered_after_conversion_are_refused():
    x, ei = _graph()
    _, conv = _pair(lambda: GCNConv(F, 4))
    conv.register_message_forward_hook(lambda mod, inputs, out: out * 2)
    with pytest.raises(RuntimeError, match="message-passing hooks"):
        conv(x, ei)


# ------------------------------------------------------------------ lazy layers, static graphs, TorchScript

@pytest.mark.parametrize("factory", [lambda: GCNConv(-1, 4), lambda: SAGEConv(-1, 4), lambda: PyGLinear(-1, 4),
                                     lambda: nn.LazyLinear(4)], ids=["GCNConv", "SAGEConv", "PyGLinear", "LazyLinear"])
def test_lazy_layers_are_refused_at_convert_time_until_one_forward(factory):
    x, ei = _graph()
    layer = factory()
    born_lazy_type = isinstance(layer, nn.LazyLinear)  # a LazyLinear turns into a Linear on its first forward
    model = nn.ModuleList([layer])
    with pytest.warns(ConversionWarning, match="run one forward pass first, then convert"):
        blockquant.convert(model)
    assert not isinstance(model[0], CompressedModule)
    assert "run one forward pass first" in blockquant.summary(model, print_it=False)
    out = model[0](x, ei) if isinstance(layer, (GCNConv, SAGEConv)) else model[0](x)  # trains exactly
    out.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        blockquant.convert(model)
    assert isinstance(model[0], CompressedModule)
    if not born_lazy_type:
        with pytest.raises(ValueError, match="run one forward pass first"):
            type(model[0]).from_module(factory())


@pytest.mark.parametrize("factory", [lambda: GCNConv(F, 4), lambda: SAGEConv(F, 4), lambda: GraphConv(F, 4),
                                     lambda: GINConv(nn.Linear(F, 4))], ids=["GCN", "SAGE", "GraphConv", "GIN"])
def test_static_graph_input_is_refused_in_training_with_what_to_do(factory):
    x, ei = _graph()
    orig, conv = _pair(factory)
    xs = torch.stack([x, x * 2])
    with pytest.raises(ValueError, match=r"static-graph input.*\[batch \* num_nodes, channels\]"):
        conv(xs, ei)
    conv.eval()
    orig.eval()
    assert torch.allclose(conv(xs, ei), orig(xs, ei))


# scripting is deprecated in PyTorch; users who still script get blockquant's message, which is what this checks
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_jit_script_is_refused_with_the_fix_and_the_fix_works():
    x, ei = _graph()
    for model, args in ((nn.Sequential(nn.Linear(F, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4)), (x,)),
                        (GCNConv(F, 4), (x, ei))):
        model = _quiet_convert(model)
        with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile .*blockquant.to_original\(model\)"):
            torch.jit.script(model)
        assert any(isinstance(m, CompressedModule) for m in model.modules())  # untouched
        model.eval()
        expected = model(*args)
        exact = blockquant.to_original(model)
        scripted = torch.jit.script(exact)
        assert torch.allclose(scripted(*args), expected)


# ------------------------------------------------------------------ children of a refused layer

def test_children_of_a_refused_conv_stay_exact_and_summary_says_so():
    model = nn.ModuleList([SAGEConv(F, 4, project=True), SAGEConv(F, 4)])
    with pytest.warns(ConversionWarning, match="project=True"):
        blockquant.convert(model)
    refused, converted = model
    assert type(refused) is SAGEConv
    assert not any(isinstance(m, CompressedModule) for m in refused.modules())
    assert isinstance(converted.lin_l, nn.Module) and isinstance(converted, CompressedModule)
    text = blockquant.summary(model, print_it=False)
    for child in ("0.lin_l", "0.lin_r", "0.lin"):
        assert f"{child} " in text
    assert "inside refused SAGEConv '0': left exact with it" in text


def test_a_wrapper_whose_option_changed_is_undone_with_its_children_by_convert():
    model = nn.ModuleList([GINConv(nn.Sequential(nn.Linear(F, 4), nn.ReLU()))])
    _quiet_convert(model)
    assert isinstance(model[0].nn[0], CompressedModule)
    model[0].flow = "target_to_source"
    with pytest.warns(ConversionWarning, match="flow"):
        blockquant.convert(model)
    assert not any(isinstance(m, CompressedModule) for m in model.modules())
