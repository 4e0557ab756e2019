"""The contract behind every compressed op: gradients are noisy but unbiased.

For every wrapper in :mod:`blockquant.nn`, every public op of
:mod:`blockquant.functional`, typical blocks run under
:func:`blockquant.compress_saved_tensors` and whole models written in the
functional style (PyG's gcn.py and gat.py shapes, a sigmoid gate: ``models.*``,
paired with a lossless run of the same dropout masks, see :func:`_model_case`),
at int2 and int4 with stochastic
rounding, we draw ``K = 64`` independently compressed gradients (weights, and
the input where it has one) and compare them with the exact gradient.

If the estimator is unbiased, the squared error of the mean of ``K`` draws is
``tr(Sigma) / K`` in expectation (``Sigma``: the covariance of one draw); a tensor
that backward uses non-linearly adds a bias ``b`` that does not average out:
``E err(K)^2 = |b|^2 + tr(Sigma) / K``. For each gradient tensor separately (a
bias in a small tensor such as GAT's ``att`` would be diluted in a
concatenation) the test computes

    T = 64 * |mean of 64 draws - exact|^2 / tr(Sigma_hat)

with ``Sigma_hat`` the sample covariance of the 64 draws, i.e. the squared ratio
of ``err(64)`` to ``err(1) / sqrt(64)``, and asserts

    T <= 1 + 6 * sqrt(2 / d_eff).

Why this bound: without bias ``T`` is a normalised sum of squares with mean 1
and variance ``2 / d_eff``, where ``d_eff = tr(Sigma)^2 / tr(Sigma^2)`` is the
effective number of independent entries (estimated from the draws; 1 for a
scalar gradient, up to the tensor's size). The bound is six standard
deviations above the mean: the margin on ``err(64) / (err(1) / 8)`` is
``sqrt(T_max)``, about 1.2 for a large gradient and 3.2 for a scalar one
(where a chi-square with one degree of freedom exceeds it with probability
0.2%). A fixed margin of 2.5 would miss most biases: int2 rounding inside a
softmax or a GELU derivative biases the gradient by 0.1 to 0.5 of one draw's
noise, which a test tuned to ``d_eff`` sees (``T`` = 2 to 25) and a fixed
margin does not. Every draw is seeded, so the outcome is deterministic.

Before the fixes that came with this file, the test failed for GATConv and
GATv2Conv (the attention softmax saved its output compressed through
``compress_saved_tensors``), for ELU/GELU (derivative evaluated at a rounded
input), for LayerNorm (the quadratic term of its input gradient) and for the
hook fallback around softmax, sigmoid, tanh, division and norms.
``test_the_harness_detects_*`` keep two such biased estimators failing.

Graphs are small (120 nodes, 16 features) and the codec runs on the PyTorch
backend with one thread: the whole file takes seconds.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
from typing import Callable, Dict, List, NamedTuple

import pytest
import torch
from torch import nn
from torch_geometric.nn import (BatchNorm as PyGBatchNorm, GATConv, GATv2Conv, GCN2Conv, GCNConv, GINConv,
                                GraphConv, SAGEConv)
from torch_geometric.nn.dense.linear import Linear as PyGLinear
from torch_geometric.utils import coalesce, remove_self_loops

import blockquant
from blockquant import QuantConfig
from blockquant import functional as BF
from codec_utils import lossless_codec
from example_models import GATExample, GatedExample, GCNExample

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")

N, E, F = 120, 600, 16
DRAWS = 64
CONFIGS = {
    "int2": QuantConfig(bits=2, block_size=256),
    "int4": QuantConfig(bits=4, block_size=256),
}


def _graph():
    g = torch.Generator().manual_seed(0)
    ei = coalesce(torch.randint(0, N, (2, E), generator=g), num_nodes=N)
    return remove_self_loops(ei)[0]


def _features(*shape, seed=1, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


class Case(NamedTuple):
    """``make(config)`` returns ``(exact, draw)``: ``exact()`` the reference gradients,
    ``draw()`` one compressed gradient (a fresh rounding every call)."""
    make: Callable


# ----------------------------------------------------------------------------- module cases

class _Feed(nn.Module):
    """Runs ``inner`` on ``x_leaf * 1.0``: the input is an intermediate, so the wrapper
    must compress it (a tensor passed to the converted model itself is kept by reference)."""

    def __init__(self, inner, call):
        super().__init__()
        self.inner = inner
        self.call = call

    def forward(self, x_leaf):
        return self.call(self.inner, x_leaf * 1.0)


def _module_case(factory, call=lambda m, x: m(x), in_shape=(N, F), expected=None, scale=1.0):
    """A module case: gradients of ``sum(out * R)`` (R fixed) w.r.t. every parameter and the input.

    ``expected``: the exact gradient is that of ``expected(inner, x)`` instead of the
    module itself (dropout: its expectation is the identity)."""

    def make(config):
        torch.manual_seed(0)
        inner = factory()
        x_leaf = _features(*in_shape, scale=scale).requires_grad_()
        exact_model = _Feed(copy.deepcopy(inner), expected or call)
        compressed = blockquant.convert(_Feed(copy.deepcopy(inner), call), config)
        converted = [m for m in compressed.modules() if isinstance(m, blockquant.nn.CompressedModule)]
        assert converted, "nothing was converted: the case tests nothing"
        exact_model.train()
        compressed.train()

        def grads(model):
            model.zero_grad()
            if x_leaf.grad is not None:
                x_leaf.grad = None
            out = model(x_leaf)
            r = _features(*out.shape, seed=2)
            (out * r).sum().backward()
            res = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            res["input"] = x_leaf.grad.clone()
            return res

        return (lambda: grads(exact_model)), (lambda: grads(compressed))

    return make


def _conv_case(factory, extra=None):
    ei = _graph()
    if extra is None:
        call = lambda m, x: m(x, ei)  # noqa: E731
    else:
        call = lambda m, x: extra(m, x, ei)  # noqa: E731
    return _module_case(factory, call)


MODULE_CASES = {
    "Linear": Case(_module_case(lambda: nn.Linear(F, 12))),
    "PyGLinear": Case(_module_case(lambda: PyGLinear(F, 12))),
    "BatchNorm1d": Case(_module_case(lambda: nn.BatchNorm1d(F))),
    "BatchNorm1d_affine_off": Case(_module_case(lambda: nn.BatchNorm1d(F, affine=False))),
    "PyGBatchNorm": Case(_module_case(lambda: PyGBatchNorm(F))),
    "LayerNorm": Case(_module_case(lambda: nn.LayerNorm(F))),
    # few features: the diagonal term of the LayerNorm gradient is 1/4 of the rank-one term
    "LayerNorm_4": Case(_module_case(lambda: nn.LayerNorm(4), in_shape=(N, 4))),
    "ReLU": Case(_module_case(lambda: nn.ReLU())),
    "LeakyReLU": Case(_module_case(lambda: nn.LeakyReLU(0.2))),
    "ELU": Case(_module_case(lambda: nn.ELU(alpha=0.7), scale=2.0)),
    "GELU": Case(_module_case(lambda: nn.GELU(), scale=2.0)),
    "GELU_tanh": Case(_module_case(lambda: nn.GELU(approximate="tanh"), scale=2.0)),
    "Dropout": Case(_module_case(lambda: nn.Dropout(0.3), expected=lambda m, x: x)),
    "GCNConv": Case(_conv_case(lambda: GCNConv(F, 12))),
    "SAGEConv": Case(_conv_case(lambda: SAGEConv(F, 12))),
    "SAGEConv_max_normalize": Case(_conv_case(lambda: SAGEConv(F, 12, aggr="max", normalize=True))),
    "GraphConv": Case(_conv_case(lambda: GraphConv(F, 12))),
    "GINConv_train_eps": Case(_conv_case(lambda: GINConv(nn.Sequential(nn.Linear(F, 12), nn.ReLU(),
                                                                       nn.Linear(12, 12)), train_eps=True))),
    "GCN2Conv": Case(_conv_case(lambda: GCN2Conv(F, alpha=0.2, theta=0.5, layer=1),
                                extra=lambda m, x, ei: m(x, x * 0.5, ei))),
    "GATConv": Case(_conv_case(lambda: GATConv(F, 8, heads=2))),
    "GATv2Conv": Case(_conv_case(lambda: GATv2Conv(F, 8, heads=2))),
}

# ----------------------------------------------------------------------------- functional cases


def _functional_case(op: Callable, exact: Callable, params: Dict[str, torch.Tensor], in_shape=(N, F), scale=1.0):
    """``op(x, params, config)`` against ``exact(x, params)``; ``x`` is an intermediate."""

    def make(config):
        x_leaf = _features(*in_shape, scale=scale).requires_grad_()
        leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}

        def grads(fn):
            for t in [x_leaf, *leaves.values()]:
                t.grad = None
            out = fn(x_leaf * 1.0)
            (out * _features(*out.shape, seed=2)).sum().backward()
            res = {k: v.grad.clone() for k, v in leaves.items()}
            res["input"] = x_leaf.grad.clone()
            return res

        return (lambda: grads(lambda x: exact(x, leaves))), (lambda: grads(lambda x: op(x, leaves, config)))

    return make


def _edge_weight():
    return torch.rand(_graph().size(1), generator=torch.Generator().manual_seed(3)) + 0.5


def _exact_aggregate(x, w, reduce):
    ei = _graph()
    msg = x.index_select(0, ei[0]) * (1 if w is None else w.view(-1, 1))
    out = x.new_zeros(N, x.shape[1])
    if reduce == "max":
        return out.scatter_reduce(0, ei[1].view(-1, 1).expand_as(msg), msg, reduce="amax", include_self=False)
    out = out.index_add(0, ei[1], msg)
    if reduce == "mean":
        out = out / torch.bincount(ei[1], minlength=N).clamp(min=1).view(-1, 1)
    return out


_W = _features(12, F, seed=4) * 0.3
_C = {"w": torch.rand(F) + 0.5, "b": torch.randn(F)}
FUNCTIONAL_CASES = {
    "linear": Case(_functional_case(lambda x, p, c: BF.linear(x, p["w"], p["b"], c),
                                    lambda x, p: torch.nn.functional.linear(x, p["w"], p["b"]),
                                    {"w": _W, "b": torch.zeros(12)})),
    "linear_rp4": Case(_functional_case(lambda x, p, c: BF.linear(x, p["w"], None, c.replace(rp_ratio=4)),
                                        lambda x, p: torch.nn.functional.linear(x, p["w"]), {"w": _W})),
    "aggregate_mean": Case(_functional_case(lambda x, p, c: BF.aggregate(x, _graph(), "mean", c),
                                            lambda x, p: _exact_aggregate(x, None, "mean"), {})),
    "aggregate_max": Case(_functional_case(lambda x, p, c: BF.aggregate(x, _graph(), "max", c),
                                           lambda x, p: _exact_aggregate(x, None, "max"), {})),
    "aggregate_learnable_weight": Case(_functional_case(
        lambda x, p, c: BF.aggregate(x, blockquant.as_adjacency(_graph(), num_nodes=N, edge_weight=p["w"]),
                                     "sum", c),
        lambda x, p: _exact_aggregate(x, p["w"], "sum"), {"w": _edge_weight()})),
    # the weight gradient (A^T g)^T x_hat reads the compressed x, not a compressed aggregate
    "aggregate_linear_mean": Case(_functional_case(
        lambda x, p, c: BF.aggregate_linear(x, _graph(), p["w"], p["b"], "mean", c),
        lambda x, p: torch.nn.functional.linear(_exact_aggregate(x, None, "mean"), p["w"], p["b"]),
        {"w": _W, "b": torch.zeros(12)})),
    "aggregate_linear_sum_rp4_wide": Case(_functional_case(
        lambda x, p, c: BF.aggregate_linear(x, _graph(), p["w"], None, "sum", c.replace(rp_ratio=4)),
        lambda x, p: torch.nn.functional.linear(_exact_aggregate(x, None, "sum"), p["w"]),
        {"w": _features(24, F, seed=7) * 0.3})),
    "relu": Case(_functional_case(lambda x, p, c: BF.relu(x), lambda x, p: torch.relu(x), {})),
    "leaky_relu": Case(_functional_case(lambda x, p, c: BF.leaky_relu(x, 0.1),
                                        lambda x, p: torch.nn.functional.leaky_relu(x, 0.1), {})),
    "dropout": Case(_functional_case(lambda x, p, c: BF.dropout(x, 0.5), lambda x, p: x, {})),
    "batch_norm": Case(_functional_case(
        lambda x, p, c: BF.batch_norm(x, None, None, p["w"], p["b"], True, config=c),
        lambda x, p: torch.nn.functional.batch_norm(x, None, None, p["w"], p["b"], True), _C)),
    "batch_norm_3d": Case(_functional_case(
        lambda x, p, c: BF.batch_norm(x, None, None, p["w"], p["b"], True, config=c),
        lambda x, p: torch.nn.functional.batch_norm(x, None, None, p["w"], p["b"], True), _C,
        in_shape=(6, F, 5))),
    "layer_norm": Case(_functional_case(
        lambda x, p, c: BF.layer_norm(x, F, p["w"], p["b"], config=c),
        lambda x, p: torch.nn.functional.layer_norm(x, (F,), p["w"], p["b"]), _C)),
    "layer_norm_2d_shape": Case(_functional_case(
        lambda x, p, c: BF.layer_norm(x, (3, 4), config=c),
        lambda x, p: torch.nn.functional.layer_norm(x, (3, 4)), {}, in_shape=(N, 3, 4))),
    "elu": Case(_functional_case(lambda x, p, c: BF.elu(x, 1.3, c),
                                 lambda x, p: torch.nn.functional.elu(x, 1.3), {}, scale=2.0)),
    "gelu": Case(_functional_case(lambda x, p, c: BF.gelu(x, config=c),
                                  lambda x, p: torch.nn.functional.gelu(x), {}, scale=2.0)),
}

# ----------------------------------------------------------------------------- hook fallback cases


def _hook_case(block: Callable, params: Dict[str, torch.Tensor]):
    """``block(x, params)`` run plainly and under ``compress_saved_tensors(config, min_numel=0)``."""

    def hooked(x, p, c):
        with blockquant.compress_saved_tensors(c, min_numel=0):
            return block(x, p)

    return _functional_case(hooked, block, params)


_Wt = _W.t().contiguous()
HOOK_CASES = {
    "matmul": Case(_hook_case(lambda x, p: (x @ p["w"]) @ p["v"],
                              {"w": _Wt, "v": _features(12, 8, seed=5)})),
    "mul_sum": Case(_hook_case(lambda x, p: (x * p["w"]).sum(-1, keepdim=True) * x, {"w": _features(F, seed=6)})),
    "softmax": Case(_hook_case(lambda x, p: torch.softmax(x @ p["w"], dim=-1), {"w": _Wt})),
    "log_softmax": Case(_hook_case(lambda x, p: torch.log_softmax(x @ p["w"], dim=-1), {"w": _Wt})),
    "exp": Case(_hook_case(lambda x, p: (x @ p["w"]).exp(), {"w": _Wt})),
    "sigmoid": Case(_hook_case(lambda x, p: torch.sigmoid(x @ p["w"]) @ p["w"].t(), {"w": _Wt})),
    "tanh": Case(_hook_case(lambda x, p: torch.tanh(x @ p["w"]), {"w": _Wt})),
    "division": Case(_hook_case(lambda x, p: (x @ p["w"]) / (x.pow(2).sum(-1, keepdim=True) + 1), {"w": _Wt})),
    "layer_norm": Case(_hook_case(lambda x, p: torch.nn.functional.layer_norm(x, (F,), p["w"], p["b"]), _C)),
    "normalize": Case(_hook_case(lambda x, p: torch.nn.functional.normalize(x @ p["w"], dim=-1), {"w": _Wt})),
    "gelu_linear": Case(_hook_case(lambda x, p: torch.nn.functional.linear(torch.nn.functional.gelu(x), p["w"]),
                                   {"w": _W})),
}

# ----------------------------------------------------------------------------- functional-style models


def _model_case(factory):
    """A whole model written in the functional style (``F.dropout``, ``.relu()``, ``F.elu``, ``x.sigmoid()``),
    converted with :func:`blockquant.convert`, so that its functional calls run under the converted
    forward's rules. Its dropouts draw fresh masks every forward, so the gradient to converge to differs
    between draws: draw ``k`` is ``ref + g_k - e_k``, with ``g_k`` the compressed gradient of a forward
    seeded ``k`` and ``e_k`` the gradient of the same forward (same seed, hence the same masks: dropout
    seeds have a counter of their own) under a lossless stand-in codec. Unbiased compression makes
    ``g_k - e_k`` average to zero."""

    def make(config):
        ei = _graph()
        torch.manual_seed(0)
        model = blockquant.convert(factory(), config).train()
        x_leaf = _features(N, F).requires_grad_()

        def grads(seed, lossless):
            model.zero_grad()
            x_leaf.grad = None
            torch.manual_seed(seed)
            with lossless_codec() if lossless else contextlib.nullcontext():
                out = model(x_leaf * 1.0, ei)  # an intermediate input: the first layer compresses it
                (out * _features(*out.shape, seed=2)).sum().backward()
            res = {n: p.grad.clone() for n, p in model.named_parameters()}
            res["input"] = x_leaf.grad.clone()
            return res

        ref = grads(10_000, True)
        seeds = itertools.count(1)

        def draw():
            seed = next(seeds)
            compressed, exact = grads(seed, False), grads(seed, True)
            return {k: ref[k] + compressed[k] - exact[k] for k in ref}

        return (lambda: ref), draw

    return make


MODEL_CASES = {
    "gcn_example": Case(_model_case(lambda: GCNExample(F, 16, 7))),
    "gat_example": Case(_model_case(lambda: GATExample(F, 8, 7, heads=4))),
    "gated_relu_sigmoid": Case(_model_case(lambda: GatedExample(F, 32, 7))),
}

ALL_CASES = {**{f"nn.{k}": v for k, v in MODULE_CASES.items()},
             **{f"functional.{k}": v for k, v in FUNCTIONAL_CASES.items()},
             **{f"hooks.{k}": v for k, v in HOOK_CASES.items()},
             **{f"models.{k}": v for k, v in MODEL_CASES.items()}}


# ----------------------------------------------------------------------------- measurement

def _seed_of(name: str) -> int:
    return sum(ord(c) * (i + 1) for i, c in enumerate(name)) % 10_000


def measure(name: str, config: QuantConfig, draws: int = DRAWS):
    """``(exact, samples)``: the exact gradients and ``draws`` compressed ones, each a dict name -> tensor."""
    case = ALL_CASES[name]
    torch.manual_seed(_seed_of(name))
    exact_fn, draw_fn = case.make(config)
    exact = {k: v.double() for k, v in exact_fn().items()}
    samples: List[Dict[str, torch.Tensor]] = []
    for _ in range(draws):
        samples.append({k: v.double() for k, v in draw_fn().items()})
    return exact, samples


def mean_errors(exact, samples, ks=(1, 4, 16, 64)):
    """name -> [relative error of the mean of the first k draws for k in ks]."""
    out = {}
    for key, ref in exact.items():
        denom = ref.norm().clamp_min(1e-30)
        acc = torch.zeros_like(ref)
        errs = []
        for i, s in enumerate(samples, 1):
            acc += s[key]
            if i in ks:
                errs.append(((acc / i - ref).norm() / denom).item())
        out[key] = errs
    return out


def single_draw_rms(exact, samples):
    """name -> RMS over the draws of one draw's relative error (against the exact gradient)."""
    out = {}
    for key, ref in exact.items():
        denom = ref.norm().clamp_min(1e-30)
        sq = sum(((s[key] - ref).norm() / denom).item() ** 2 for s in samples)
        out[key] = math.sqrt(sq / len(samples))
    return out


def bias_statistic(exact, samples):
    """name -> ``(T, d_eff, T_max)`` as defined in the module docstring."""
    out = {}
    for key, ref in exact.items():
        draws = torch.stack([s[key].reshape(-1) for s in samples], 1)  # [d, K]
        k = draws.shape[1]
        mean = draws.mean(1)
        centred = draws - mean[:, None]
        tr = (centred * centred).sum() / (k - 1)
        if tr <= 0:  # no noise at all: the mean must then be exact, up to float32 summation order
            scale = float(ref.abs().max())
            t = 0.0 if torch.allclose(mean, ref.reshape(-1), rtol=1e-5, atol=1e-6 * scale + 1e-12) else math.inf
            out[key] = (t, math.inf, 1.0)
            continue
        gram = centred.t() @ centred / (k - 1)  # same non-zero spectrum as Sigma_hat
        # unbiased estimate of tr(Sigma^2) (the plain one overstates it by about tr(Sigma)^2 / (k - 1))
        tr_sq = (k - 1) ** 2 / ((k - 2) * (k + 1)) * ((gram * gram).sum() - tr ** 2 / (k - 1))
        d_eff = float(tr ** 2 / tr_sq) if tr_sq > 0 else float(draws.shape[0])
        d_eff = min(max(d_eff, 1.0), float(draws.shape[0]))
        t = float(k * ((mean - ref.reshape(-1)) ** 2).sum() / tr)
        out[key] = (t, d_eff, 1.0 + 6.0 * math.sqrt(2.0 / d_eff))
    return out


def _params():
    for name, case in ALL_CASES.items():
        for cfg_name in CONFIGS:
            yield pytest.param(name, cfg_name, id=f"{name}-{cfg_name}")


@pytest.mark.parametrize("name, cfg_name", list(_params()))
def test_mean_of_compressed_gradients_converges_like_one_over_sqrt_k(name, cfg_name):
    _assert_unbiased(name, cfg_name)


def _assert_unbiased(name, cfg_name):
    exact, samples = measure(name, CONFIGS[cfg_name])
    assert exact, "no gradients to compare"
    failures = []
    for key, (t, d_eff, t_max) in bias_statistic(exact, samples).items():
        assert torch.isfinite(exact[key]).all()
        if t > t_max:
            failures.append(f"{key}: 64 err(64)^2 / err(1)^2 = {t:.3g} > {t_max:.3g} (d_eff {d_eff:.0f})")
    assert not failures, f"{name} at {cfg_name}: the mean gradient does not converge (biased): " + "; ".join(failures)


# Where the codec runs compiled on the CPU, the compiled elementwise ops (blockquant.kernels.native_ops)
# replace the PyTorch code of these cases: dropout's mask, ReLU's activation and mask, batch norm's
# encode and backward fused with the codec (int2 at 120 nodes keeps the sampled square estimator), and
# attention's multi-head aggregation and per-edge dot products.
NATIVE_CASES = ("nn.BatchNorm1d", "nn.BatchNorm1d_affine_off", "nn.PyGBatchNorm", "nn.ReLU", "nn.LeakyReLU",
                "nn.Dropout", "functional.batch_norm", "nn.GINConv_train_eps", "nn.GATConv", "nn.GATv2Conv")


@pytest.mark.parametrize("name", NATIVE_CASES)
def test_unbiased_with_the_compiled_cpu_ops(name, monkeypatch):
    from blockquant.kernels import native, native_ops

    if not native.available():
        pytest.skip(f"compiled CPU codec unavailable: {native.unavailable_reason()}")
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "native")
    calls = []
    for op in ("dropout", "relu_pack", "mask_grad", "quantize_affine", "bn_backward", "heads_spmm", "heads_sddmm"):
        real = getattr(native_ops, op)
        monkeypatch.setattr(native_ops, op, lambda *a, _real=real, _op=op, **k: calls.append(_op) or _real(*a, **k))
    _assert_unbiased(name, "int2")
    assert calls, f"{name}: no compiled op ran, the case tests nothing new"
    if "atch" in name:  # batch norm: encoded and differentiated by the fused passes
        assert {"quantize_affine", "bn_backward"} <= set(calls)
    if "GAT" in name:
        assert {"heads_spmm", "heads_sddmm"} <= set(calls)


def test_the_harness_detects_a_biased_estimator():
    """A deliberately biased op (x_hat squared in backward) must fail the criterion."""

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.packed = blockquant.quantize(x.detach(), CONFIGS["int2"])
            return x ** 3

        @staticmethod
        def backward(ctx, g):
            x_hat = ctx.packed.dequantize()
            return 3 * g * x_hat * x_hat  # E[x_hat^2] = x^2 + rounding variance: biased

    x_leaf = _features(N, F).requires_grad_()
    torch.manual_seed(0)
    exact = {"input": (3 * x_leaf.detach() ** 2).double()}
    samples = [{"input": torch.autograd.grad(Cube.apply(x_leaf * 1.0).sum(), x_leaf)[0].double()}
               for _ in range(DRAWS)]
    t, d_eff, t_max = bias_statistic(exact, samples)["input"]
    assert t > t_max


def test_the_harness_detects_compressing_what_softmax_saves(monkeypatch):
    """Before the allow-list, compress_saved_tensors quantized softmax's saved output (as GAT's
    attention did through it): the harness must reject that."""
    from blockquant import saved_hooks

    monkeypatch.setattr(saved_hooks, "COMPRESSED_OPS", saved_hooks.COMPRESSED_OPS | {"softmax"})
    exact, samples = measure("hooks.softmax", CONFIGS["int2"])
    t, d_eff, t_max = bias_statistic(exact, samples)["input"]
    assert t > t_max


def report(ks=(1, 4, 16, 64)) -> str:
    """Markdown table for every case: the relative error of the K-draw mean over all gradient tensors
    concatenated, and the bias statistic of the worst tensor against its bound."""
    lines = ["| case | config | " + " | ".join(f"K={k}" for k in ks) + " | worst T / T_max (tensor) |",
             "|---|---|" + "---|" * len(ks) + "---|"]
    for name in ALL_CASES:
        for cfg_name, cfg in CONFIGS.items():
            exact, samples = measure(name, cfg)
            keys = list(exact)
            cat_ref = {"all": torch.cat([exact[k].reshape(-1) for k in keys])}
            cat_s = [{"all": torch.cat([s[k].reshape(-1) for k in keys])} for s in samples]
            errs = mean_errors(cat_ref, cat_s, ks)["all"]
            stats = bias_statistic(exact, samples)
            worst = max(keys, key=lambda k: stats[k][0] / stats[k][2])
            t, _, t_max = stats[worst]
            lines.append(f"| {name} | {cfg_name} | " + " | ".join(f"{e:.3g}" for e in errs)
                         + f" | {t:.2f} / {t_max:.2f} ({worst}){' FAIL' if t > t_max else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python tests/test_unbiased.py: print the table
    import os

    os.environ.setdefault("BLOCKQUANT_BACKEND", "torch")
    torch.set_num_threads(1)
    print(report())


def test_square_sample_estimates_squares_without_bias():
    """The normalisations' diagonal term: ``SquareSample.estimate`` has expectation ``xn ** 2``."""
    from blockquant.functional import SquareSample

    xn = _features(8, 8, seed=7)
    torch.manual_seed(0)
    draws = torch.stack([SquareSample(xn, 1 / 8).estimate(xn.shape, torch.float64) for _ in range(4000)])
    mean, var = draws.mean(0), draws.var(0)
    assert (var > 0).all()
    # sum of squared z-scores of the mean: chi-square with 64 degrees of freedom without bias
    chi2 = ((mean - xn.double() ** 2) ** 2 / (var / draws.shape[0])).sum().item()
    assert chi2 < 64 + 6 * math.sqrt(2 * 64)
