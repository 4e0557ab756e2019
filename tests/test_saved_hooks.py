"""blockquant.compress_saved_tensors: what is compressed, what is left alone,
round trips of dtype/shape, gradient quality, bytes, errors."""
import pytest
import torch
from torch import nn

import blockquant
from blockquant import PackedTensor, QuantConfig, compress_saved_tensors
from blockquant.functional import mark_resident
from blockquant.kernels.bitmask import BitMask
from tolerances import rel_err

FINE = QuantConfig(bits=8, block_size=64, rounding="nearest", meta_dtype=torch.float32)


pytestmark = pytest.mark.usefixtures("torch_backend")  # tests marked default_backend keep the default


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def _grads(model, x, config=None, record=None):
    model.zero_grad()
    if config is None:
        loss = model(x).pow(2).sum()
    else:
        with compress_saved_tensors(config, record=record):
            loss = model(x).pow(2).sum()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_mlp_gradients_close_at_8_bits_and_packed_objects_recorded():
    model = _mlp()
    x = torch.randn(128, 32)
    mark_resident(x)  # the input data: held by the caller
    exact = _grads(model, x)
    record = []
    approx = _grads(model, x, FINE, record)
    for a, b in zip(approx, exact):
        assert rel_err(a, b) < 1e-2
    # resident x and the parameters are not compressed. GELU runs as blockquant.functional.gelu
    # (its compressed derivative is in its node's bq_state, not recorded); the next linear's input
    # is compressed; ReLU keeps the sign of its output as a 1-bit mask and the last linear
    # compresses that output; pow(2) saves the model output exactly (pow is not linear in it)
    kinds = [(type(p).__name__, tuple(p.shape)) for p in record]
    assert kinds == [("PackedTensor", (128, 64)), ("BitMask", (128, 64)), ("PackedTensor", (128, 64))]


def test_unbiased_gradient_at_2_bits():
    """A linear layer fed by an activation: grad_W = g^T h_hat is unbiased."""
    torch.manual_seed(0)
    lin = nn.Linear(24, 6)
    base = torch.randn(64, 24, requires_grad=True)
    g = torch.randn(64, 6)
    exact = torch.autograd.grad(lin(base * 1.0), lin.weight, g)[0]
    cfg = QuantConfig(bits=2, block_size=32)
    samples = []
    for _ in range(200):
        with compress_saved_tensors(cfg, min_numel=0):
            y = lin(base * 1.0)
        samples.append(torch.autograd.grad(y, lin.weight, g)[0])
    s = torch.stack(samples)
    var_sum = s.var(0).sum().item()
    assert var_sum > 0
    # ||mean - exact||^2 averages sum(var)/K for an unbiased estimator; 4x margin
    assert (s.mean(0) - exact).pow(2).sum().item() < 4 * var_sum / len(samples)


def test_projection_is_switched_off():
    record = []
    h = torch.randn(100, 64, requires_grad=True) * 1.0
    with compress_saved_tensors(QuantConfig(bits=2, rp_ratio=8), record=record):
        y = h.exp()
    (p,) = record
    assert p.proj_dims is None and p.config.rp_ratio == 1
    y.sum().backward()


def test_left_alone_parameters_resident_integer_tiny_and_non_finite():
    record = []
    lin = nn.Linear(64, 64)
    data_x = torch.randn(100, 64)  # the input data, declared resident
    mark_resident(data_x)
    idx = torch.randint(0, 100, (5000,))
    h_leaf = torch.randn(100, 64, requires_grad=True)
    small_leaf = torch.randn(10, 10, requires_grad=True)
    h, small = h_leaf * 1.0, small_leaf * 1.0
    with compress_saved_tensors(FINE, record=record):
        a = lin(data_x)  # saves data_x (resident) and the weight (parameter, as a view)
        b = h.index_select(0, idx)  # saves the int64 index (and nothing float)
        c = small.exp()  # 100 elements < min_numel: kept
        d = (h * float("inf")).exp()  # non-finite saved result: kept exact, no error
    assert record == []
    # the graphs still work
    (a.sum() + b.sum() + c.sum()).backward(retain_graph=True)
    assert h_leaf.grad is not None and small_leaf.grad is not None and lin.weight.grad is not None
    # the kept tensor is the exact one: the gradient equals plain autograd's
    ref = (h * float("inf")).exp()
    g1 = torch.autograd.grad(d.sum(), h)[0]
    g2 = torch.autograd.grad(ref.sum(), h)[0]
    assert torch.equal(g1.isnan(), g2.isnan()) and torch.equal(g1.nan_to_num(), g2.nan_to_num())


def test_bool_tensors_packed_losslessly_and_dtype_shape_restored():
    record = []
    h = torch.randn(50, 41, requires_grad=True)
    hb = (h * 1.0).to(torch.bfloat16)
    mask = torch.rand(50, 41) > 0.5
    mask_nonleaf = mask.clone().t().contiguous().t()  # a non-contiguous bool view
    with compress_saved_tensors(FINE, record=record):
        y = hb.exp()  # saves a bf16 output
        z = torch.where(mask_nonleaf, h * 1.0, torch.zeros(()))  # saves the bool condition
    kinds = sorted(type(p).__name__ for p in record)
    assert kinds == ["BitMask", "PackedTensor"]
    bm = next(p for p in record if isinstance(p, BitMask))
    assert bm.nbytes == -(-50 * 41 // 8)
    assert torch.equal(bm.unpack(), mask)
    pt = next(p for p in record if isinstance(p, PackedTensor))
    assert pt.dtype == torch.bfloat16 and pt.shape == (50, 41)
    # unpacking gives back the original dtype and shape: backward runs and is close
    gy = torch.autograd.grad(y.float().sum(), h, retain_graph=True)[0]
    ref = torch.autograd.grad((h * 1.0).to(torch.bfloat16).exp().float().sum(), h)[0]
    assert gy.dtype == torch.float32 and rel_err(gy, ref) < 2e-2
    gz = torch.autograd.grad(z.sum(), h)[0]
    assert torch.equal(gz, mask.float())


def test_float64_through_float32_codec():
    record = []
    h = torch.randn(100, 30, dtype=torch.float64, requires_grad=True)
    with compress_saved_tensors(FINE, record=record):
        y = (h * 1.0).exp()
    (g,) = torch.autograd.grad(y.sum(), h)
    assert g.dtype == torch.float64 and rel_err(g, h.detach().exp()) < 1e-2
    assert len(record) == 1


def test_compressed_bytes_far_below_exact():
    model = _mlp()
    x = torch.randn(512, 32)
    mark_resident(x)
    record = []
    with compress_saved_tensors(QuantConfig(bits=2, block_size=1024), record=record):
        model(x).sum()
    held = sum(p.nbytes for p in record)
    exact = 2 * 512 * 64 * 4  # the two fp32 activations of 512 x 64 that are compressed
    # two linear inputs: 2-bit codes + 32 blocks x 2 bf16 each; the ReLU sign: 1 bit per element
    assert held == 2 * (512 * 64 // 4 + 32 * 4) + 512 * 64 // 8
    assert held * 6 < exact


def test_track_saved_sees_the_packed_objects():
    model = _mlp()
    x = torch.randn(512, 32)
    with blockquant.track_saved(model, exclude=(x,)) as plain:
        out = model(x)
    del out
    with compress_saved_tensors(QuantConfig(bits=2, block_size=1024)):
        with blockquant.track_saved(model, exclude=(x,)) as packed:
            out = model(x)
    assert packed.total_bytes > 0 and packed.per_kind["plain"] == 0
    del out  # the graph, and what it saved, stayed alive until here
    # GELU's input (131,072 B) is plain without the rules; with them, its derivative is compressed
    assert packed.total_bytes * 8 < plain.total_bytes


def test_callable_record_and_errors():
    seen = []
    h = torch.randn(64, 64, requires_grad=True) * 1.0
    with compress_saved_tensors(FINE, record=seen.append):
        h.exp()
    assert len(seen) == 1
    with compress_saved_tensors("int2", record=seen.append):  # preset names, as convert takes them
        h.exp()
    assert seen[-1].config == QuantConfig.preset("int2")
    with pytest.raises(TypeError, match="compress_saved_tensors expects config to be a QuantConfig, a preset name"):
        with compress_saved_tensors(2):
            pass
    with pytest.raises(ValueError, match="unknown QuantConfig preset"):
        with compress_saved_tensors("int3"):
            pass
    with pytest.raises(ValueError, match="min_numel"):
        with compress_saved_tensors(FINE, min_numel=-1):
            pass
    with pytest.raises(TypeError, match="record must be a list or a callable"):
        with compress_saved_tensors(FINE, record=3):
            pass


@pytest.mark.default_backend
def test_mlp_through_the_default_backend():
    model = _mlp()
    x = torch.randn(64, 32)
    exact = _grads(model, x)
    approx = _grads(model, x, FINE)
    assert all(rel_err(a, b) < 1e-2 for a, b in zip(approx, exact))


def test_only_ops_linear_in_what_they_save_are_compressed():
    """softmax, division, normalize, pow keep what they save exact; products and exp compress."""
    h_leaf = torch.randn(64, 64, requires_grad=True)
    w = torch.randn(64, 64)
    blocks = [lambda h: torch.softmax(h, -1), lambda h: h / (h.abs() + 1),
              lambda h: torch.nn.functional.normalize(h, dim=-1), lambda h: h.pow(3)]
    record = []
    for block in blocks:
        with compress_saved_tensors(FINE, record=record):
            y = block(h_leaf * 1.0)
        assert record == []
        got = torch.autograd.grad(y.sum(), h_leaf)[0]
        assert torch.equal(got, torch.autograd.grad(block(h_leaf * 1.0).sum(), h_leaf)[0])
    with compress_saved_tensors(FINE, record=record):
        h = h_leaf * 1.0
        a = h @ w  # saves w for h's gradient (not a graph tensor, not resident: compressed)
        b = h.exp()  # saves its output: backward is g * output
    assert sorted(tuple(p.shape) for p in record) == [(64, 64)] * 2
    assert all(isinstance(p, PackedTensor) for p in record)
    (a.sum() + b.sum()).backward()


def test_a_tensor_kept_exact_by_one_op_is_not_also_compressed():
    """The exact copy is held anyway: a compressed copy would only add bytes (and noise)."""
    torch.manual_seed(0)
    h_leaf = torch.randn(64, 64, requires_grad=True)
    lin = nn.Linear(64, 64)
    blocks = {
        "exact_first": lambda h: h.pow(3) + lin(h),  # pow saves h exactly, then linear
        "compressed_first": lambda h: lin(h) + h.pow(3),  # linear compresses h, then pow
    }
    for order, block in blocks.items():
        with compress_saved_tensors(QuantConfig(bits=2)):
            y = block(h_leaf * 1.0)
        got = torch.autograd.grad(y.sum(), lin.weight)[0]
        exact = torch.autograd.grad(block(h_leaf * 1.0).sum(), lin.weight)[0]
        assert torch.equal(got, exact), order


def test_relu_keeps_a_sign_mask_and_its_gradient_is_exact():
    h_leaf = torch.randn(100, 64, requires_grad=True)
    record = []
    with compress_saved_tensors(QuantConfig(bits=2), record=record):
        y = torch.relu(h_leaf * 1.0)
        z = torch.nn.functional.leaky_relu(h_leaf * 1.0, 0.1)
    assert [type(p).__name__ for p in record] == ["BitMask", "BitMask"]
    g = torch.randn(100, 64)
    assert torch.equal(torch.autograd.grad(y, h_leaf, g)[0], torch.autograd.grad(torch.relu(h_leaf), h_leaf, g)[0])
    assert torch.equal(torch.autograd.grad(z, h_leaf, g)[0],
                       torch.autograd.grad(torch.nn.functional.leaky_relu(h_leaf, 0.1), h_leaf, g)[0])


def test_double_backward_through_compressed_tensors_raises():
    lin = nn.Linear(64, 8)
    h_leaf = torch.randn(100, 64, requires_grad=True)
    with compress_saved_tensors(FINE):
        y = lin(torch.nn.functional.gelu(h_leaf * 1.0))
    with pytest.raises(RuntimeError, match="second-order gradients are not supported.*to_original"):
        torch.autograd.grad(y.pow(2).sum(), lin.weight, create_graph=True)
    with compress_saved_tensors(FINE):
        y = lin(torch.nn.functional.gelu(h_leaf * 1.0))
    (g,) = torch.autograd.grad(y.pow(2).sum(), lin.weight)  # first order still works
    assert torch.isfinite(g).all()


def test_routed_functions_keep_what_the_blockquant_op_keeps():
    """F.dropout keeps a seed, ELU/GELU/sigmoid/tanh a compressed derivative, the norms a compressed xn: the
    same autograd nodes as the blockquant.functional ops; under a lossless codec the gradients are torch's
    (dropout: with blockquant's mask); in-place calls, out= and integer inputs run as torch runs them."""
    from blockquant import functional as BF
    from codec_utils import lossless_codec

    F = torch.nn.functional
    h_leaf = torch.randn(64, 48, requires_grad=True)
    w, b = torch.rand(48) + 0.5, torch.randn(48)
    cases = {
        "_DropoutBackward": lambda h: F.dropout(h, 0.3, True),
        "_SmoothBackward": lambda h: F.elu(h, 0.7) + F.gelu(h, approximate="tanh") + h.sigmoid() + torch.tanh(h),
        "_LayerNormBackward": lambda h: F.layer_norm(h, (48,), w, b),
        "_BatchNormBackward": lambda h: F.batch_norm(h, None, None, w, b, True),
    }
    for node, block in cases.items():
        torch.manual_seed(0)
        with lossless_codec(), compress_saved_tensors(FINE):
            y = block(h_leaf * 1.0)
        names = set()
        todo = [y.grad_fn]
        while todo:
            n = todo.pop()
            if n is not None:
                names.add(type(n).__name__)
                todo.extend(f for f, _ in n.next_functions)
        assert node in names, (node, names)
        got = torch.autograd.grad(y.sum(), h_leaf)[0]
        if node == "_DropoutBackward":  # the mask is blockquant's: the gradient is the scaled mask
            assert torch.equal(got, (y != 0).float() / 0.7)
            continue
        ref = torch.autograd.grad(block(h_leaf * 1.0).sum(), h_leaf)[0]
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), node
    out = torch.empty(64, 48)
    with compress_saved_tensors(FINE):
        torch.tanh(h_leaf.detach(), out=out)  # out=: torch's
        z = F.elu(h_leaf * 1.0, inplace=True)  # in place: torch's node
    assert torch.equal(out, torch.tanh(h_leaf.detach()))
    assert type(z.grad_fn).__name__ != "_SmoothBackward"
    assert BF.sigmoid(h_leaf).grad_fn is not None


class _SoftmaxNet(nn.Module):
    """A converted forward whose functional calls save their own outputs (log_softmax, sigmoid's exact path)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 32)

    def forward(self, x):
        h = torch.nn.functional.log_softmax(self.lin(x), dim=-1)
        return torch.softmax(h * 2.0, dim=-1).sum()


@pytest.mark.parametrize("how", ["dropped", "raised"])
def test_a_forward_without_backward_frees_what_it_saved(how):
    """An op that saves its own output kept exact by the rules: the graph must not hold it through a
    reference to itself (a cycle through autograd's C++ nodes that Python's collector cannot free), so a
    training forward whose output is dropped without backward, or that raises midway, frees everything."""
    from blockquant.bench.runner import profiler_net_bytes

    torch.manual_seed(0)
    model = blockquant.convert(_SoftmaxNet(), "int4").train()
    x = torch.randn(64, 16)
    model(x).backward()  # warm-up: nothing cached below is created in the measured call

    class Boom(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.softmax:
                raise RuntimeError("boom")
            return func(*args, **(kwargs or {}))

    def forward():
        if how == "dropped":
            out = model(x)
            del out
        else:
            with pytest.raises(RuntimeError, match="boom"), Boom():
                model(x)

    _, net = profiler_net_bytes(forward)
    assert net == 0, f"{net} bytes still held after a training forward without backward ({how})"
