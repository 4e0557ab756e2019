"""`blockquant.convert` fuzzed: random models from PyG's model zoo and torch.nn pieces, converted with
random configs, checked against the unconverted model by the documented contract only:

* ``convert`` either succeeds (modules it cannot handle are left exact and named in a
  ``ConversionWarning``) or raises for a bad argument; it never changes the ``state_dict``;
* in ``eval()`` with gradients on the converted model runs the original computation: the same output,
  bit for bit; under ``no_grad`` the same up to floating-point summation order;
* in training the forward is exact (up to summation order), and under a lossless stand-in codec
  (``save_policy.compress`` keeping a copy, rounding "nearest": nothing random) every first-order
  gradient (parameters, inputs, learnable edge weights) equals the unconverted model's; with the
  drawn codec the gradients are finite;
* what ``track_saved`` reports is what the allocator holds after the forward (minus the output);
* where the unconverted model raises, the converted one raises the same exception type, and never
  where it does not.

Models: PyG's GCN, GraphSAGE, GIN, GAT, GATv2 and EdgeCNN (no wrapper: left exact) with random depth,
width, activation, normalisation, jumping knowledge and conv options; and models assembled from PyG
convolutions (GCN, SAGE, GraphConv, GAT, GATv2, GIN, TAG, unsupported options included) and torch.nn
pieces (norms, activations as modules or functions, dropout, residuals, heads), bipartite first
layers, fixed or learnable edge weights. Graphs: 0-9 nodes, self-loops, duplicate edges, isolated
nodes, no edges at all. Configs: presets, random ``QuantConfig`` fields, per-module mappings with
``None``, ``filter_fn``.

CI runs ``FUZZ_EXAMPLES`` examples, derandomized (the same ones every run); a longer run:
``BLOCKQUANT_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_convert.py -k property`` (random examples).
The examples that found defects are pinned below as plain tests.
"""
import copy
import gc
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis.errors import InvalidArgument
from hypothesis import strategies as st
from torch import nn
from torch_geometric import nn as gnn
from torch_geometric.nn.models import GAT, GCN, GIN, EdgeCNN, GraphSAGE

import blockquant
from blockquant import QuantConfig, save_policy
from blockquant.bench.runner import _fd2_silenced, profiler_net_bytes
from blockquant.memory import storage_bytes
from blockquant.nn import CompressedModule
from codec_utils import ExactPacked

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")

FUZZ_EXAMPLES = int(os.environ.get("BLOCKQUANT_FUZZ_EXAMPLES", "150"))


def _quiet_convert(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blockquant.ConversionWarning)
        return blockquant.convert(model, config)


def _wrappers(model):
    return {n: m.bq_config.short() for n, m in model.named_modules() if isinstance(m, CompressedModule)}


def test_converting_again_leaves_no_wrapper_of_the_previous_config_below_a_rebuilt_or_excluded_one():
    """Found retrying a step with a smaller config (the fuzz test converts twice as well): a wrapper
    that runs its own children (PyG's BatchNorm wraps a BatchNorm1d; GIN its MLP) was unwrapped or rebuilt
    without them, so they kept the previous config: converting to int8 left PyG BatchNorm's inner
    module at int2, and ``{"convs.0": None}`` left GIN's MLP compressed."""
    sage = GraphSAGE(8, 8, num_layers=2, out_channels=3, norm="batch_norm")
    _quiet_convert(sage, "int2")
    _quiet_convert(sage, "int8")
    assert set(_wrappers(sage).values()) == {"int8/G1024"}, _wrappers(sage)
    _quiet_convert(sage, {"norms.0": None})  # a name applies to the subtree: exact, inner module included
    assert not any(n.startswith("norms.0") for n in _wrappers(sage)), _wrappers(sage)
    assert type(sage.norms[0].module) is torch.nn.BatchNorm1d

    gin = GIN(8, 8, num_layers=2, out_channels=3)
    _quiet_convert(gin, "int2")
    assert any(n.startswith("convs.0.nn.") for n in _wrappers(gin))
    _quiet_convert(gin, {"convs.0": None})
    assert not any(n.startswith("convs.0") for n in _wrappers(gin)), _wrappers(gin)
    _quiet_convert(gin, "int4")
    assert set(_wrappers(gin).values()) == {"int4/G1024"}, _wrappers(gin)


@pytest.mark.parametrize("cls", [gnn.GATConv, gnn.GATv2Conv])
def test_track_saved_does_not_count_the_attention_graph_cached_for_a_live_graph(cls):
    """Found by the fuzz test (held bytes against the allocator): track_saved counted the attention
    graph cached on the caller's edge_index (int32 CSR, permutations: 24 B per edge) in every step,
    as if the step allocated it; the adjacency's CSR, cached the same way, was not counted."""
    torch.manual_seed(0)
    x, ei = torch.randn(300, 8), torch.randint(0, 300, (2, 3000))
    model = _quiet_convert(cls(8, 4, heads=2), "int2")
    model.train()
    model(x, ei)  # builds the cache
    with blockquant.track_saved(model, exclude=(x, ei)) as mem:
        out = model(x, ei)
    del out
    with _fd2_silenced():
        out, net = profiler_net_bytes(lambda: model(x, ei))
    held = net - storage_bytes(out)
    assert abs(mem.total_bytes - held) <= 64, (mem.total_bytes, held)  # 0-d seeds (8 B each) are not counted


@pytest.mark.parametrize("norm", [lambda: nn.BatchNorm1d(3), lambda: gnn.BatchNorm(3)], ids=["torch", "pyg"])
def test_batch_norm_of_no_nodes_trains_as_the_original(norm):
    """Found by the fuzz test (a bipartite layer with no target nodes): the converted BatchNorm raised
    ``input tensor must have at least one element`` where torch's returns the empty output."""
    torch.manual_seed(0)
    ref = norm()
    conv = _quiet_convert(copy.deepcopy(ref), "int4")
    for model in (ref, conv):
        model.train()
        x = torch.randn(0, 3, requires_grad=True)
        out = model(x)
        out.sum().backward()
        assert out.shape == (0, 3) and x.grad.shape == (0, 3)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), conv.state_dict().values()))


# --------------------------------------------------------------------------------------- generators

ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "elu": nn.ELU, "gelu": nn.GELU, "tanh": nn.Tanh}
FUNCTIONAL = {"F.relu": torch.nn.functional.relu, "F.elu": torch.nn.functional.elu,
              "F.gelu": torch.nn.functional.gelu}


@dataclass
class Graph:
    """A small graph; :meth:`inputs` gives fresh leaf copies of its tensors for each model run."""

    x: torch.Tensor
    edge_index: torch.Tensor
    x_dst: Optional[torch.Tensor] = None
    edge_weight: Optional[torch.Tensor] = None
    grad_inputs: bool = False  #: x (and x_dst) require grad
    learnable_weight: bool = False  #: the edge weights require grad

    def inputs(self):
        def leaf(t, grad):
            return None if t is None else t.detach().clone().requires_grad_(grad)

        return {"x": leaf(self.x, self.grad_inputs), "x_dst": leaf(self.x_dst, self.grad_inputs),
                "edge_index": self.edge_index.clone(), "edge_weight": leaf(self.edge_weight, self.learnable_weight)}


class Assembled(nn.Module):
    """Convolutions, each followed by an optional norm, activation (module or function), dropout and
    residual connection, then an optional head; a bipartite model has one convolution, source ->
    target nodes."""

    def __init__(self, layers, head, functional_dropout):
        super().__init__()
        self.convs = nn.ModuleList([lay["conv"] for lay in layers])
        self.norms = nn.ModuleList([lay["norm"] or nn.Identity() for lay in layers])
        self.acts = nn.ModuleList([lay["act"] if isinstance(lay["act"], nn.Module) else nn.Identity()
                                   for lay in layers])
        self.functional_acts = [lay["act"] if isinstance(lay["act"], str) else None for lay in layers]
        self.drops = nn.ModuleList([nn.Dropout(lay["dropout"]) for lay in layers])
        self.skips = nn.ModuleList([lay["skip"] or nn.Identity() for lay in layers])
        self.residual = [lay["skip"] is not None for lay in layers]
        self.takes_weight = [lay["takes_weight"] for lay in layers]
        self.head = head or nn.Identity()
        self.functional_dropout = functional_dropout

    def forward(self, x, edge_index, edge_weight=None, x_dst=None):
        h = x
        for i, conv in enumerate(self.convs):
            inp = (h, x_dst) if x_dst is not None else h
            out = (conv(inp, edge_index, edge_weight) if self.takes_weight[i] and edge_weight is not None
                   else conv(inp, edge_index))
            out = self.acts[i](self.norms[i](out))
            if self.functional_acts[i] is not None:
                out = FUNCTIONAL[self.functional_acts[i]](out)
            out = self.drops[i](out)
            if self.functional_dropout:
                out = torch.nn.functional.dropout(out, self.functional_dropout, self.training)
            if self.residual[i]:
                out = out + self.skips[i](x_dst if x_dst is not None else h)
            h = out
        return self.head(h)


def _conv(draw, kind, f_in, f_dst, width):
    """A PyG convolution ``kind`` from ``f_in`` (``(f_in, f_dst)`` when bipartite) features; returns
    (module, output width, whether it takes edge weights)."""
    bip = f_dst is not None
    ins = (f_in, f_dst) if bip else f_in
    if kind == "gcn":
        normalize = draw(st.booleans())  # PyG adds self-loops only with the normalisation
        return (gnn.GCNConv(f_in, width, improved=draw(st.booleans()), cached=draw(st.booleans()),
                            add_self_loops=normalize and draw(st.booleans()), normalize=normalize), width, True)
    if kind == "sage":
        return (gnn.SAGEConv(ins, width, aggr=draw(st.sampled_from(["mean", "sum", "max", "min"])),
                             root_weight=draw(st.booleans()), normalize=draw(st.booleans()),
                             project=(not bip) and draw(st.booleans())), width, False)
    if kind == "graph":
        return gnn.GraphConv(ins, width, aggr=draw(st.sampled_from(["add", "mean", "max"]))), width, True
    if kind in ("gat", "gatv2"):
        heads, concat = draw(st.integers(1, 3)), draw(st.booleans())
        cls = gnn.GATConv if kind == "gat" else gnn.GATv2Conv
        extra = {} if kind == "gat" else {"share_weights": (not bip) and draw(st.booleans())}
        conv = cls(ins, width, heads=heads, concat=concat, dropout=draw(st.sampled_from([0.0, 0.3])),
                   add_self_loops=(not bip) and draw(st.booleans()), **extra)
        return conv, width * heads if concat else width, False
    if kind == "gin":
        mlp = nn.Sequential(nn.Linear(f_in, width), ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))](),
                            nn.Linear(width, width))
        return gnn.GINConv(mlp, train_eps=draw(st.booleans())), width, False
    return gnn.TAGConv(f_in, width, K=2), width, True  # no blockquant wrapper: left exact


def _norm(draw, width):
    kind = draw(st.sampled_from([None, "batch_norm", "layer_norm", "pyg_batch_norm", "pyg_layer_norm"]))
    return {None: lambda: None, "batch_norm": lambda: nn.BatchNorm1d(width), "layer_norm": lambda: nn.LayerNorm(width),
            "pyg_batch_norm": lambda: gnn.BatchNorm(width), "pyg_layer_norm": lambda: gnn.LayerNorm(width)}[kind]()


@st.composite
def assembled_models(draw, f_in, f_dst):
    bip = f_dst is not None
    kinds = ["sage", "graph", "gat", "gatv2"] if bip else ["gcn", "sage", "graph", "gat", "gatv2", "gin", "tag"]
    layers, dim = [], f_in
    for i in range(1 if bip else draw(st.integers(1, 3))):
        width = draw(st.integers(1, 6))
        conv, out, takes_weight = _conv(draw, draw(st.sampled_from(kinds)), dim, f_dst if i == 0 else None, width)
        act = draw(st.sampled_from([None, *ACTIVATIONS, *FUNCTIONAL]))
        prev = f_dst if bip else dim
        skip = None
        if draw(st.booleans()):
            skip = nn.Identity() if prev == out else nn.Linear(prev, out, bias=draw(st.booleans()))
        layers.append({"conv": conv, "norm": _norm(draw, out), "act": ACTIVATIONS[act]() if act in ACTIVATIONS
                       else act, "dropout": draw(st.sampled_from([0.0, 0.5])), "skip": skip,
                       "takes_weight": takes_weight})
        dim = out
    head = draw(st.sampled_from([None, "linear", "mlp"]))
    classes = draw(st.integers(1, 4))
    head = {None: None, "linear": nn.Linear(dim, classes),
            "mlp": nn.Sequential(nn.Linear(dim, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, classes))}[head]
    return Assembled(layers, head, draw(st.sampled_from([0.0, 0.0, 0.5])))


@st.composite
def zoo_models(draw, f_in):
    cls = draw(st.sampled_from(["GCN", "GraphSAGE", "GIN", "GAT", "GATv2", "EdgeCNN"]))
    kw: Dict[str, Any] = {
        "hidden_channels": draw(st.integers(1, 8)), "num_layers": draw(st.integers(1, 3)),
        "out_channels": draw(st.one_of(st.none(), st.integers(1, 4))), "dropout": draw(st.sampled_from([0.0, 0.5])),
        "act": draw(st.sampled_from(sorted(ACTIVATIONS))), "act_first": draw(st.booleans()),
        "norm": draw(st.sampled_from([None, "batch_norm", "layer_norm", "graph_norm"])),
        "jk": draw(st.sampled_from([None, "last", "cat", "max", "lstm"]))}
    if cls == "GCN":
        kw.update(improved=draw(st.booleans()), add_self_loops=draw(st.booleans()), cached=draw(st.booleans()))
    elif cls == "GraphSAGE":
        kw.update(aggr=draw(st.sampled_from(["mean", "sum", "max"])), root_weight=draw(st.booleans()))
    elif cls == "GIN":
        kw.update(train_eps=draw(st.booleans()))
    elif cls in ("GAT", "GATv2"):
        kw.update(heads=draw(st.integers(1, 3)), concat=draw(st.booleans()), add_self_loops=draw(st.booleans()),
                  v2=cls == "GATv2")
        if kw["concat"]:  # PyG's GAT splits the hidden width between the heads
            kw["hidden_channels"] = kw["heads"] * draw(st.integers(1, 3))
    if kw["jk"] == "lstm" and kw["num_layers"] < 2:
        kw["jk"] = "cat"
    model = {"GCN": GCN, "GraphSAGE": GraphSAGE, "GIN": GIN, "GAT": GAT, "GATv2": GAT, "EdgeCNN": EdgeCNN}[cls]
    return model(f_in, **kw)


@st.composite
def graphs(draw, bipartite):
    n_src = draw(st.integers(0, 9))
    n_dst = draw(st.integers(0, 9)) if bipartite else n_src
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    e = draw(st.integers(0, 30)) if n_src and n_dst else 0
    src, dst = torch.randint(0, max(n_src, 1), (e,), generator=g), torch.randint(0, max(n_dst, 1), (e,), generator=g)
    if not bipartite and n_src and draw(st.booleans()):  # explicit self-loops on a drawn subset of nodes
        loops = torch.randperm(n_src, generator=g)[:draw(st.integers(1, n_src))]
        src, dst = torch.cat([src, loops]), torch.cat([dst, loops])
    edge_index = torch.stack([src, dst])
    f_in, f_dst = draw(st.integers(1, 6)), (draw(st.integers(1, 6)) if bipartite else None)
    weights = draw(st.sampled_from([None, "fixed", "learnable"]))
    return Graph(x=torch.randn(n_src, f_in, generator=g) * draw(st.sampled_from([1.0, 10.0])),
                 x_dst=torch.randn(n_dst, f_dst, generator=g) if bipartite else None, edge_index=edge_index,
                 edge_weight=None if weights is None else torch.rand(edge_index.shape[1], generator=g) + 0.1,
                 grad_inputs=draw(st.booleans()), learnable_weight=weights == "learnable")


@st.composite
def quant_configs(draw):
    return QuantConfig(bits=draw(st.sampled_from([1, 2, 4, 8])),
                       block_size=draw(st.sampled_from([4, 16, 64, 1024, "row"])),
                       rp_ratio=draw(st.sampled_from([1, 1, 2, 8])),
                       levels=draw(st.sampled_from(["uniform", "optimal"])),
                       rounding=draw(st.sampled_from(["stochastic", "nearest"])),
                       meta_dtype=draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32])))


@dataclass
class Case:
    model: nn.Module
    graph: Graph
    spec: Any  #: what convert gets: None, a preset name, a QuantConfig or a mapping
    filter_prefix: Optional[str] = None
    first_spec: Any = False  #: converted with this first, then with ``spec`` (False: converted once)


@st.composite
def cases(draw):
    bipartite = draw(st.booleans()) and draw(st.booleans())  # a quarter of the graphs
    graph = draw(graphs(bipartite))
    f_dst = graph.x_dst.shape[1] if bipartite else None
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))  # the models' initial weights
    if bipartite or draw(st.booleans()):
        model = draw(assembled_models(graph.x.shape[1], f_dst))
    else:
        model = draw(zoo_models(graph.x.shape[1]))
    spec = draw(specs(model))
    prefix = None
    if draw(st.booleans()) and draw(st.booleans()):
        prefix = draw(st.sampled_from([n for n, _ in model.named_modules()]))
    first = draw(specs(model)) if draw(st.booleans()) and draw(st.booleans()) else False
    return Case(model, graph, spec, prefix, first)


@st.composite
def specs(draw, model):
    """What ``convert`` gets: None, a preset name, a QuantConfig, or a mapping from names and types."""
    if draw(st.sampled_from(["single", "single", "mapping"])) == "single":
        return draw(st.one_of(st.none(), st.sampled_from(QuantConfig.preset_names()), quant_configs()))
    names = [n for n, _ in model.named_modules() if n]
    keys = draw(st.lists(st.sampled_from(names), max_size=3, unique=True)) if names else []
    types = draw(st.lists(st.sampled_from([nn.Linear, nn.ReLU, nn.BatchNorm1d, gnn.GCNConv, gnn.SAGEConv,
                                           gnn.GATConv]), max_size=2, unique=True))
    return {k: draw(st.one_of(st.none(), quant_configs())) for k in [*keys, *types]}


# ------------------------------------------------------------------------------------------- checks

def _nearest(spec):
    """``spec`` with every config rounding to nearest: with the lossless codec, nothing random is left."""
    def one(c):
        if c is None:
            return None
        c = QuantConfig.preset(c) if isinstance(c, str) else c
        return c.replace(rounding="nearest")

    if isinstance(spec, dict):
        return {k: one(v) for k, v in spec.items()}
    return one("default" if spec is None else spec)


def _no_dropout(model):
    """Every dropout probability 0 (before conversion): the converted model draws its masks from its own
    seeded stream, so training-mode outputs can only be compared without dropout."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):  # GAT's attention dropout
            m.dropout = 0.0
        if isinstance(m, Assembled):
            m.functional_dropout = 0.0
    return model


def _convert(model, spec, prefix, first=False):
    filter_fn = (lambda m, name: not name.startswith(prefix)) if prefix is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blockquant.ConversionWarning)  # the documented report of what stays exact
        if first is not False:  # converting again: what the last convert chose must hold
            model = blockquant.convert(model, first, filter_fn=filter_fn)
        return blockquant.convert(model, spec, filter_fn=filter_fn)


def _configs_chosen(model):
    return {n: m.bq_config for n, m in model.named_modules() if isinstance(m, CompressedModule)}


def _call(model, graph, inputs):
    if isinstance(model, Assembled):
        return model(inputs["x"], inputs["edge_index"], inputs["edge_weight"], inputs["x_dst"])
    return model(inputs["x"], inputs["edge_index"], edge_weight=inputs["edge_weight"])  # PyG's zoo


def _run(model, graph, *, train, grad=True, backward=False, dtype=None):
    """``("ok", output, gradients)`` or ``("error", exception type, message)``; ``dtype``: cast the model
    and the floating-point inputs (the float64 reference)."""
    model.train(train)
    inputs = graph.inputs()
    if dtype is not None:
        model.to(dtype)
        inputs = {k: t.detach().to(dtype).requires_grad_(t.requires_grad)
                  if isinstance(t, torch.Tensor) and t.is_floating_point() else t for k, t in inputs.items()}
    try:
        with torch.set_grad_enabled(grad):
            out = _call(model, graph, inputs)
            grads = {}
            if backward and out.requires_grad:
                (out * torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
                grads = {f"param {n}": p.grad for n, p in model.named_parameters()}
                grads.update({f"input {k}": t.grad for k, t in inputs.items()
                              if isinstance(t, torch.Tensor) and t.is_floating_point()})
        return "ok", out.detach(), grads
    except Exception as e:  # noqa: BLE001 - compared with the unconverted model's outcome
        return "error", type(e), str(e).splitlines()[0][:200] if str(e) else ""


def _close(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape)
    scale = 1.0 + float(b.abs().max()) if b.numel() else 1.0
    assert torch.allclose(a, b, rtol=1e-4, atol=2e-5 * scale), (what, float((a - b).abs().max()), scale)


def _close64(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float64, (what, a.shape, b.shape, a.dtype)
    scale = 1.0 + float(b.abs().max()) if b.numel() else 1.0
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-10 * scale), (what, float((a - b).abs().max()), scale)


def _as_accurate(got, ref32, ref64, what):
    """``got`` is about as close to the float64 truth as the unconverted float32 model is (another
    summation order; ill-conditioned steps such as a norm over 2 values amplify both): a float32-only
    defect (a lost precision, a wrong cast) is far larger. Exactness is checked in float64."""
    assert got.shape == ref32.shape and got.dtype == ref32.dtype, (what, got.shape, ref32.shape)
    if not got.numel():
        return
    truth = ref64.to(torch.float64)
    err, ref_err = float((got.double() - truth).abs().max()), float((ref32.double() - truth).abs().max())
    scale = 1.0 + float(truth.abs().max())
    assert err <= max(32 * ref_err, 1e-3 * scale), (what, err, ref_err, scale)


def _same_outcome(got, want, what):
    """The converted model raises exactly where the unconverted one does (same type), else succeeds."""
    if want[0] == "error":
        assert got[0] == "error" and issubclass(got[1], want[1]), (what, want, got[:3])
        return False
    assert got[0] == "ok", f"{what}: the converted model raised {got[1].__name__}: {got[2]} (the original did not)"
    return True


def _note(text):
    """hypothesis' note() inside a test; nothing when a case is replayed by hand."""
    try:
        note(text)
    except InvalidArgument:
        pass


class _max_ties_seen:
    """Records, for every SAGEConv / GraphConv with max aggregation run inside the block, whether some
    target's maximum (per channel) came from two different source nodes or was exactly 0. There the
    max is not differentiable and the gradient not unique: blockquant gives it all to one winning edge;
    PyG splits it between the tied edges (and, at 0, also with the zero-filled output buffer, so part of
    it is lost). Either is a subgradient; they differ."""

    def __init__(self, model):
        self.model, self.ties, self.handles = model, [], []

    def __enter__(self):
        for name, m in self.model.named_modules():
            if isinstance(m, (gnn.SAGEConv, gnn.GraphConv)) and m.aggr == "max":
                self.handles.append(m.register_forward_pre_hook(self._hook(name)))
        return self.ties

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, name):
        def pre_hook(module, args):
            x, ei = args[0], args[1]
            x_src = (x[0] if isinstance(x, tuple) else x).detach()
            src, dst = ei
            if src.numel() == 0:
                return
            vals = x_src[src]
            best = torch.full((int(dst.max()) + 1, vals.shape[1]), float("-inf"), dtype=vals.dtype).scatter_reduce(
                0, dst[:, None].expand_as(vals), vals, "amax")
            at_max = vals == best[dst]
            for c in range(vals.shape[1]):
                winners = {}
                for e in at_max[:, c].nonzero().flatten().tolist():
                    winners.setdefault(int(dst[e]), set()).add(int(src[e]))
                if any(len(w) > 1 for w in winners.values()) or bool((best[:, c][dst.unique()] == 0).any()):
                    self.ties.append(name)
                    return
        return pre_hook


def _check(case: Case, check_memory: bool):
    graph = case.graph
    # 1. convert succeeds (exact modules are reported, not raised) and leaves the state_dict alone
    ref = copy.deepcopy(case.model)
    conv = _convert(copy.deepcopy(case.model), case.spec, case.filter_prefix, case.first_spec)
    if case.first_spec is not False and case.spec is not None:
        # an explicit config rebuilds every wrapper it chooses differently: as converting once
        once = _convert(copy.deepcopy(case.model), case.spec, case.filter_prefix)
        if case.filter_prefix is None:  # (filter_fn decides what is converted, not what is undone)
            assert _configs_chosen(conv) == _configs_chosen(once)
    want_sd, got_sd = ref.state_dict(), conv.state_dict()
    assert list(got_sd) == list(want_sd)
    assert all(torch.equal(got_sd[k], v) for k, v in want_sd.items())
    # 2. eval with gradients on: the original computation, bit for bit; under no_grad up to summation order
    got, want = _run(conv, graph, train=False), _run(ref, graph, train=False)
    if _same_outcome(got, want, "eval"):
        assert torch.equal(got[1], want[1]), "eval output differs from the unconverted model's"
    got, want = _run(conv, graph, train=False, grad=False), _run(ref, graph, train=False, grad=False)
    if _same_outcome(got, want, "no_grad eval"):
        _close(got[1], want[1], "no_grad eval output")
    # 3. training, lossless stand-in codec, no dropout: the forward and every gradient as the unconverted
    # model's: in float64 to round-off, in float32 about as close to the float64 truth as the original
    ref_t = _no_dropout(copy.deepcopy(case.model))
    conv_t = _convert(_no_dropout(copy.deepcopy(case.model)), _nearest(case.spec), case.filter_prefix,
                      case.first_spec if case.first_spec is False else _nearest(case.first_spec))
    runs = {}
    for dtype in (torch.float32, torch.float64):  # fresh copies: caches (GCN's cached=True) are per dtype
        conv_d, ref_d = copy.deepcopy(conv_t), copy.deepcopy(ref_t)
        with mock.patch.object(save_policy, "compress", lambda x, config: ExactPacked(x)):
            got = _run(conv_d, graph, train=True, backward=True, dtype=dtype)
        with _max_ties_seen(ref_d) as ties:
            want = _run(ref_d, graph, train=True, backward=True, dtype=dtype)
        if not _same_outcome(got, want, f"training under the lossless codec ({dtype})"):
            break
        assert got[2].keys() == want[2].keys()
        for k, g in want[2].items():
            assert (got[2][k] is None) == (g is None), k
        runs[dtype] = got, want, bool(ties)
    if len(runs) == 2:
        (got64, want64, tied64), (got32, want32, tied32) = runs[torch.float64], runs[torch.float32]
        _close64(got64[1], want64[1], "training output (float64)")
        _as_accurate(got32[1], want32[1], want64[1], "training output")
        if tied64 or tied32:  # at a tie of max aggregation the gradient is not unique: the forward only
            _note("max-aggregation ties: gradients not compared")
            return _check_drawn_codec(case, conv, check_memory)
        for k, g in want64[2].items():
            if g is not None:
                _close64(got64[2][k], g, f"gradient of {k} (float64)")
                _as_accurate(got32[2][k], want32[2][k], g, f"gradient of {k}")
    _check_drawn_codec(case, conv, check_memory)


def _check_drawn_codec(case, conv, check_memory):
    # 4. training with the drawn codec (dropout as drawn): it runs where the original runs; finite gradients
    graph, ref = case.graph, copy.deepcopy(case.model)
    got, want = _run(conv, graph, train=True, backward=True), _run(ref, graph, train=True, backward=True)
    if _same_outcome(got, want, "training with the drawn codec") and torch.isfinite(want[1]).all():
        for k, g in got[2].items():
            assert g is None or torch.isfinite(g).all(), f"non-finite gradient of {k}"
        if check_memory:
            _check_held_bytes(conv, graph)


def _check_held_bytes(model, graph):
    """track_saved reports what the allocator holds after a training forward, less the output."""
    model.train()
    inputs = graph.inputs()
    leaves = tuple(t for t in inputs.values() if isinstance(t, torch.Tensor))
    _call(model, graph, inputs)  # caches (the graph's CSR, GCN's normalisation) are built by a first forward
    with blockquant.track_saved(model, exclude=leaves) as mem:
        out = _call(model, graph, inputs)
    del out
    seeds_before = _scalar_int64_tensors()
    with _fd2_silenced():  # the profiler's start/stop lines
        out, net = profiler_net_bytes(lambda: _call(model, graph, inputs))
    held = net - storage_bytes(out)
    # the 0-d seeds of compressed tensors (8 B each) count as 0 B (README); a dropout's is saved as a tensor
    seeds = len(_scalar_int64_tensors() - seeds_before)
    assert held - 8 * seeds <= mem.total_bytes <= held and (held - mem.total_bytes) % 8 == 0, \
        (mem.total_bytes, held, seeds, mem.per_module)


def _scalar_int64_tensors():
    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.dim() == 0
            and o.dtype == torch.int64 and o.device.type == "cpu"}


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
          derandomize="BLOCKQUANT_FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(case=cases(), check_memory=st.integers(0, 7))
def test_property_converted_model_keeps_the_contract(case, check_memory):
    note(f"model: {case.model}")
    g = case.graph
    note(f"graph: x {tuple(g.x.shape)}, x_dst {None if g.x_dst is None else tuple(g.x_dst.shape)}, "
         f"edges {case.graph.edge_index.tolist()}, edge weights {case.graph.edge_weight is not None} "
         f"(learnable {case.graph.learnable_weight}), input grads {case.graph.grad_inputs}")
    note(f"config: {case.spec!r}, filter prefix {case.filter_prefix!r}, converted first with {case.first_spec!r}")
    _check(case, check_memory == 0)
