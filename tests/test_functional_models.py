"""Models written in the functional style (PyG's examples/gcn.py and gat.py, a custom gate) converted
with blockquant.convert: what their whole forward saves, gradients against the unconverted model
under a lossless stand-in codec, and what a converted root does around its forward (one draw from
the user's random stream, inputs resident for the call only, closed when forward raises, nothing in
eval, modules left exact stay exact, the undo of to_original). The K-draw unbiasedness of the same
models is in tests/test_unbiased.py (``models.*`` cases)."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GCNConv, GINConv, SAGEConv
from torch_geometric.utils import coalesce, remove_self_loops

import blockquant
from blockquant import QuantConfig
from blockquant.conversion import ConversionWarning
from blockquant.forward_scope import settings_of
from blockquant.functional import _dropout_noise
from blockquant.nn import CompressedModule
from blockquant.packed import draw_seed_tensor
from blockquant.save_policy import is_resident
from blockquant.seeds import forward_seeds
from codec_utils import lossless_codec
from example_models import GATExample, GatedExample, GCNExample
from tolerances import max_rel_err

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")
SCRIPT_DEPRECATION = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

N, F_IN = 120, 16


def graph(n=N, e=600, f=F_IN, seed=0):
    g = torch.Generator().manual_seed(seed)
    ei = remove_self_loops(coalesce(torch.randint(0, n, (2, e), generator=g), num_nodes=n))[0]
    return torch.randn(n, f, generator=g), ei


MODELS = {"gcn": GCNExample, "gat": GATExample, "gated": GatedExample}


def converted(name, config="int4", **kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)  # every module of these models is covered
        return blockquant.convert(MODELS[name](), config, **kwargs).train()


def held(model, x, ei):
    with blockquant.track_saved(model, exclude=(x, ei)) as mem:
        out = model(x, ei)
    del out
    return mem


# ----------------------------------------------------------------------------- bytes

@pytest.mark.parametrize("name", list(MODELS))
def test_what_the_whole_forward_saves_is_compressed(name):
    """The top level (functional calls) holds nothing at full precision but dropout seeds (8 B each)
    and, in the gated model, nothing at all plain; with functional=False it holds full activations.
    The convolutions hold the same bytes either way: the rules never re-compress what a wrapper kept."""
    x, ei = graph()
    on, off = held(converted(name), x, ei), held(converted(name, functional=False), x, ei)
    seeds = {"gcn": 8, "gat": 8, "gated": 0}[name]  # F.dropout(data.x) records no graph: no seed kept
    assert on.plain_by_call.get("", {}) == ({"_DropoutBackward": seeds} if seeds else {}), on.report()
    hidden = {"gcn": 16, "gat": 32, "gated": 32}[name]
    # without the rules, the top level holds at least two [N, hidden] float32 tensors at full precision
    assert off.per_module[""] >= 2 * N * hidden * 4, off.report()
    assert on.per_module.get("", 0) * 4 < off.per_module[""], (on.report(), off.report())
    for module in on.per_module:
        if module:
            assert on.per_module[module] == off.per_module[module], (module, on.report(), off.report())


def test_gcn_example_bytes_by_hand():
    """gcn.py at int4 / G1024: the ReLU keeps 1 bit per element, the dropouts a seed, conv2 its
    compressed input; nothing of size N x hidden is held at full precision."""
    x, ei = graph()
    cfg = QuantConfig(bits=4, block_size=1024)
    mem = held(converted("gcn", cfg), x, ei)
    relu_mask = math.ceil(N * 16 / 8)
    assert mem.per_module[""] == relu_mask + 8
    conv2_input = blockquant.quantize(torch.randn(N, 16), cfg).nbytes  # 4-bit codes and two blocks' metadata
    assert conv2_input == N * 16 // 2 + 2 * 2 * 2
    # (conv2 holds nothing at full precision: its normalised graph is cached with the graph, not per step)
    assert mem.per_module["conv2"] - sum(mem.plain_by_call.get("conv2", {}).values()) == conv2_input


def test_report_says_what_is_held_at_full_precision_and_by_which_call():
    x, ei = graph()
    model = converted("gated", functional=False)
    with blockquant.track_saved(model, exclude=(x, ei)) as mem:
        out = model(x, ei)
    text = mem.report()
    assert "held at full precision" in text
    for node in ("SigmoidBackward0", "ReluBackward0"):  # the product saves those two tensors again
        line = next(line for line in text.splitlines() if node in line)
        assert line.strip().startswith("<top level>") and int(line.split()[-2].replace(",", "")) == N * 32 * 4
    del out
    on = converted("gated")
    with blockquant.track_saved(on, exclude=(x, ei)) as mem:
        out = on(x, ei)
    assert "" not in mem.plain_by_call  # nothing at the top level is held at full precision any more
    del out


# ----------------------------------------------------------------------------- gradients

class _BlockquantDropoutMasks(torch.overrides.TorchFunctionMode):
    """Runs F.dropout with the masks a converted model's forward draws (same seed stream, same order)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout and kwargs.get("training", True) and kwargs.get("p", 0.5) > 0:
            x = args[0]
            return x * _dropout_noise(x, kwargs.get("p", 0.5), draw_seed_tensor("dropout"))
        return func(*args, **kwargs)


def _grads(model, x, ei, seed=None, reference=False):
    model.zero_grad()
    x = x.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    if reference:
        with forward_seeds(), _BlockquantDropoutMasks():
            out = model(x, ei)
    else:
        out = model(x, ei)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_equal_the_unconverted_model_under_a_lossless_codec(name):
    """Dropout masks aligned (the reference draws F.dropout's masks from the same seed stream), attention
    dropout off (PyG draws it edge by edge): the converted model's gradients equal the original's."""
    x, ei = graph()
    torch.manual_seed(0)
    plain = MODELS[name](**({"attention_dropout": 0.0} if name == "gat" else {})).train()
    model = blockquant.convert(copy.deepcopy(plain), "int2").train()
    with lossless_codec():
        got = _grads(model, x, ei, seed=5)
    ref = _grads(plain, x, ei, seed=5, reference=True)
    for key, g in ref.items():
        assert torch.allclose(got[key], g, rtol=1e-4, atol=1e-6 * float(g.abs().max())), key
    # and without the lossless codec the gradients are close, not equal
    noisy = _grads(model, x, ei, seed=5)
    assert not torch.equal(noisy["conv2.lin.weight" if name != "gated" else "out.weight"],
                           ref["conv2.lin.weight" if name != "gated" else "out.weight"])


class _DenseFunctional(nn.Module):
    """Every routed or hooked functional form between Linear layers (no convolution: their aggregation's
    dtype under autocast is another matter, tested in tests/test_autocast.py)."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2, self.lin3 = nn.Linear(F_IN, 32), nn.Linear(32, 32), nn.Linear(32, 7)

    def forward(self, x, edge_index=None):
        x = F.dropout(x, p=0.5, training=self.training)
        h = F.elu(self.lin1(x))
        h = F.dropout(h, p=0.5, training=self.training)
        gate = self.lin2(h).sigmoid()
        h = F.layer_norm(F.gelu(h * gate), (32,))
        return self.lin3(torch.tanh(h) @ torch.ones(32, 32) / 32).relu()


def test_functional_calls_follow_autocast():
    """Under CPU autocast (bfloat16) the converted model, lossless codec, follows the plain autocast model
    (same dropout masks), not fp32: the routed ops run in the dtype autocast gives them. Their backward
    multiplies by a derivative stored in bfloat16 where ATen's fused kernels round once at the end: about
    one bfloat16 ulp (0.8%) from the plain autocast gradients, against autocast's own 2-3% effect (without
    autocast the two agree to 1e-6: test_gradients_equal_the_unconverted_model_under_a_lossless_codec)."""
    x, _ = graph()
    torch.manual_seed(0)
    plain = _DenseFunctional().train()
    model = blockquant.convert(copy.deepcopy(plain), "int8").train()
    with lossless_codec(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(model, x, None, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(plain, x, None, seed=5, reference=True)
    ref_fp32 = _grads(plain, x, None, seed=5, reference=True)
    autocast_effect = max_rel_err(ref, ref_fp32)
    assert autocast_effect > 1e-3
    assert max_rel_err(got, ref) < 0.5 * autocast_effect, (max_rel_err(got, ref), autocast_effect)


# ----------------------------------------------------------------------------- side effects (issue 19)

def _one_draw_state(seed):
    torch.manual_seed(seed)
    torch.randint(0, 1 << 62, (1,), dtype=torch.int64)
    return torch.get_rng_state()


@pytest.mark.parametrize("nodes", [200, 70_000], ids=["small", "chunked"])
def test_a_training_step_draws_once_from_the_users_generator_whatever_the_graph_size(nodes):
    """One forward + backward advances torch's default generator by exactly one draw, also when a
    large activation is compressed in many row chunks (each with its own seed) and the dropouts
    draw masks over the whole graph."""
    x, ei = graph(n=nodes, e=4 * nodes, f=16)
    model = converted("gcn", "int2")
    if nodes > 1000:
        model.conv1 = GCNConv(16, 32).train()  # [70,000, 32]: more than one 1M-element chunk
        model.conv2 = GCNConv(32, 7).train()
        model = blockquant.convert(model, "int2").train()
    torch.manual_seed(11)
    out = model(x, ei)
    out.pow(2).mean().backward()
    assert torch.equal(torch.get_rng_state(), _one_draw_state(11))


def test_manual_seed_reproduces_a_converted_run_and_seeds_differ_between_steps():
    x, ei = graph()
    model = converted("gat", "int2")
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append([_grads(model, x, ei)["conv1.lin.weight"].clone() for _ in range(2)])
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])


def _dropout_seeds(out):
    seeds, todo, seen = [], [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_DropoutBackward":
            seeds.append(int(node.bq_seed))
        todo.extend(n for n, _ in node.next_functions)
    return sorted(seeds)


def test_dropout_masks_do_not_depend_on_what_else_is_compressed():
    """The k-th dropout of a forward gets the same seed at every config (its own counter), while
    the number of compressed tensors, hence of rounding seeds, differs."""
    x, ei = graph()
    x = x.requires_grad_()  # both dropouts record a graph node
    seeds = []
    for cfg in ("int2", QuantConfig(bits=8, rp_ratio=1, block_size=64)):
        torch.manual_seed(4)
        seeds.append(_dropout_seeds(converted("gat", cfg)(x, ei)))
    assert len(seeds[0]) == 2 and seeds[0] == seeds[1]


def test_inputs_held_by_the_caller_are_saved_by_reference_for_the_call_only():
    """Issue 19's encoder case: a converted GNN fed by an unconverted encoder compresses the encoder's
    output (an intermediate) instead of holding it at full precision, and marks nothing for good."""
    torch.manual_seed(0)
    x, ei = graph(n=500, e=2500, f=64)
    encoder = nn.Linear(64, 64)
    gnn = blockquant.convert(_Sage(), "int2").train()
    graph_state = (x, ei, blockquant.as_adjacency(ei, num_nodes=500)._structure.tensors())  # held anyway
    with blockquant.track_saved(gnn, exclude=graph_state) as fed_encoded:
        h = encoder(x)
        out = gnn(h, ei)
    # the encoder saves x (excluded) and its weight: everything the gnn holds is compressed, enc(x) at
    # 2 bits instead of 32 (before the marks were scoped to leaves, enc(x) was held in full: 128,000 B)
    assert fed_encoded.per_kind["plain"] == 0, fed_encoded.report()
    assert fed_encoded.total_bytes * 4 < 500 * 64 * 4, fed_encoded.report()
    assert not is_resident(h) and not is_resident(x) and not is_resident(ei)
    del out
    with blockquant.track_saved(gnn, exclude=graph_state) as fed_leaf:
        out = gnn(x, ei)  # the caller's own features: by reference, nothing compressed for them
    assert fed_leaf.per_module.get("conv1", 0) < fed_encoded.per_module["conv1"]
    assert not is_resident(x)
    del out


class _Sage(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = SAGEConv(64, 32)
        self.conv2 = SAGEConv(32, 8)

    def forward(self, x, edge_index):
        return self.conv2(self.conv1(x, edge_index).relu(), edge_index)


def test_scope_is_closed_when_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(F_IN, 8)

        def forward(self, x):
            F.dropout(self.lin(x), 0.5, self.training)
            raise RuntimeError("boom")

    model = blockquant.convert(Boom(), "int2").train()
    x, _ = graph()
    with pytest.raises(RuntimeError, match="boom"):
        model(x)
    assert torch._C._len_torch_function_stack() == 0
    assert blockquant.seeds.active_stream() is None and not is_resident(x)
    h = torch.randn(64, 64, requires_grad=True) * 1.0
    assert type(h.exp().grad_fn._raw_saved_result.data) is torch.Tensor  # no saved-tensor hooks left


def test_eval_and_no_grad_forward_like_the_original():
    """Nothing around an evaluation forward: no draw, no rules; under no_grad in train mode the
    dropouts are torch's own (same torch seed, same output as the unconverted model)."""
    x, ei = graph()
    torch.manual_seed(0)
    plain = MODELS["gcn"]()
    model = blockquant.convert(copy.deepcopy(plain), "int2")
    for mode in ("eval", "no_grad"):
        outs = []
        for m in (plain, model):
            torch.manual_seed(2)
            if mode == "eval":
                out = m.eval()(x, ei)
            else:
                with torch.no_grad():
                    out = m.train()(x, ei)
            outs.append((out, torch.get_rng_state()))
            assert torch._C._len_torch_function_stack() == 0
        assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6), mode
        assert torch.equal(outs[0][1], outs[1][1]), mode  # the same draws from torch's generator


def test_a_module_left_exact_stays_exact_inside_a_converted_model():
    """A subtree excluded by config saves what torch saves (the rules are suspended while it runs),
    whatever functional calls it makes; the rest of the forward is compressed."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(F_IN, 32), nn.GELU())
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            return self.head(torch.tanh(self.block(x)))

    x, _ = graph()
    model = blockquant.convert(Net(), {"block": None, "": "int2"}).train()
    assert settings_of(model).exact == ("block",)
    with blockquant.track_saved(model, exclude=(x,)) as mem:
        out = model(x)
    assert mem.plain_by_call["block.1"] == {"GeluBackward0": N * 32 * 4}  # GELU's input, exact
    assert "" not in mem.plain_by_call  # tanh at the top level: its derivative compressed
    del out


@SCRIPT_DEPRECATION
def test_a_refused_root_is_left_exactly_as_it_was_scriptable_too():
    """PyG's own TorchScript check on a SAGEConv convert refused (project=True): no hooks, scriptable."""
    torch.manual_seed(0)
    conv = SAGEConv(16, 32, project=True)
    with pytest.warns(ConversionWarning, match="project=True"):
        out = blockquant.convert(conv, "int4")
    assert out is conv and settings_of(conv) is None
    assert not conv._forward_pre_hooks and not conv._forward_hooks
    x = torch.randn(4, 16)
    ei = torch.tensor([[0, 0, 0, 1, 2, 3], [1, 2, 3, 0, 0, 0]])
    scripted = torch.jit.script(conv)
    assert torch.allclose(scripted(x, ei), conv(x, ei))


# ----------------------------------------------------------------------------- undo

@SCRIPT_DEPRECATION
def test_a_wrapper_roots_own_to_original_removes_the_scope_and_restores_gins_mlp():
    torch.manual_seed(0)
    gcn = blockquant.convert(GCNConv(F_IN, 8), "int4")
    plain = gcn.to_original()
    assert type(plain) is GCNConv and settings_of(plain) is None
    assert not plain._forward_pre_hooks and not plain._forward_hooks
    torch.jit.script(plain)  # the hooks were what TorchScript refused

    gin = blockquant.convert(GINConv(nn.Sequential(nn.Linear(F_IN, 8), nn.ReLU(), nn.Linear(8, 8))), "int4")
    assert isinstance(gin.nn[0], CompressedModule)
    plain = gin.to_original()
    assert not any(isinstance(m, CompressedModule) for m in plain.modules())
    assert not plain._forward_pre_hooks

    gin2 = blockquant.convert(GINConv(nn.Sequential(nn.Linear(F_IN, 8), nn.ReLU())), "int4")
    plain2 = blockquant.to_original(gin2)
    assert not any(isinstance(m, CompressedModule) for m in plain2.modules()) and not plain2._forward_pre_hooks


def test_summary_says_what_happens_to_functional_calls():
    model = converted("gcn")
    text = blockquant.summary(model, print_it=False)
    assert "functional calls in forward: compressed" in text and "functional=False" in text
    off = converted("gcn", functional=False)
    assert "functional calls in forward: saved as torch saves them" in blockquant.summary(off, print_it=False)
    assert not settings_of(blockquant.convert(off)).functional  # None keeps the earlier choice
    with pytest.raises(TypeError, match="functional must be True, False or None"):
        blockquant.convert(MODELS["gcn"](), functional="yes")
