"""Host syncs per training step, counted on the CPU with the codec a GPU runs (Triton, through the interpreter).

A steady-state training step of every converted conv and every bench model reads nothing back
from the device but the one deferred finiteness check per forward, copies no Python data to the
device and runs no op whose output shape depends on the data. What the first step on a graph
does once (building the graph's cached structure) is listed in bench/results/host_syncs_cpu.md.
"""
import pytest
import torch

import blockquant
from blockquant import QuantConfig, quantize
from blockquant.bench.models import MODEL_NAMES, ZOO_MODEL_NAMES, build_model, build_zoo_model
from blockquant.host_syncs import count_host_syncs
from blockquant.kernels import get_backend

NODES, FEATURES, CLASSES = 60, 12, 3


def _graph(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(NODES, FEATURES, generator=g)
    edge_index = torch.randint(0, NODES, (2, 300), generator=g)
    y = torch.randint(0, CLASSES, (NODES,), generator=g)
    return x, edge_index, y


def _model(name):
    if name in MODEL_NAMES:
        return build_model(name, FEATURES, 16, CLASSES, num_layers=2, dropout=0.5, heads=2)
    return build_zoo_model(name, FEATURES, 16, CLASSES, num_layers=2, heads=2)


def _step(model, opt, x, edge_index, y):
    opt.zero_grad(set_to_none=True)
    out = model(x, edge_index)
    torch.nn.functional.cross_entropy(out, y).backward()
    opt.step()


# ------------------------------------------------------------------ the counter itself
def test_the_counter_sees_reads_copies_and_data_dependent_shapes_at_their_sites():
    t = torch.arange(6)
    with count_host_syncs() as report:
        t[1].item()
        int(t[2])
        bool(t[3] > 0)
        t.tolist()
        host = t.cpu()
        int(host[0])  # a read of the host copy: the copy was the sync
        torch.tensor([1.0, 2.0], device=t.device)  # a host-to-device copy on a GPU
        torch.nonzero(t)
        torch.bincount(t)
        torch.repeat_interleave(t, t)
        t[t > 2]
        # not counted: the size is given, a host tensor, plain device arithmetic
        torch.repeat_interleave(t, t, output_size=15)
        torch.tensor([1.0, 2.0])
        t * 2
    assert report.by_kind() == {"syncs": 5, "copies": 1, "dynamic": 4, "host_reads": 1}, report.table()
    assert all("test_host_syncs.py:" in site for site in report.syncs), report.table()


def test_the_counter_sees_inside_library_ops_and_in_backward():
    x = torch.randn(200)
    x[7] = float("nan")
    with count_host_syncs() as report:
        with pytest.raises(ValueError, match="non-finite"):
            quantize(x, QuantConfig(bits=2, block_size=64), seed=3, backend="torch")  # checked at once
    # the check inside the custom op blockquant::quantize, invisible to a plain dispatch mode
    assert any("packed.py" in s and "_quantize_op" in s for s in report.syncs), report.table()
    # the seed is read on the host, by design: listed apart, never a device sync
    assert sum(report.host_reads.values()) >= 1 and not report.opaque_ops

    class Reads(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, g):
            int(g[0])
            return g * 2

    a = torch.randn(3, requires_grad=True)
    with count_host_syncs() as report:
        Reads.apply(a).sum().backward()
    assert list(report.syncs.values()) == [1] and "in backward" in next(iter(report.syncs)), report.table()


# ------------------------------------------------------------------ training steps
# What the first step on a graph does once (then cached with the graph), by function, and why.
FIRST_STEP_BUILDS = {
    "_check_range": "the user's node indices are bounds-checked before sparse products read them (one read)",
    "_csr_from_edges": "whether the edges are already sorted by target (then no permutation is kept)",
    "target_chunks": "attention's edge-chunk bounds come from one host copy of the row pointers",
    "check": "the forward's deferred finiteness check (every step)",
    "_weights_on": "the bit weights of 1-bit masks, copied to the device once",
}
PYG_DERIVATION = "PyG's self-loop and normalisation helpers: the derived graph's size depends on the data"
FIRST_STEP_BUILDS.update(_gcn_normalized=PYG_DERIVATION, _gat_self_loops=PYG_DERIVATION)  # they call PyG


def _first_step_reason(site):
    if "torch_geometric/" in site:
        return PYG_DERIVATION
    return FIRST_STEP_BUILDS.get(site.rsplit(" in ", 1)[-1])
STEP_MODELS = list(MODEL_NAMES) + list(ZOO_MODEL_NAMES)


@pytest.mark.parametrize("name", STEP_MODELS)
def test_steady_state_step_has_no_host_sync_but_the_finiteness_check(name, monkeypatch):
    """Converted with the default preset, Triton codec: after the first step on a graph, a step
    reads one value back (the deferred finiteness check of the forward), and nothing else."""
    x, edge_index, y = _graph()
    torch.manual_seed(0)
    model = blockquant.convert(_model(name))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with monkeypatch.context() as env, count_host_syncs() as first:
        env.setenv("BLOCKQUANT_BACKEND", "torch")  # quicker than the interpreter for the warm-up
        _step(model, opt, x, edge_index, y)  # builds the graph's cached structure
    unexplained = [site for kind in (first.syncs, first.copies, first.dynamic) for site in kind
                   if _first_step_reason(site) is None]
    assert not unexplained, first.table()
    assert get_backend(torch.device("cpu")).name == "triton"  # the codec a GPU runs
    with count_host_syncs() as report:
        _step(model, opt, x, edge_index, y)
    assert not report.opaque_ops, report.table()
    assert not report.copies and not report.dynamic, report.table()
    assert sum(report.syncs.values()) == 1, report.table()
    assert "packed.py" in next(iter(report.syncs)) and " in check" in next(iter(report.syncs)), report.table()


def test_a_new_graph_object_is_built_once_then_read_from_the_cache(torch_backend):
    """GCN with PyG's default cached=False: the normalised graph is cached on the user's graph
    object; a new object (the same values) builds it once, its next step reads nothing."""
    x, edge_index, y = _graph()
    torch.manual_seed(0)
    model = blockquant.convert(_model("pyg-gcn"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    other = edge_index.clone()
    with count_host_syncs() as first:
        _step(model, opt, x, other, y)
    with count_host_syncs() as second:
        _step(model, opt, x, other, y)
    assert first.total > second.total == 1, (first.table(), second.table())
    assert any("adjacency.py" in s for s in list(first.syncs) + list(first.dynamic)), first.table()
