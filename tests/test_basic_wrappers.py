"""blockquant.nn basic wrappers: shared parameters, exact eval/no_grad path,
bit-identical training forward, gradients close at 8 bits, running stats, PyG modules."""
import copy

import pytest
import torch
from torch import nn
from torch_geometric.nn import BatchNorm as PyGBatchNorm
from torch_geometric.nn.dense.linear import Linear as PyGLinear

import blockquant
import blockquant.nn as bqnn
from blockquant import QuantConfig

FINE = QuantConfig(bits=8, block_size=64, rounding="nearest", meta_dtype=torch.float32)


pytestmark = pytest.mark.usefixtures("torch_backend")


def _modules():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(12)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
    return {
        "Linear": (nn.Linear(12, 7), bqnn.QLinear),
        "Linear_nobias": (nn.Linear(12, 7, bias=False), bqnn.QLinear),
        "PyGLinear": (PyGLinear(12, 7), bqnn.QPyGLinear),
        "BatchNorm1d": (bn, bqnn.QBatchNorm1d),
        "BatchNorm1d_momentum_none": (nn.BatchNorm1d(12, momentum=None), bqnn.QBatchNorm1d),
        "BatchNorm1d_no_stats": (nn.BatchNorm1d(12, track_running_stats=False), bqnn.QBatchNorm1d),
        "BatchNorm1d_no_affine": (nn.BatchNorm1d(12, affine=False), bqnn.QBatchNorm1d),
        "PyGBatchNorm": (PyGBatchNorm(12), bqnn.QPyGBatchNorm),
        "LayerNorm": (nn.LayerNorm(12), bqnn.QLayerNorm),
        "LayerNorm_nobias": (nn.LayerNorm(12, bias=False), bqnn.QLayerNorm),
        "ReLU": (nn.ReLU(), bqnn.QReLU),
        "LeakyReLU": (nn.LeakyReLU(0.1), bqnn.QLeakyReLU),
        "ELU": (nn.ELU(0.5), bqnn.QELU),
        "GELU": (nn.GELU(), bqnn.QGELU),
        "GELU_tanh": (nn.GELU(approximate="tanh"), bqnn.QGELU),
    }


NAMES = sorted(_modules())


def _input(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    leaf = torch.randn(n, 12, generator=g).requires_grad_()
    return leaf, leaf * 1.5  # non-leaf: the compressed path stores it compressed


def _pair(name, config=FINE):
    orig, wrapper_cls = _modules()[name]
    ref = copy.deepcopy(orig)  # independent copy with its own buffers for side-by-side runs
    return orig, ref, wrapper_cls.from_module(orig, config)


@pytest.mark.parametrize("name", NAMES)
def test_wrapper_registered_and_shares_parameters(name):
    orig, _, q = _pair(name)
    assert blockquant.nn.WRAPPERS[type(orig)] is type(q)
    assert isinstance(q, type(orig))
    assert list(q.state_dict()) == list(orig.state_dict())
    for (n1, p1), (n2, p2) in zip(orig.named_parameters(), q.named_parameters()):
        assert n1 == n2 and p1 is p2
    for (n1, b1), (n2, b2) in zip(orig.named_buffers(), q.named_buffers()):
        assert n1 == n2 and b1 is b2
    assert repr(orig).rstrip(")") in repr(q) or type(orig).__name__ in repr(q)
    assert "bq=int8/G64/nearest" in repr(q)


@pytest.mark.parametrize("name", NAMES)
def test_training_forward_bit_identical_and_gradients_close(name):
    _, ref, q = _pair(name)
    q.train()
    ref.train()
    for step in range(2):  # two steps: running statistics must evolve identically
        leaf, x = _input(seed=step)
        y = q(x)
        y_ref = ref(x)
        assert torch.equal(y, y_ref), f"{name}: training forward differs (step {step})"
        assert hasattr(y.grad_fn, "bq_state"), "the compressed path was not taken"
        g = torch.randn_like(y)
        params = [p for p in q.parameters()]
        params_ref = [p for p in ref.parameters()]
        got = torch.autograd.grad(y, [leaf] + params, g, retain_graph=True)
        want = torch.autograd.grad(y_ref, [leaf] + params_ref, g)
        for a, b in zip(got, want):
            rel = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
            assert rel < 2e-2, f"{name}: gradient off by {rel:.3g}"
    for b1, b2 in zip(q.buffers(), ref.buffers()):
        assert torch.equal(b1, b2), f"{name}: running statistics differ from torch's"


@pytest.mark.parametrize("name", NAMES)
def test_eval_and_no_grad_run_the_original_forward(name):
    orig, ref, q = _pair(name)
    leaf, x = _input()
    q.eval()
    ref.eval()
    y = q(x)
    assert torch.equal(y, ref(x))
    assert not hasattr(y.grad_fn, "bq_state"), "eval() must not compress"
    q.train()
    ref.train()
    with torch.no_grad():
        y = q(x)
        assert y.grad_fn is None and torch.equal(y, ref(x))
    for b1, b2 in zip(q.buffers(), ref.buffers()):
        assert torch.equal(b1, b2)  # no_grad training still updates running stats like torch


def test_to_original_round_trip_and_wrong_type():
    lin = nn.Linear(4, 3)
    q = bqnn.QLinear.from_module(lin, FINE)
    back = q.to_original()
    assert type(back) is nn.Linear and back.weight is lin.weight
    with pytest.raises(TypeError, match="expects a Linear; got ReLU"):
        bqnn.QLinear.from_module(nn.ReLU(), FINE)


def test_lazy_pyg_linear():
    lazy = PyGLinear(-1, 5)
    with pytest.raises(ValueError, match="run one forward pass first"):
        bqnn.QPyGLinear.from_module(lazy, FINE)
    lazy(torch.randn(3, 6))  # materialises the weight
    q = bqnn.QPyGLinear.from_module(lazy, FINE)
    leaf, x = _input()
    x = x[:, :6]
    assert torch.equal(q(x), lazy(x)) and q.weight is lazy.weight


def test_pyg_batch_norm_swaps_its_inner_module_only_in_the_wrapper():
    orig = PyGBatchNorm(12)
    q = bqnn.QPyGBatchNorm.from_module(orig, FINE)
    assert type(q.module) is bqnn.QBatchNorm1d and type(orig.module) is nn.BatchNorm1d
    assert q.module.weight is orig.module.weight and q.module.running_mean is orig.module.running_mean
    q.train()
    _, x = _input()
    assert hasattr(q(x).grad_fn, "bq_state")


def test_dropout_wrapper():
    drop = nn.Dropout(0.3)
    q = bqnn.QDropout.from_module(drop, FINE)
    leaf, x = _input(n=2000)
    q.train()
    y = q(x)
    assert y.grad_fn.bq_state == () and len(y.grad_fn.saved_tensors) == 0
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.02
    assert torch.allclose(y[kept], x[kept] / 0.7)
    (g,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
    assert torch.allclose(g, kept.float() * 1.5 / 0.7)
    q.eval()
    assert torch.equal(q(x), x)


def test_memory_of_a_block_is_far_below_exact():
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear at INT2: bytes held for backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 16))
    cfg = QuantConfig(bits=2, block_size=1024)
    qmodel = nn.Sequential(*[blockquant.nn.WRAPPERS[type(m)].from_module(m, cfg) for m in model])
    h = torch.randn(1000, 64, requires_grad=True) * 1.0  # an activation, not resident data
    y = qmodel(h)
    states = []
    node, seen = y.grad_fn, set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        states.extend(getattr(n, "bq_state", ()))
        stack.extend(f for f, _ in n.next_functions)
    compressed = sum(s.nbytes for s in states)
    # two INT2 inputs (Linear 1 and BatchNorm's normalised input: 64k + 128k elements at 2 bits
    # + metadata), BatchNorm's sample of exact normalised values for the unbiased input gradient
    # (float32 values at 2 / 1000 of 128k: two per channel at int2), the ReLU mask (128k bits),
    # Linear 2's input (128k at 2 bits);
    # dropout: nothing. Metadata: 2 bf16 values per 1024-element block (63 + 125 + 125 blocks)
    expected = (64_000 + 128_000 + 128_000) // 4 + 128_000 // 8 + (63 + 125 + 125) * 4 + 4 * (128_000 * 2 // 1000)
    assert compressed == expected
    # fp32 would keep 4 bytes per element for the same four tensors
    assert compressed * 9 < 4 * (64_000 + 3 * 128_000)


def test_short_training_run_converges():
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    w_true = torch.randn(10, 1)
    target = (x @ w_true > 0).float().squeeze(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))
    cfg = QuantConfig(bits=2, block_size=256)
    model = nn.Sequential(*[blockquant.nn.WRAPPERS[type(m)].from_module(m, cfg) for m in model])
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target.long())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
