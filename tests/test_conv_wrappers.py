"""Compressed PyG conv wrappers (blockquant.nn.conv): exact forward, compressed saved tensors,
shared parameters, every adjacency form, clear refusals."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch_geometric import EdgeIndex
from torch_geometric.nn import GATConv, GATv2Conv, GCN2Conv, GCNConv, GINConv, GraphConv, SAGEConv
from torch_geometric.nn.aggr import MeanAggregation
from torch_geometric.testing import assert_module
from torch_geometric.typing import WITH_TORCH_SPARSE
from torch_geometric.utils import (coalesce, remove_self_loops, to_torch_coo_tensor, to_torch_csc_tensor,
                                   to_torch_csr_tensor)

import blockquant
from blockquant import QuantConfig
from blockquant import functional as BF
from blockquant.nn import WRAPPERS
from blockquant.nn.conv import QGCNConv, QSAGEConv
from blockquant.packed import packed_nbytes
from tolerances import rel_err

N, E, F_IN, F_OUT = 60, 320, 16, 12

INT8 = QuantConfig(bits=8, block_size=256)
INT2 = QuantConfig(bits=2, block_size=256)


pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")


def _graph(seed=0, n=N, e=E, f=F_IN):
    g = torch.Generator().manual_seed(seed)
    # coalesced (sorted, no duplicates): a sparse matrix merges duplicate edges, an edge list does not;
    # no self-loops: PyG's gcn_norm adds them differently to edge lists and sparse matrices
    edge_index = coalesce(torch.randint(0, n, (2, e), generator=g), num_nodes=n)
    edge_index = remove_self_loops(edge_index)[0]
    x = torch.randn(n, f, generator=g)
    return x, edge_index


# name -> (factory, call(module, x, adj, **kw), sparse layouts the *original* accepts)
CONVS = {
    "gcn": (lambda: GCNConv(F_IN, F_OUT), lambda m, x, a: m(x, a), ("csr", "coo")),
    "gcn_raw": (lambda: GCNConv(F_IN, F_OUT, normalize=False, bias=False),
                lambda m, x, a: m(x, a), ("csr", "coo", "csc")),
    "sage_mean": (lambda: SAGEConv(F_IN, F_OUT), lambda m, x, a: m(x, a), ("csr", "coo", "csc")),
    "sage_sum_norm": (lambda: SAGEConv(F_IN, F_OUT, aggr="sum", normalize=True),
                      lambda m, x, a: m(x, a), ("csr", "coo", "csc")),
    "sage_max_noroot": (lambda: SAGEConv(F_IN, F_OUT, aggr="max", root_weight=False),
                        lambda m, x, a: m(x, a), ("csr", "coo", "csc")),
    "gat": (lambda: GATConv(F_IN, 6, heads=2), lambda m, x, a: m(x, a), ("csr", "coo")),
    "gat_mean_res": (lambda: GATConv(F_IN, 6, heads=3, concat=False, residual=True),
                     lambda m, x, a: m(x, a), ("csr", "coo")),
    "gatv2": (lambda: GATv2Conv(F_IN, 6, heads=2), lambda m, x, a: m(x, a), ("csr", "coo")),
    "gatv2_shared": (lambda: GATv2Conv(F_IN, 6, heads=2, share_weights=True, concat=False),
                     lambda m, x, a: m(x, a), ("csr", "coo")),
    "gin": (lambda: GINConv(torch.nn.Sequential(torch.nn.Linear(F_IN, F_OUT), torch.nn.ReLU())),
            lambda m, x, a: m(x, a), ("csr", "coo", "csc")),
    "gin_train_eps": (lambda: GINConv(torch.nn.Linear(F_IN, F_OUT), eps=0.3, train_eps=True),
                      lambda m, x, a: m(x, a), ("csr", "coo", "csc")),
    "graph_add": (lambda: GraphConv(F_IN, F_OUT), lambda m, x, a: m(x, a), ("csr", "coo", "csc")),
    "graph_mean": (lambda: GraphConv(F_IN, F_OUT, aggr="mean"), lambda m, x, a: m(x, a), ("csr", "coo", "csc")),
    "gcn2": (lambda: GCN2Conv(F_IN, alpha=0.2), lambda m, x, a: m(x, x * 0.5, a), ("csr", "coo")),
    "gcn2_sep": (lambda: GCN2Conv(F_IN, alpha=0.1, theta=0.5, layer=2, shared_weights=False),
                 lambda m, x, a: m(x, x * 0.5, a), ("csr", "coo")),
}
ATTENTION = {"gat", "gat_mean_res", "gatv2", "gatv2_shared"}


def _build(name, config=INT8, seed=0):
    torch.manual_seed(seed)
    orig = CONVS[name][0]()
    wrapped = WRAPPERS[type(orig)].from_module(orig, config)
    return orig, wrapped


def _sparse(edge_index, layout, n=N):
    # adj_t layout (rows are targets), built as PyG's assert_module does
    if layout == "csr":
        return to_torch_csc_tensor(edge_index, size=(n, n)).t()
    if layout == "coo":
        return to_torch_coo_tensor(edge_index, size=(n, n)).t().coalesce()
    if layout == "csc":
        return to_torch_csr_tensor(edge_index, size=(n, n)).t()
    if layout == "EdgeIndex":
        return EdgeIndex(edge_index, sparse_size=(n, n))
    raise AssertionError(layout)


def _same(a, b):
    """The compressed training forward equals the original's up to summation order: aggregation
    is a sparse-dense product where PyG scatters messages (float32 rounding, rtol 1e-5)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def _grads(module, call, x_leaf, adj, grad_out_seed=1):
    """Gradients of a fixed random projection of the output w.r.t. the parameters and the input.

    The input enters through ``x_leaf * 1.0`` so it is not a leaf: the wrappers must compress it."""
    x = x_leaf * 1.0
    out = call(module, x, adj)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed))
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, params + [x_leaf], g)
    return out, grads


# ------------------------------------------------------------------ forward equality
@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("config", [INT2, QuantConfig(bits=4, block_size=64, rp_ratio=4, rounding="nearest")],
                         ids=["int2", "int4_rp4_nearest"])
def test_training_forward_is_bit_identical(name, config):
    orig, wrapped = _build(name, config)
    call = CONVS[name][1]
    x, ei = _graph()
    x = x.requires_grad_()
    assert wrapped.training
    for adj in (ei, _sparse(ei, "EdgeIndex")):
        ref = call(orig, x, adj)
        out = call(wrapped, x, adj)
        assert _same(out, ref), f"{name}: training forward differs from {type(orig).__name__}"


@pytest.mark.parametrize("name", ["gat", "gatv2"])
def test_attention_weights_returned_like_the_original(name):
    orig, wrapped = _build(name, INT2)
    x, ei = _graph()
    ref, (ref_ei, ref_alpha) = orig(x, ei, return_attention_weights=True)
    out, (out_ei, out_alpha) = wrapped(x, ei, return_attention_weights=True)
    assert torch.equal(out_ei, ref_ei)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_alpha, ref_alpha, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ eval / no_grad path
ATTENTION = {"gat", "gat_mean_res", "gatv2", "gatv2_shared"}


@pytest.mark.parametrize("name", list(CONVS))
def test_eval_runs_the_original_and_no_grad_the_sparse_path(name, monkeypatch):
    orig, wrapped = _build(name)
    call = CONVS[name][1]
    x, ei = _graph()
    with torch.no_grad():  # no graph is recorded: the sparse path keeps nothing and equals PyG
        out = call(wrapped, x, ei)
        assert out.grad_fn is None
        torch.testing.assert_close(out, call(orig, x, ei), rtol=1e-5, atol=1e-6)

    def boom(*a, **k):
        raise AssertionError("a blockquant op ran")

    monkeypatch.setattr(BF, "linear", boom)
    monkeypatch.setattr(BF, "aggregate", boom)
    with torch.no_grad():
        if name in ATTENTION:  # attention runs the original without gradients
            assert torch.equal(call(wrapped, x, ei), call(orig, x, ei))
        else:
            with pytest.raises(AssertionError, match="a blockquant op ran"):
                call(wrapped, x, ei)
    wrapped.eval()  # eval with gradients on: the original forward, bit for bit
    orig.eval()
    xg = x.clone().requires_grad_()
    assert torch.equal(call(wrapped, xg, ei), call(orig, xg, ei))


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("name", list(CONVS))
def test_int8_gradients_close_to_full_precision(name):
    orig, wrapped = _build(name, INT8)
    call = CONVS[name][1]
    x, ei = _graph()
    x.requires_grad_()
    torch.manual_seed(3)
    _, ref = _grads(orig, call, x, ei)
    torch.manual_seed(3)
    _, got = _grads(wrapped, call, x, ei)
    bound = 0.03
    for r, g in zip(ref, got):
        assert rel_err(g, r) < bound, f"{name}: int8 gradient relative error {rel_err(g, r):.4f} >= {bound}"


@pytest.mark.parametrize("name, config", [
    ("gcn", INT2),
    ("sage_mean", INT2),
    ("sage_mean", INT2.replace(rp_ratio=4)),
    ("gcn", INT2.replace(levels="optimal", block_size=64)),
], ids=["gcn", "sage", "sage_rp4", "gcn_optimal"])
def test_int2_gradients_unbiased_over_seeds(name, config):
    orig, wrapped = _build(name, config)
    call = CONVS[name][1]
    x, ei = _graph()
    x.requires_grad_()
    _, ref = _grads(orig, call, x, ei)
    runs = 64
    total = [torch.zeros_like(r) for r in ref]
    single_err = []
    for seed in range(runs):
        torch.manual_seed(1000 + seed)  # quantization seeds come from the default generator
        _, got = _grads(wrapped, call, x, ei)
        for t, g in zip(total, got):
            t += g
        single_err.append(max(rel_err(g, r) for g, r in zip(got, ref) if r.norm() > 0))
    typical = sorted(single_err)[runs // 2]
    assert typical > 1e-3, "int2 gradients should be noisy; is compression running at all?"
    for t, r in zip(total, ref):
        if r.norm() == 0:
            continue
        mean_err = rel_err(t / runs, r)
        # an unbiased estimator's error shrinks like 1/sqrt(runs) = 1/8; a bias would not shrink
        assert mean_err < 0.3 * typical, f"{name}: mean of {runs} int2 gradients is off by {mean_err:.4f} " \
                                         f"(single run {typical:.4f})"


# ------------------------------------------------------------------ parameters shared
@pytest.mark.parametrize("name", list(CONVS))
def test_parameters_are_the_original_objects(name):
    orig, wrapped = _build(name)
    assert isinstance(wrapped, type(orig))
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in orig.parameters()]
    assert list(wrapped.state_dict()) == list(orig.state_dict())
    for (k, a), (_, b) in zip(wrapped.state_dict().items(), orig.state_dict().items()):
        assert a.data_ptr() == b.data_ptr(), k
    back = wrapped.to_original()
    assert type(back) is type(orig)
    assert [id(p) for p in back.parameters()] == [id(p) for p in orig.parameters()]
    # an optimizer built on the original updates what the wrapper uses
    opt = torch.optim.SGD(orig.parameters(), lr=0.1)
    x, ei = _graph()
    before = [p.detach().clone() for p in wrapped.parameters()]
    CONVS[name][1](wrapped, x.requires_grad_(), ei).square().sum().backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, wrapped.parameters()))


# ------------------------------------------------------------------ adjacency forms
@pytest.mark.parametrize("name", list(CONVS))
def test_every_adjacency_form_gives_the_same_output_and_gradients(name):
    orig, wrapped = _build(name, INT8.replace(rounding="nearest"))
    call = CONVS[name][1]
    x, ei = _graph()
    x.requires_grad_()
    out_ei, g_ei = _grads(wrapped, call, x, ei)
    forms = ["EdgeIndex"] + list(CONVS[name][2])
    for form in forms:
        adj = _sparse(ei, form)
        ref = call(orig, x, adj)
        out, g = _grads(wrapped, call, x, adj)
        # sparse matrices sum duplicate edges and in another order: equal up to rounding
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, out_ei, rtol=1e-5, atol=1e-5)
        bound = 1e-4
        for a, b in zip(g, g_ei):
            assert rel_err(a, b) < bound, f"{name}/{form}: gradient differs from edge_index's by {rel_err(a, b):.2e}"


def test_edge_weights_and_bipartite_inputs():
    torch.manual_seed(0)
    x, ei = _graph()
    w = torch.rand(ei.size(1))
    for conv, call in [(GCNConv(F_IN, F_OUT), lambda m: m(x, ei, w)),
                       (GraphConv(F_IN, F_OUT), lambda m: m(x, ei, w)),
                       (GCN2Conv(F_IN, 0.3), lambda m: m(x, x, ei, w))]:
        wrapped = WRAPPERS[type(conv)].from_module(conv, INT2)
        assert _same(call(wrapped), call(conv))
    # learnable edge weights get a gradient through the compressed path
    wl = torch.rand(ei.size(1), requires_grad=True)
    conv = GraphConv(F_IN, F_OUT)
    wrapped = WRAPPERS[GraphConv].from_module(conv, INT8)
    ref = torch.autograd.grad(conv(x * 1.0, ei, wl).sum(), wl)[0]
    got = torch.autograd.grad(wrapped(x * 1.0, ei, wl).sum(), wl)[0]
    assert rel_err(got, ref) < 0.01
    # bipartite: 60 sources -> 25 targets
    x_dst = torch.randn(25, F_IN)
    bi = ei[:, ei[1] < 25]
    for conv in [SAGEConv(F_IN, F_OUT), GraphConv(F_IN, F_OUT), GATConv((F_IN, F_IN), 6, heads=2,
                                                                         add_self_loops=False),
                 GATv2Conv(F_IN, 6, heads=2, add_self_loops=False)]:
        wrapped = WRAPPERS[type(conv)].from_module(conv, INT2)
        assert _same(wrapped((x, x_dst), bi), conv((x, x_dst), bi)), type(conv).__name__


@pytest.mark.skipif(not WITH_TORCH_SPARSE, reason="torch_sparse is not installed, so SparseTensor does not exist")
@pytest.mark.parametrize("name", ["gcn", "sage_mean", "gin", "graph_add", "gat"])
def test_sparse_tensor_adjacency(name):
    from torch_sparse import SparseTensor

    orig, wrapped = _build(name, INT8.replace(rounding="nearest"))
    call = CONVS[name][1]
    x, ei = _graph()
    adj_t = SparseTensor.from_edge_index(ei, sparse_sizes=(N, N)).t()
    torch.testing.assert_close(call(wrapped, x, adj_t), call(orig, x, adj_t))


@pytest.mark.parametrize("name", ["gcn", "sage_mean", "sage_max_noroot", "gat", "gatv2", "gin", "graph_add"])
def test_pyg_assert_module_in_training_mode(name):
    # shapes, edge-permutation invariance and sparse layouts, checked by PyG's own helper
    _, wrapped = _build(name, INT2)
    x, ei = _graph()
    out_dim = {"gat": 12, "gatv2": 12}.get(name, F_OUT)
    assert wrapped.training
    assert_module(wrapped, x, ei, expected_size=(N, out_dim), test_sparse_layouts=[torch.sparse_csc,
                                                                                 torch.sparse_coo], atol=1e-5)


# ------------------------------------------------------------------ repr
def test_repr_keeps_the_original_and_adds_the_setting():
    cfg = QuantConfig(bits=2, block_size=1024, rp_ratio=8, levels="optimal")
    assert repr(QGCNConv.from_module(GCNConv(16, 32), cfg)) == f"GCNConv(16, 32, bq={cfg.short()})"
    assert cfg.short() in repr(QGCNConv.from_module(GCNConv(16, 32), cfg))
    assert repr(QSAGEConv.from_module(SAGEConv(16, 32), cfg)) == f"SAGEConv(16, 32, aggr=mean, bq={cfg.short()})"
    for name in CONVS:
        orig, wrapped = _build(name, cfg)
        text = repr(wrapped)
        assert text == repr(orig)[:-1] + f", bq={cfg.short()})", text


# ------------------------------------------------------------------ refusals and bad input
@pytest.mark.parametrize("make, option", [
    (lambda: SAGEConv(F_IN, F_OUT, project=True), "project"),
    (lambda: SAGEConv(F_IN, F_OUT, aggr="lstm"), "aggr"),
    (lambda: SAGEConv(F_IN, F_OUT, aggr=["mean", "max"]), "aggr"),
    (lambda: GraphConv(F_IN, F_OUT, aggr="min"), "aggr"),
    (lambda: GINConv(torch.nn.Linear(F_IN, F_OUT), aggr="std"), "aggr"),
    (lambda: GCNConv(F_IN, F_OUT, aggr="mean"), "aggr"),
    (lambda: GATConv(F_IN, F_OUT, aggr="max"), "aggr"),
    (lambda: GCNConv(F_IN, F_OUT, flow="target_to_source"), "flow"),
], ids=["sage_project", "sage_lstm", "sage_multi", "graph_min", "gin_std", "gcn_mean", "gat_max", "gcn_flow"])
def test_unsupported_options_are_refused_by_name(make, option):
    conv = make()
    wrapper = WRAPPERS[type(conv)]
    reason = wrapper.unsupported_reason(conv)
    assert reason is not None and option in reason
    with pytest.raises(ValueError, match=option):
        wrapper.from_module(conv, INT2)
    # convert() leaves it at full precision and says why
    model = torch.nn.ModuleList([conv])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blockquant.convert(model, INT2)
    assert type(model[0]) is type(conv)
    assert any(option in str(w.message) for w in caught)


def test_supported_options_report_no_reason():
    for name in CONVS:
        orig, _ = _build(name)
        assert WRAPPERS[type(orig)].unsupported_reason(CONVS[name][0]()) is None, name
    assert QSAGEConv.unsupported_reason(SAGEConv(F_IN, F_OUT, aggr=MeanAggregation())) is None
    assert "GCNConv" in QSAGEConv.unsupported_reason(GCNConv(F_IN, F_OUT))


def test_bad_inputs_raise_clear_errors():
    _, wrapped = _build("gcn")
    with pytest.raises(ValueError, match=r"static-graph input.*\(2, 60, 16\).*\[batch \* num_nodes, channels\]"):
        wrapped(torch.randn(2, N, F_IN), _graph()[1])
    with pytest.raises(TypeError, match="expects a GCNConv; got SAGEConv"):
        QGCNConv.from_module(SAGEConv(F_IN, F_OUT), INT2)
    with pytest.raises(TypeError, match="QuantConfig"):
        QGCNConv.from_module(GCNConv(F_IN, F_OUT), "int2")
    _, sage = _build("sage_mean")
    with pytest.raises(TypeError, match="adjacency"):
        sage(torch.randn(N, F_IN), torch.randn(N, N))  # dense matrices are not an adjacency form
    hooked = QGCNConv.from_module(GCNConv(F_IN, F_OUT), INT2)
    hooked.register_message_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="hooks"):
        hooked(torch.randn(N, F_IN), _graph()[1])


# ------------------------------------------------------------------ memory
def _saved_bytes(module, call, x, x_leaf, ei):
    with blockquant.track_saved(module, exclude=(x_leaf, ei)) as mem:
        out = call(module, x, ei)  # keep the graph alive until the block ends
    del out
    return mem


@pytest.mark.parametrize("name", ["gcn", "sage_mean", "gin", "gat"])
def test_saved_bytes_far_below_full_precision(name):
    f = 128
    torch.manual_seed(0)
    make = {
        "gcn": lambda: GCNConv(f, f),
        "sage_mean": lambda: SAGEConv(f, f),
        "gin": lambda: GINConv(torch.nn.Identity(), train_eps=True),
        "gat": lambda: GATConv(f, f // 4, heads=4),
    }[name]
    orig = make()
    wrapped = WRAPPERS[type(orig)].from_module(orig, QuantConfig(bits=2, block_size=1024))
    x_leaf, ei = _graph(n=400, e=1600, f=f)
    x_leaf.requires_grad_()
    x = torch.relu(x_leaf * 1.0)  # an activation, as inside a network: must be compressed
    call = CONVS["gcn"][1]
    full = _saved_bytes(orig, call, x, x_leaf, ei)
    comp = _saved_bytes(wrapped, call, x, x_leaf, ei)
    node_feat_fp32 = 400 * f * 4
    assert full.total_bytes >= node_feat_fp32  # the original keeps at least one fp32 copy of x
    # int2 codes are 1/16 of fp32; what stays plain is integer adjacency data, not features
    assert comp.per_kind["compressed"] > 0
    assert comp.total_bytes < 0.3 * full.total_bytes, (name, comp, full)
    assert comp.per_kind["plain"] < node_feat_fp32 / 2, (name, comp)


@pytest.mark.parametrize("name, copies", [("sage_mean", 1), ("sage_sum", 1), ("graph_add", 1), ("graph_mean", 1),
                                          ("sage_max", 2)])
def test_sum_mean_aggregation_keeps_x_once_and_never_the_aggregate(name, copies):
    """SAGE's lin_l / GraphConv's lin_rel read x through aggregate_linear: the layer keeps one compressed
    [N, F] tensor (x, shared with the root weight), not the aggregate beside it; a resident x makes it
    keep nothing compressed. Max aggregation still keeps the aggregate for lin_l (copies=2)."""
    f = 32
    make = {"sage_mean": lambda: SAGEConv(f, f), "sage_sum": lambda: SAGEConv(f, f, aggr="sum"),
            "graph_add": lambda: GraphConv(f, f), "graph_mean": lambda: GraphConv(f, f, aggr="mean"),
            "sage_max": lambda: SAGEConv(f, f, aggr="max")}[name]
    torch.manual_seed(0)
    cfg = QuantConfig(bits=2, block_size=1024, rp_ratio=4)
    wrapped = WRAPPERS[type(make())].from_module(make(), cfg)
    x_leaf, ei = _graph(n=400, e=1600, f=f)
    x_leaf.requires_grad_()
    call = CONVS["gcn"][1]
    one_copy = packed_nbytes((400, f), cfg)
    mem = _saved_bytes(wrapped, call, torch.relu(x_leaf * 1.0), x_leaf, ei)
    assert mem.per_kind["compressed"] == copies * one_copy, (name, mem.per_kind, one_copy)
    resident = _saved_bytes(wrapped, call, x_leaf, x_leaf, ei)
    assert resident.per_kind["compressed"] == (copies - 1) * one_copy, (name, resident.per_kind)
