"""Compressed graph attention (blockquant.attention, QGATConv, QGATv2Conv): unbiased gradients,
no [E, heads * channels] allocation, PyG's outputs, exact gradients under a lossless codec."""
from __future__ import annotations


import pytest
import torch
from torch_geometric import EdgeIndex
from torch_geometric.nn import GATConv, GATv2Conv
from torch_geometric.typing import WITH_TORCH_SPARSE
from torch_geometric.utils import coalesce, to_torch_coo_tensor, to_torch_csc_tensor, to_torch_csr_tensor

import blockquant
from blockquant.bench.runner import cpu_allocation_trace
from blockquant import QuantConfig
from blockquant import attention as BA
from blockquant import save_policy
from blockquant.nn import WRAPPERS
from codec_utils import ExactPacked
from tolerances import rel_err

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")

INT2 = QuantConfig(bits=2, block_size=256)
INT4 = QuantConfig(bits=4, block_size=256)
FORMS = ("edge_index", "EdgeIndex", "coo", "csr", "csc")


def _graph(n, e, f, seed=0, unique=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    ei = torch.randint(0, n, (2, e), generator=g)
    return x, (coalesce(ei, num_nodes=n) if unique else ei)


def _form(ei, form, n_src, n_dst):
    """The graph in one adjacency form (sparse matrices in adj_t layout: rows are targets)."""
    if form == "edge_index":
        return ei
    if form == "EdgeIndex":
        return EdgeIndex(ei, sparse_size=(n_src, n_dst))
    flipped = ei.flip(0)  # (target, source)
    if form == "coo":
        return to_torch_coo_tensor(flipped, size=(n_dst, n_src)).coalesce()
    if form == "csr":
        return to_torch_csr_tensor(flipped, size=(n_dst, n_src))
    if form == "csc":
        return to_torch_csc_tensor(flipped, size=(n_dst, n_src))
    raise AssertionError(form)


@pytest.fixture
def lossless(monkeypatch):
    monkeypatch.setattr(save_policy, "compress", lambda x, config: ExactPacked(x))


# ------------------------------------------------------------------ unbiasedness
CONVS = {"gat": lambda: GATConv(16, 8, heads=2), "gatv2": lambda: GATv2Conv(16, 8, heads=2)}


@pytest.mark.parametrize("config", [INT2, INT4], ids=["int2", "int4"])
@pytest.mark.parametrize("name", list(CONVS))
def test_mean_of_compressed_gradients_converges_to_the_exact_gradient(name, config):
    """Relative error of the mean of K compressed gradients falls like 1/sqrt(K) (8x from 1 to 64)
    for every parameter; a bias (a rounded tensor used non-linearly in backward) makes it level off.
    Before blockquant.attention the GAT wrappers failed this (ratio 1.0-3.0)."""
    x, ei = _graph(300, 2000, 16)
    torch.manual_seed(0)
    orig = CONVS[name]()
    wrapped = WRAPPERS[type(orig)].from_module(orig, config)
    params = list(orig.parameters())

    def grads(m):
        return torch.autograd.grad(m(x * 1.0, ei).square().sum(), params)

    ref = grads(orig)
    draws = 64
    total = [torch.zeros_like(r) for r in ref]
    single = [[] for _ in ref]
    for k in range(draws):
        torch.manual_seed(100 + k)
        for i, (t, g) in enumerate(zip(total, grads(wrapped))):
            t += g
            single[i].append(rel_err(g, ref[i]))
    assert max(sorted(s)[draws // 2] for s in single) > 1e-2, "compression should add noise; is it running?"
    for i, (t, r) in enumerate(zip(total, ref)):
        one = sorted(single[i])[draws // 2]  # median single-draw error
        mean = rel_err(t / draws, r)
        if one < 1e-5:  # a gradient no compressed tensor reaches (the bias)
            assert mean < 1e-5
            continue
        # unbiased: mean ~ one / 8; allow 2.8x for the spread of the estimate
        assert mean < 0.35 * one, f"{name} parameter {i}: mean of {draws} draws is off by {mean:.4f} " \
                                  f"(single draw {one:.4f}): biased"


# ------------------------------------------------------------------ no [E, F] allocation
def _largest_allocation(fn) -> int:
    return cpu_allocation_trace(fn)[1].largest


@pytest.mark.parametrize("name, form", [(n, f) for n in ("gat", "gatv2") for f in FORMS]
                         + [("gatv2_edge_attr", "edge_index")])  # PyG takes edge_attr with loops only so
def test_no_allocation_of_edges_times_features(name, form):
    n, e, heads, ch = 200, 20_000, 4, 16
    x, ei = _graph(n, e, 32, seed=1, unique=form != "edge_index")
    num_e = int((ei[0] != ei[1]).sum()) + n  # with self loops
    torch.manual_seed(0)
    if name == "gat":
        conv = GATConv(32, ch, heads=heads)
    else:
        conv = GATv2Conv(32, ch, heads=heads, edge_dim=3 if name.endswith("edge_attr") else None)
    wrapped = WRAPPERS[type(conv)].from_module(conv, INT2)
    adj = _form(ei, form, n, n)
    edge_attr = torch.randn(ei.size(1), 3) if name.endswith("edge_attr") else None
    xr = x.requires_grad_()

    def step():
        wrapped(xr * 1.0, adj, edge_attr).square().sum().backward()

    step()  # builds the cached graph
    largest = _largest_allocation(step)
    limit = num_e * heads * ch * 4
    assert largest < limit / 4, f"{name}/{form}: an allocation of {largest} B (E x F fp32 = {limit} B)"
    # and the same step in PyG does allocate [E, F] (the test can fail)
    if form == "edge_index":
        assert _largest_allocation(lambda: conv(xr * 1.0, adj, edge_attr).square().sum().backward()) >= limit


# ------------------------------------------------------------------ equal to PyG
CASES = {
    "gat": lambda: GATConv(16, 6, heads=3),
    "gat_mean_nobias": lambda: GATConv(16, 6, heads=2, concat=False, bias=False),
    "gat_no_loops": lambda: GATConv(16, 6, heads=2, add_self_loops=False),
    "gat_edge_mean": lambda: GATConv(16, 6, heads=2, edge_dim=3),
    "gat_edge_fill": lambda: GATConv(16, 6, heads=2, edge_dim=1, fill_value=0.5),
    "gat_residual": lambda: GATConv(16, 6, heads=2, residual=True),
    "gat_slope": lambda: GATConv(16, 5, heads=1, negative_slope=0.05),
    "gatv2": lambda: GATv2Conv(16, 6, heads=3),
    "gatv2_shared_mean": lambda: GATv2Conv(16, 6, heads=2, share_weights=True, concat=False),
    "gatv2_edge": lambda: GATv2Conv(16, 6, heads=2, edge_dim=3, residual=True),
    "gatv2_no_loops_nobias": lambda: GATv2Conv(16, 6, heads=2, add_self_loops=False, bias=False),
}


def _call_grads(module, x_leaf, adj, edge_attr, g_seed=3, **kw):
    out = module(x_leaf * 1.0, adj, edge_attr, **kw)
    out_t = out[0] if isinstance(out, tuple) else out
    g = torch.randn(out_t.shape, generator=torch.Generator().manual_seed(g_seed))
    inputs = list(module.parameters()) + [x_leaf] + ([edge_attr] if edge_attr is not None else [])
    return out, torch.autograd.grad(out_t, inputs, g)


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_equal_pyg_and_gradients_exact_under_lossless_codec(name, lossless):
    x, ei = _graph(50, 400, 16, seed=2)
    x.requires_grad_()
    torch.manual_seed(0)
    orig = CASES[name]()
    wrapped = WRAPPERS[type(orig)].from_module(orig, INT2)
    edge_attr = None
    if orig.edge_dim is not None:
        edge_attr = torch.randn(ei.size(1), orig.edge_dim, requires_grad=True)
        if orig.edge_dim == 1:
            edge_attr = edge_attr.detach().view(-1).requires_grad_()
    ref, g_ref = _call_grads(orig, x, ei, edge_attr)
    out, g_out = _call_grads(wrapped, x, ei, edge_attr)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # summation order differs
    for i, (a, b) in enumerate(zip(g_out, g_ref)):
        assert rel_err(a, b) < 1e-5, f"{name}: gradient {i} differs by {rel_err(a, b):.2e}"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ["gat", "gatv2", "gat_no_loops"])
def test_every_adjacency_form_matches_pyg(name, form, lossless):
    n = 50
    x, ei = _graph(n, 400, 16, seed=4, unique=True)  # a sparse matrix merges duplicate edges
    x.requires_grad_()
    torch.manual_seed(0)
    orig = CASES[name]()
    wrapped = WRAPPERS[type(orig)].from_module(orig, INT2)
    adj = _form(ei, form, n, n)
    ref, g_ref = _call_grads(orig, x, ei, None, return_attention_weights=True)  # PyG on the edge list
    out, g_out = _call_grads(wrapped, x, adj, None, return_attention_weights=True)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(g_out, g_ref):
        assert rel_err(a, b) < 1e-5
    # the weights come back in the form's own edge order, attached like PyG attaches them
    ret_adj, alpha = out[1]
    assert alpha.shape == (ret_adj.values().size(0) if ret_adj.layout != torch.strided else ret_adj.size(1),
                           orig.heads)
    if form in ("edge_index", "EdgeIndex"):
        assert torch.equal(ret_adj.as_tensor() if form == "EdgeIndex" else ret_adj, ref[1][0])
        torch.testing.assert_close(alpha, ref[1][1], rtol=1e-5, atol=1e-7)
    else:
        dense = ret_adj.to_dense() if ret_adj.layout != torch.sparse_coo else ret_adj.to_dense()
        want = torch.zeros(n, n, orig.heads)
        want[ref[1][0][1], ref[1][0][0]] = ref[1][1]
        torch.testing.assert_close(dense, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("conv_cls", [GATConv, GATv2Conv])
def test_bipartite_inputs_match_pyg(conv_cls, lossless):
    g = torch.Generator().manual_seed(5)
    x_src, x_dst = torch.randn(40, 16, generator=g), torch.randn(25, 12, generator=g)
    ei = torch.stack([torch.randint(0, 40, (300,), generator=g), torch.randint(0, 25, (300,), generator=g)])
    ei = coalesce(ei, num_nodes=40)  # a sparse matrix merges duplicate edges
    x_src.requires_grad_()
    torch.manual_seed(0)
    orig = conv_cls((16, 12), 6, heads=2, residual=True)
    wrapped = WRAPPERS[conv_cls].from_module(orig, INT2)
    params = list(orig.parameters())
    for adj in (ei, _form(ei, "csr", 40, 25), _form(ei, "EdgeIndex", 40, 25)):
        if conv_cls is GATConv:
            ref = orig((x_src, x_dst), adj, size=(40, 25)) if adj is ei else orig((x_src, x_dst), ei, size=(40, 25))
            out = wrapped((x_src, x_dst), adj, size=(40, 25) if adj is ei else None)
        else:
            ref = orig((x_src, x_dst), ei)
            out = wrapped((x_src, x_dst), adj)
        assert out.shape == (25, 12)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        gr = torch.autograd.grad(ref.square().sum(), params + [x_src])
        go = torch.autograd.grad(out.square().sum(), params + [x_src])
        for a, b in zip(go, gr):
            assert rel_err(a, b) < 1e-5
    if conv_cls is GATConv:  # x_dst None: scores from the sources only
        orig_1 = GATConv(16, 6, heads=2, add_self_loops=False)
        wrapped_1 = WRAPPERS[GATConv].from_module(orig_1, INT2)
        torch.testing.assert_close(wrapped_1((x_src, None), ei, size=(40, 25)),
                                   orig_1((x_src, None), ei, size=(40, 25)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv_cls", [GATConv, GATv2Conv])
def test_attention_dropout_regenerates_its_mask(conv_cls, lossless, monkeypatch):
    """Dropout on the coefficients draws its mask from a seed (nothing stored) and backward
    uses the same mask: gradients equal PyG's computed with that mask."""
    x, ei = _graph(60, 500, 16, seed=6)
    x.requires_grad_()
    torch.manual_seed(0)
    p = 0.4
    orig = conv_cls(16, 6, heads=2, dropout=p)
    wrapped = WRAPPERS[conv_cls].from_module(orig, INT2)
    (out, (_, alpha_d)), grads = _call_grads(wrapped, x, ei, None, return_attention_weights=True)
    kept = (alpha_d != 0).float()
    assert abs(1 - kept.mean().item() - p) < 0.05  # about p of the coefficients dropped
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda a, p=0.5, training=True, inplace=False:
                        a * kept / (1 - p))
    (ref, (_, alpha_ref)), ref_grads = _call_grads(orig, x, ei, None, return_attention_weights=True)
    torch.testing.assert_close(alpha_d, alpha_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-5
    torch.manual_seed(1)  # another draw, another mask
    assert not torch.equal(wrapped(x, ei, return_attention_weights=True)[1][1] != 0, kept.bool())


# ------------------------------------------------------------------ memory accounting
@pytest.mark.parametrize("name", ["gat", "gatv2"])
def test_saved_memory_is_exact_scalars_plus_compressed_features(name):
    n, e, heads, ch = 300, 3000, 4, 16
    x, ei = _graph(n, e, 64, seed=7)
    torch.manual_seed(0)
    conv = GATConv(64, ch, heads=heads) if name == "gat" else GATv2Conv(64, ch, heads=heads)
    wrapped = WRAPPERS[type(conv)].from_module(conv, INT2)
    xr = x.requires_grad_()
    h = torch.relu(xr * 1.0)
    with blockquant.track_saved(wrapped, exclude=(xr, ei)) as mem:
        out = wrapped(h, ei)
    del out
    num_e, width = int((ei[0] != ei[1]).sum()) + n, heads * ch  # self-loops replaced by one per node
    alpha_bytes = num_e * heads * 4
    assert mem.per_kind["plain"] >= alpha_bytes  # the exact coefficients are counted
    # nothing [E, F] in fp32: exact [E, heads] scalars, the graph's indices, compressed features
    # and (GATv2) one sign bit per edge and channel
    bound = alpha_bytes + num_e * 4 * 4 + n * 64 * 4 + (num_e * width / 8 if name == "gatv2" else 0)
    assert mem.total_bytes < bound, (mem.total_bytes, bound)
    assert mem.total_bytes < num_e * width * 4 / 4


# ------------------------------------------------------------------ graph cache
def test_graph_is_cached_per_adjacency_and_rebuilt_after_in_place_change():
    x, ei = _graph(40, 200, 16, seed=8)
    torch.manual_seed(0)
    conv = GATConv(16, 6, heads=2)
    wrapped = WRAPPERS[GATConv].from_module(conv, QuantConfig(bits=8, rounding="nearest"))
    xr = x.requires_grad_()
    wrapped(xr, ei)
    g1 = BA.attention_graph(lambda: None, 40, 40, key=ei, variant=("self_loops", 40))
    wrapped(xr, ei)
    assert BA.attention_graph(lambda: None, 40, 40, key=ei, variant=("self_loops", 40)) is g1
    ei[1, :50] = (ei[1, :50] + 1) % 40  # in place: the cached graph must not be reused
    torch.testing.assert_close(wrapped(xr, ei), conv(xr, ei), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ refusals and bad input
def test_second_order_gradients_are_refused():
    x, ei = _graph(30, 100, 16)
    torch.manual_seed(0)
    wrapped = WRAPPERS[GATConv].from_module(GATConv(16, 4, heads=2), INT4)
    params = list(wrapped.parameters())
    grads = torch.autograd.grad(wrapped(x * 1.0, ei).square().sum(), params, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order gradients are not supported"):
        sum(g.square().sum() for g in grads).backward()


def test_bad_inputs_raise_one_line_errors():
    x, ei = _graph(30, 100, 16)
    torch.manual_seed(0)
    gat = WRAPPERS[GATConv].from_module(GATConv(16, 4, heads=2, edge_dim=2), INT2)
    with pytest.raises(ValueError, match=r"edge_attr has 7 rows for 100 edges"):
        gat(x, ei, torch.randn(7, 2))
    with pytest.raises(ValueError, match=r"30 sources"):
        gat(x, torch.sparse_coo_tensor(ei.flip(0), torch.ones(100), (30, 31)).coalesce())
    v2 = WRAPPERS[GATv2Conv].from_module(GATv2Conv(16, 4, heads=2), INT2)
    with pytest.raises(ValueError, match="edge_dim"):
        v2(x, ei, torch.randn(100, 2))
    with pytest.raises(ValueError, match="outside"):
        v2(x, ei + 5)
    with pytest.raises(TypeError, match="edge_index"):
        v2(x, [[0, 1], [1, 0]])
    graph = BA.attention_graph(ei, 30, 30)
    with pytest.raises(ValueError, match=r"x_src of shape \[N_src, heads, channels\]; got \(30, 8\)"):
        BA.gat_attention(torch.randn(30, 8), torch.randn(30, 2), None, graph)
    with pytest.raises(ValueError, match=r"score_src must have shape \[30, 2\]; got \[30, 3\]"):
        BA.gat_attention(torch.randn(30, 2, 4), torch.randn(30, 3), None, graph)
    with pytest.raises(ValueError, match="31 sources"):
        BA.gatv2_attention(torch.randn(31, 2, 4), torch.randn(30, 2, 4), torch.randn(2, 4), graph)
    with pytest.raises(ValueError) as info:
        BA.gat_attention(torch.randn(30, 2, 4), torch.randn(30, 2), torch.randn(29, 2), graph)
    assert "\n" not in str(info.value) and "score_dst must have shape [30, 2]; got [29, 2]" in str(info.value)


@pytest.mark.skipif(not WITH_TORCH_SPARSE, reason="torch_sparse is not installed, so SparseTensor does not exist")
@pytest.mark.parametrize("conv_cls", [GATConv, GATv2Conv])
def test_sparse_tensor_adjacency(conv_cls, lossless):
    from torch_sparse import SparseTensor

    x, ei = _graph(40, 200, 16, unique=True)
    torch.manual_seed(0)
    orig = conv_cls(16, 4, heads=2)
    wrapped = WRAPPERS[conv_cls].from_module(orig, INT2)
    adj_t = SparseTensor.from_edge_index(ei, sparse_sizes=(40, 40)).t()
    torch.testing.assert_close(wrapped(x, adj_t), orig(x, adj_t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv_cls", [GATConv, GATv2Conv])
def test_empty_graph_isolated_targets_and_float64(conv_cls, lossless):
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    for ei, loops in [(torch.empty(2, 0, dtype=torch.long), False), (torch.empty(2, 0, dtype=torch.long), True),
                      (torch.tensor([[0, 1, 4], [1, 1, 3]]), False)]:
        torch.manual_seed(0)
        orig = conv_cls(8, 4, heads=2, add_self_loops=loops).double()
        wrapped = WRAPPERS[conv_cls].from_module(orig, INT4)
        out, ref = wrapped(x * 1.0, ei), orig(x * 1.0, ei)
        torch.testing.assert_close(out, ref)
        go = torch.autograd.grad(out.square().sum(), [x] + list(orig.parameters()))
        gr = torch.autograd.grad(ref.square().sum(), [x] + list(orig.parameters()))
        for a, b in zip(go, gr):
            torch.testing.assert_close(a, b)
