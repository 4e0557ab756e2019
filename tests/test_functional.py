"""blockquant.functional and blockquant.adjacency: exact forwards, gradient quality,
what is saved (and how many bytes), sharing, empty inputs, adjacency forms, errors."""
import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

import blockquant
import blockquant.functional as BF
from blockquant import Adjacency, QuantConfig, as_adjacency
from blockquant.kernels.bitmask import BitMask, pack_bits, unpack_bits
from tolerances import rel_err

# 8 bits with nearest rounding: deterministic and close to exact (gradcheck-style comparisons)
FINE = QuantConfig(bits=8, block_size=64, rounding="nearest", meta_dtype=torch.float32)


pytestmark = pytest.mark.usefixtures("torch_backend")  # tests marked default_backend keep the default


def _grad(outputs, inputs, grad_outputs, retain_graph=True):
    # several outputs share one input graph in these tests: keep it for the next call
    return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph)


def _activation(shape=(37, 13), dtype=torch.float32, seed=0):
    """A non-leaf input (has a grad_fn), so the ops compress it, and its leaf."""
    g = torch.Generator().manual_seed(seed)
    leaf = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    return leaf, leaf * 1.0


def _graph(num_nodes=37, num_edges=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    # sorted by target then source: the CSR order, so every form scatters in the same order
    order = torch.argsort(ei[1] * num_nodes + ei[0])
    return ei[:, order]


# ------------------------------------------------------------------ op table
def _bn_pair(training):
    def mk():
        return torch.zeros(13), torch.ones(13)

    w = torch.rand(13, requires_grad=True)
    b = torch.rand(13, requires_grad=True)
    ours_stats, ref_stats = mk(), mk()
    ours = lambda x, c: BF.batch_norm(x, *ours_stats, w, b, training, 0.1, 1e-5, c)  # noqa: E731
    ref = lambda x: F.batch_norm(x, *ref_stats, w, b, training, 0.1, 1e-5)  # noqa: E731
    return ours, ref, (w, b), (ours_stats, ref_stats)


def _ops():
    torch.manual_seed(1)
    W = torch.randn(5, 13, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    lw = torch.rand(13, requires_grad=True)
    lb = torch.rand(13, requires_grad=True)
    ei = _graph()
    ew = torch.rand(ei.size(1), requires_grad=True)
    ops = {
        "linear": (lambda x, c: BF.linear(x, W, bias, c), lambda x: F.linear(x, W, bias), (W, bias)),
        "linear_rp": (lambda x, c: BF.linear(x, W, bias, c.replace(rp_ratio=2)), lambda x: F.linear(x, W, bias),
                      (bias,)),
        "relu": (lambda x, c: BF.relu(x), torch.relu, ()),
        "leaky_relu": (lambda x, c: BF.leaky_relu(x, 0.2), lambda x: F.leaky_relu(x, 0.2), ()),
        "elu": (lambda x, c: BF.elu(x, 0.7, c), lambda x: F.elu(x, 0.7), ()),
        "gelu": (lambda x, c: BF.gelu(x, "none", c), lambda x: F.gelu(x), ()),
        "gelu_tanh": (lambda x, c: BF.gelu(x, "tanh", c), lambda x: F.gelu(x, approximate="tanh"), ()),
        "layer_norm": (lambda x, c: BF.layer_norm(x, (13,), lw, lb, 1e-5, c),
                       lambda x: F.layer_norm(x, (13,), lw, lb, 1e-5), (lw, lb)),
    }
    for training in (True, False):
        ours, ref, params, _ = _bn_pair(training)
        ops[f"batch_norm_{'train' if training else 'eval'}"] = (ours, ref, params)
    for reduce in ("sum", "mean", "max"):
        ops[f"aggregate_{reduce}"] = (lambda x, c, r=reduce: BF.aggregate(x, ei, r, c),
                                      lambda x, r=reduce: _pyg_scatter(x, ei, None, r), ())
        ops[f"aggregate_{reduce}_weighted"] = (
            lambda x, c, r=reduce: BF.aggregate(x, as_adjacency(ei, 37, ew), r, c),
            lambda x, r=reduce: _pyg_scatter(x, ei, ew, r), (ew,))
    # aggregation then a linear map; 13 -> 5 narrows before aggregating, 13 -> 20 after
    wide = torch.randn(20, 13, requires_grad=True)
    cw = torch.rand(ei.size(1))  # constant edge weights
    for reduce in ("sum", "mean"):
        ops[f"aggregate_linear_{reduce}"] = (
            lambda x, c, r=reduce: BF.aggregate_linear(x, ei, W, bias, r, c),
            lambda x, r=reduce: F.linear(_pyg_scatter(x, ei, None, r), W, bias), (W, bias))
        ops[f"aggregate_linear_{reduce}_wide_weighted"] = (
            lambda x, c, r=reduce: BF.aggregate_linear(x, as_adjacency(ei, 37, cw), wide, None, r, c),
            lambda x, r=reduce: F.linear(_pyg_scatter(x, ei, cw, r), wide), (wide,))
    return ops


def _pyg_scatter(x, ei, ew, reduce):
    from torch_geometric.utils import scatter

    msg = x[ei[0]] if ew is None else x[ei[0]] * ew.view(-1, 1)
    return scatter(msg, ei[1], 0, x.size(0), reduce=reduce)


OP_NAMES = sorted(_ops())


def _same_as_reference(name):
    """Bit-identical, except sum/mean aggregation: a sparse-dense product sums in another order
    than PyG's scatter (and fuses the weight multiply), so equal up to float32 rounding."""
    if name.startswith("aggregate") and "max" not in name:
        return lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    return torch.equal


@pytest.mark.parametrize("name", OP_NAMES)
def test_forward_bit_identical_and_gradients_close(name):
    ours, ref, params = _ops()[name]
    leaf, x = _activation()
    y, y_ref = ours(x, FINE), ref(x)
    assert _same_as_reference(name)(y, y_ref), f"{name}: forward differs from the torch op"
    g = torch.randn_like(y_ref)
    inputs = (leaf, *params)
    got = _grad(y, inputs, g)
    want = _grad(y_ref, inputs, g)
    # linear_rp projects 13 -> 7 columns: only its exact gradients (input, bias) are compared here
    for t, a, b in zip(("x",) + tuple(f"p{i}" for i in range(len(params))), got, want):
        assert rel_err(a, b) < 2e-2, f"{name}: gradient of {t} off by {rel_err(a, b):.3g} at 8 bits"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_other_dtypes_forward_exact_backward_close(dtype):
    leaf, x = _activation(dtype=dtype)
    W = torch.randn(5, 13, dtype=dtype, requires_grad=True)
    for ours, ref in [(lambda z: BF.linear(z, W, None, FINE), lambda z: F.linear(z, W)),
                      (lambda z: BF.gelu(z, "none", FINE), F.gelu),
                      (BF.relu, torch.relu)]:
        y, y_ref = ours(x), ref(x)
        assert y.dtype == dtype and torch.equal(y, y_ref)
        g = torch.randn_like(y_ref)
        for a, b in zip(_grad(y, (leaf,), g), _grad(y_ref, (leaf,), g)):
            assert a.dtype == dtype and rel_err(a.float(), b.float()) < 3e-2


def test_non_contiguous_and_3d_inputs():
    base = torch.randn(13, 6, 37, requires_grad=True)
    x = (base * 1.0).permute(2, 1, 0)  # [37, 6, 13], non-contiguous
    W = torch.randn(5, 13, requires_grad=True)
    y = BF.linear(x, W, None, FINE)
    y_ref = F.linear(x, W)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    got = _grad(y, (base, W), g)
    want = _grad(y_ref, (base, W), g)
    assert all(rel_err(a, b) < 1e-2 for a, b in zip(got, want))
    # layer norm over two trailing dims
    lw = torch.rand(6, 13, requires_grad=True)
    y = BF.layer_norm(x, (6, 13), lw, None, 1e-5, FINE)
    assert torch.equal(y, F.layer_norm(x, (6, 13), lw, None, 1e-5))


# ------------------------------------------------------------ unbiasedness
def _trials(fn, k):
    return torch.stack([fn(i) for i in range(k)])


def _assert_unbiased(samples, exact, label):
    """The mean of K independent unbiased estimates misses the truth by
    ||mean - exact||^2 ~ sum(var) / K on average; allow 4x that (the sum runs over
    many elements, so it concentrates) and demand real spread (var > 0)."""
    k = samples.shape[0]
    mean = samples.mean(0)
    var_sum = samples.var(0).sum().item()
    err2 = (mean - exact).pow(2).sum().item()
    assert var_sum > 0, f"{label}: no randomness across seeds"
    assert err2 < 4 * var_sum / k, f"{label}: squared bias {err2:.3g} vs noise budget {4 * var_sum / k:.3g}"
    return err2, var_sum / k


@pytest.mark.parametrize("rp_ratio", [1, 4], ids=["plain", "rp4"])
def test_linear_weight_gradient_unbiased(rp_ratio):
    torch.manual_seed(0)
    base = torch.randn(64, 24, requires_grad=True)
    W = torch.randn(6, 24, requires_grad=True)
    g = torch.randn(64, 6)
    exact = g.t() @ base.detach()
    cfg = QuantConfig(bits=2, block_size=32, rp_ratio=rp_ratio)

    def one(i):
        act = base + 0.0  # a fresh non-resident tensor each trial (the same one would share its codes)
        y = BF.linear(act, W, None, cfg)
        return _grad(y, W, g)[0]

    _assert_unbiased(_trials(one, 300), exact, f"linear rp={rp_ratio}")


def test_unbiasedness_check_detects_bias():
    """The budget above is tight enough to catch a biased estimator: nearest rounding
    at 2 bits misses by far more than the stochastic runs' noise budget."""
    torch.manual_seed(0)
    base = torch.randn(64, 24, requires_grad=True)
    W = torch.randn(6, 24, requires_grad=True)
    g = torch.randn(64, 6)
    exact = g.t() @ base.detach()

    def run(cfg, k):
        return _trials(lambda i: _grad(BF.linear(base + 0.0, W, None, cfg), W, g)[0], k)

    stochastic = run(QuantConfig(bits=2, block_size=32), 100)
    _, budget = _assert_unbiased(stochastic, exact, "stochastic")
    nearest = run(QuantConfig(bits=2, block_size=32, rounding="nearest"), 2)
    assert torch.equal(nearest[0], nearest[1])
    assert (nearest[0] - exact).pow(2).sum().item() > 4 * budget


def test_edge_weight_gradient_unbiased():
    torch.manual_seed(0)
    ei = _graph(30, 120)
    base = torch.randn(30, 16, requires_grad=True)
    ew = torch.rand(120, requires_grad=True)
    g = torch.randn(30, 16)
    exact = _grad(_pyg_scatter(base, ei, ew, "mean"), ew, g)[0]
    cfg = QuantConfig(bits=2, block_size=16)

    def one(i):
        y = BF.aggregate(base + 0.0, as_adjacency(ei, 30, ew), "mean", cfg)
        return _grad(y, ew, g)[0]

    _assert_unbiased(_trials(one, 100), exact, "edge weights")


# Relative error of grad_W = g^T x_hat for standard-normal activations in blocks of 64
# (range ~4.9 sigma), stochastic rounding. Within one level interval of width s the
# rounding variance averages s^2 / 6, so the error is ~ 4.9 / ((2^b - 1) sqrt(6)):
# 0.67 (2 bits), 0.13 (4), 0.0079 (8); at 1 bit E[(x - lo)(hi - x)] = 2.45^2 - 1, i.e. 2.2.
# Measured (5 draws): 2.04-2.14, 0.63-0.64, 0.12-0.13, 0.0072-0.0075. Bounds: theory + 25%.
GRAD_ERROR_BOUND = {1: 2.75, 2: 0.84, 4: 0.165, 8: 0.0099}


def test_gradient_error_shrinks_with_bits(record_property):
    torch.manual_seed(0)
    act = torch.randn(512, 64, requires_grad=True) + 0.0
    W = torch.randn(32, 64, requires_grad=True)
    g = torch.randn(512, 32)
    exact = g.t() @ act.detach()
    errors = {}
    for bits in (1, 2, 4, 8):
        cfg = QuantConfig(bits=bits, block_size=64, meta_dtype=torch.float32)
        torch.manual_seed(bits)
        got = _grad(BF.linear(act, W, None, cfg), W, g)[0]
        errors[bits] = rel_err(got, exact)
        record_property(f"grad_rel_error_int{bits}", round(errors[bits], 5))
        assert errors[bits] < GRAD_ERROR_BOUND[bits], f"int{bits}: relative error {errors[bits]:.4f}"
    assert errors[1] > errors[2] > errors[4] > errors[8]
    # each extra pair of bits cuts the step ~4x (2^b - 1 levels)
    assert errors[4] < errors[2] / 3 and errors[8] < errors[4] / 8


# ------------------------------------------------------------ what is saved
def test_relu_saves_a_one_bit_mask():
    _, x = _activation((37, 13))  # 481 elements: not a multiple of 8
    for y in (BF.relu(x), BF.leaky_relu(x, 0.1)):
        node = y.grad_fn
        (mask,) = node.bq_state
        assert isinstance(mask, BitMask)
        assert mask.nbytes == math.ceil(481 / 8) == 61
        assert len(node.saved_tensors) == 0
        assert torch.equal(mask.unpack(), x > 0)


def test_dropout_saves_zero_tensor_bytes():
    _, x = _activation((200, 50))
    y = BF.dropout(x, 0.4)
    node = y.grad_fn
    assert node.bq_state == () and len(node.saved_tensors) == 0
    # the seed: a 0-d int64 CPU tensor (a tensor so that torch.compile draws it inside its graph)
    seed = node.bq_seed
    assert seed.dtype == torch.int64 and seed.dim() == 0 and seed.device.type == "cpu"
    # same probability and scaling as torch
    kept = y != 0
    frac = kept.float().mean().item()
    assert abs(frac - 0.6) < 4 * math.sqrt(0.6 * 0.4 / y.numel())
    assert torch.allclose(y[kept], x[kept] / 0.6)
    # backward regenerates exactly the forward mask
    (gx,) = _grad(y, x, torch.ones_like(y))
    assert torch.equal(gx, kept.float() / 0.6)


def test_dropout_edge_probabilities_and_eval():
    _, x = _activation()
    assert torch.equal(BF.dropout(x, 0.0), x)
    assert torch.count_nonzero(BF.dropout(x, 1.0)) == 0
    assert BF.dropout(x, 0.5, training=False) is x
    torch.manual_seed(3)
    a = BF.dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, BF.dropout(x, 0.5)), "torch.manual_seed must reproduce the mask"


def test_linear_saves_packed_input_of_expected_size():
    _, x = _activation((100, 40))
    W = torch.randn(8, 40, requires_grad=True)
    cfg = QuantConfig(bits=2, block_size=256)
    y = BF.linear(x, W, None, cfg)
    (packed,) = y.grad_fn.bq_state
    assert isinstance(packed, blockquant.PackedTensor)
    assert packed.nbytes == blockquant.quantize(x.detach(), cfg).nbytes
    # 4000 elements, 2 bits, 16 blocks of bf16 (lo, step): 1000 + 64 bytes
    assert packed.nbytes == 1000 + 16 * 2 * 2
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].data_ptr() == W.data_ptr()  # the weight, for grad_x


def test_linear_with_projection_stores_projected_columns():
    _, x = _activation((100, 64))
    W = torch.randn(8, 64, requires_grad=True)
    y = BF.linear(x, W, None, QuantConfig(bits=2, block_size=ROW_BLOCK, rp_ratio=8))
    (packed,) = y.grad_fn.bq_state
    assert packed.proj_dims == (64, 8) and packed.stored_shape == (100, 8)


ROW_BLOCK = blockquant.ROW


def test_saves_only_what_requested_gradients_need():
    _, x = _activation((30, 13))
    W = torch.randn(5, 13)  # frozen weight: no grad_W, so x is not needed at all
    y = BF.linear(x, W, None, FINE)
    assert y.grad_fn.bq_state == ()
    assert len(y.grad_fn.saved_tensors) == 1  # only W (for grad_x)
    # input does not need grad but the weight does: W is not saved, and the input
    # (a fresh intermediate without grad_fn, not resident) is kept compressed
    W2 = torch.randn(5, 13, requires_grad=True)
    y = BF.linear(x.detach() * 1.0, W2, None, FINE)
    assert len(y.grad_fn.saved_tensors) == 0 and len(y.grad_fn.bq_state) == 1
    # constant adjacency: the aggregation keeps nothing of x
    y = BF.aggregate(x, _graph(30, 90), "mean", FINE)
    assert y.grad_fn.bq_state == () and len(y.grad_fn.saved_tensors) == 0
    # max keeps int32 winners, one per output element
    y = BF.aggregate(x, _graph(30, 90), "max", FINE)
    (winner,) = y.grad_fn.bq_state
    assert winner.dtype == torch.int32 and winner.shape == (30, 13)
    # batch norm with frozen affine parameters and eval statistics: only the running stats
    y = BF.batch_norm(x, torch.zeros(13), torch.ones(13), torch.ones(13), None, False, 0.1, 1e-5, FINE)
    assert y.grad_fn.bq_state == ()


def test_resident_input_saved_by_reference_not_compressed():
    data_x = torch.randn(50, 20)  # like data.x: held by the caller, declared resident
    BF.mark_resident(data_x)
    W = torch.randn(4, 20, requires_grad=True)
    y = BF.linear(data_x, W, None, FINE)
    assert y.grad_fn.bq_state == ()
    (saved,) = y.grad_fn.saved_tensors
    assert saved.data_ptr() == data_x.data_ptr()
    (gw,) = _grad(y, W, torch.ones_like(y))
    assert torch.allclose(gw, torch.ones(50, 4).t() @ data_x, rtol=1e-5, atol=1e-5)
    # a leaf that requires grad is resident too; so is a view of a resident tensor
    leaf = torch.randn(50, 20, requires_grad=True)
    assert BF.is_resident(leaf) and BF.is_resident(data_x[:, :10]) and not BF.is_resident(leaf * 2)
    # a non-grad intermediate (dropout of the features, an aggregation) is NOT resident
    assert not BF.is_resident(torch.nn.functional.dropout(data_x, 0.5)) and not BF.is_resident(torch.randn(3))
    y = BF.gelu(leaf, "none", FINE)
    assert y.grad_fn.bq_state == () and y.grad_fn.saved_tensors[0].data_ptr() == leaf.data_ptr()


def test_shared_input_compressed_once():
    _, x = _activation((40, 16))
    W1 = torch.randn(8, 16, requires_grad=True)
    W2 = torch.randn(8, 16, requires_grad=True)
    ew = torch.rand(100, requires_grad=True)
    cfg = QuantConfig(bits=2, block_size=64)
    y1 = BF.linear(x, W1, None, cfg)
    y2 = BF.linear(x, W2, None, cfg)
    y3 = BF.aggregate(x, as_adjacency(_graph(40, 100), 40, ew), "sum", cfg)
    p1, p2, p3 = y1.grad_fn.bq_state[0], y2.grad_fn.bq_state[0], y3.grad_fn.bq_state[0]
    assert p1 is p2 is p3
    # a different config, or the same tensor after an in-place change, gets its own copy
    y4 = BF.linear(x, W1, None, cfg.replace(bits=4))
    assert y4.grad_fn.bq_state[0] is not p1
    with torch.no_grad():
        x.mul_(2)
    y5 = BF.linear(x, W1, None, cfg)
    assert y5.grad_fn.bq_state[0] is not p1


def test_long_lived_input_gets_fresh_rounding_every_step():
    """A tensor that outlives the step (not resident, no grad_fn) must not reuse one
    compressed copy: the same rounding noise every step would never average out."""
    x = torch.randn(300, 32)  # e.g. features the caller did not declare resident
    W = torch.nn.Parameter(torch.randn(8, 32))
    cfg = QuantConfig(bits=2, block_size=64)
    grads = []
    for _ in range(2):
        BF.linear(x, W, None, cfg).sum().backward()
        grads.append(W.grad.clone())
        W.grad = None
    assert not torch.equal(grads[0], grads[1])
    # not shared within a step either: two uses compress it twice, each rounded afresh
    y1, y2 = BF.linear(x, W, None, cfg), BF.linear(x, W, None, cfg)
    assert not BF.is_resident(x)
    assert y1.grad_fn.bq_state[0] is not y2.grad_fn.bq_state[0]


def test_sharing_cache_does_not_outlive_the_tensor():
    _, x = _activation((40, 16))
    W = torch.randn(8, 16, requires_grad=True)
    y = BF.linear(x, W, None, FINE)
    packed = y.grad_fn.bq_state[0]
    assert BF.linear(x, W, None, FINE).grad_fn.bq_state[0] is packed  # shared while x lives
    alive = weakref.ref(packed.payload)  # its codes
    del x, y, packed
    gc.collect()
    assert alive() is None, "the compressed copy outlived its tensor and graph"


@pytest.mark.parametrize("name", OP_NAMES)
def test_no_grad_runs_the_plain_op_and_saves_nothing(name):
    ours, ref, _ = _ops()[name]
    _, x = _activation()
    same = _same_as_reference(name)
    with torch.no_grad():
        y = ours(x, FINE)
        assert y.grad_fn is None and same(y, ref(x))
    with blockquant.track_saved() as mem:
        y = ours(x.detach(), FINE)  # nothing requires grad
    assert same(y, ref(x.detach()))
    if y.grad_fn is None:  # (a weighted op still has a graph: its weights require grad)
        assert mem.total_bytes == 0


def test_batch_norm_running_stats_match_torch():
    for momentum in (0.1, 0.0):
        ours_stats, ref_stats = (torch.zeros(13), torch.ones(13)), (torch.zeros(13), torch.ones(13))
        for step in range(3):
            _, x = _activation(seed=step)
            BF.batch_norm(x, *ours_stats, None, None, True, momentum, 1e-3, FINE)
            F.batch_norm(x, *ref_stats, None, None, True, momentum, 1e-3)
        assert torch.equal(ours_stats[0], ref_stats[0]) and torch.equal(ours_stats[1], ref_stats[1])
    # no running statistics: batch statistics in both modes of use
    leaf, x = _activation()
    y = BF.batch_norm(x, None, None, None, None, True, 0.1, 1e-5, FINE)
    assert torch.equal(y, F.batch_norm(x, None, None, training=True))


# Not here: batch norm in training mode (torch itself needs more than one value per
# channel) and weighted aggregation (its fixture weights belong to a graph with edges;
# test_aggregate_empty_graph_and_isolated_targets covers empty weighted graphs).
EMPTY_OK = [n for n in OP_NAMES if not n.startswith("batch_norm_train") and "weighted" not in n]


@pytest.mark.parametrize("name", EMPTY_OK)
def test_empty_inputs(name):
    ours, ref, params = _ops()[name]
    leaf = torch.randn(0, 13, requires_grad=True)
    x = leaf * 1.0
    if name.startswith("aggregate_linear"):
        y = BF.aggregate_linear(x, torch.empty(2, 0, dtype=torch.long), params[0], None, name.split("_")[2], FINE)
        assert y.shape == (0, params[0].shape[0])
    elif name.startswith("aggregate"):
        y = BF.aggregate(x, torch.empty(2, 0, dtype=torch.long), name.split("_")[1], FINE)
        assert y.shape == (0, 13)
    else:
        y = ours(x, FINE)
        assert y.shape == ref(x).shape
    y.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == (0, 13)


def test_aggregate_empty_graph_and_isolated_targets():
    leaf, x = _activation((5, 3))
    ew = torch.ones(0, requires_grad=True)
    for reduce in ("sum", "mean", "max"):
        y = BF.aggregate(x, as_adjacency(torch.empty(2, 0, dtype=torch.long), 5, ew), reduce, FINE)
        assert torch.equal(y, torch.zeros(5, 3))
        gx, gw = _grad(y, (leaf, ew), torch.ones_like(y))
        assert torch.equal(gx, torch.zeros(5, 3)) and gw.shape == (0,)
    # bipartite: 5 sources -> 2 targets; target 1 has no edges and gets zeros
    ei = torch.tensor([[0, 3, 4], [0, 0, 0]])
    y = BF.aggregate(x, as_adjacency(ei, (5, 2)), "max", FINE)
    assert y.shape == (2, 3) and torch.equal(y[1], torch.zeros(3))
    assert torch.equal(y[0], x[[0, 3, 4]].amax(0))


def test_max_aggregation_gradient_goes_to_the_winner():
    x = torch.tensor([[1.0, 5.0], [3.0, 2.0], [0.0, 0.0]], requires_grad=True)
    h = x * 1.0
    ei = torch.tensor([[0, 1], [2, 2]])
    y = BF.aggregate(h, ei, "max", FINE)
    assert torch.equal(y[2], torch.tensor([3.0, 5.0]))
    (gx,) = _grad(y, x, torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 20.0]]))
    assert torch.equal(gx, torch.tensor([[0.0, 20.0], [10.0, 0.0], [0.0, 0.0]]))


# ------------------------------------------------------------ default backend
@pytest.mark.default_backend
def test_linear_and_batch_norm_through_the_default_backend():
    leaf, x = _activation((40, 13))
    W = torch.randn(5, 13, requires_grad=True)
    y = BF.linear(x, W, None, FINE)
    assert torch.equal(y, F.linear(x, W))
    (gw,) = _grad(y, W, torch.ones_like(y))
    assert rel_err(gw, torch.ones(40, 5).t() @ x.detach()) < 1e-2
    rm, rv = torch.zeros(13), torch.ones(13)
    y = BF.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5, FINE)
    g = torch.randn_like(y)
    ref = F.batch_norm(x, torch.zeros(13), torch.ones(13), None, None, True, 0.1, 1e-5)
    assert rel_err(_grad(y, leaf, g)[0], _grad(ref, leaf, g)[0]) < 2e-2


# ------------------------------------------------------------ bit masks
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_bitmask_round_trip(n):
    m = torch.rand(n) > 0.5
    p = pack_bits(m)
    assert p.dtype == torch.uint8 and p.numel() == -(-n // 8)
    assert torch.equal(unpack_bits(p, n), m)
    bm = BitMask.pack(m.view(n, 1))
    assert bm.unpack().shape == (n, 1) and bm.nbytes == -(-n // 8)
    with pytest.raises(TypeError, match="torch.bool"):
        pack_bits(m.float())


# ------------------------------------------------------------ adjacency forms
def _forms(ei, n, w):
    from torch_geometric import EdgeIndex

    coo = torch.sparse_coo_tensor(torch.stack([ei[1], ei[0]]), w, (n, n))  # adj_t: rows are targets
    forms = {
        "edge_index": as_adjacency(ei, n, edge_weight=w),
        "Adjacency": as_adjacency(Adjacency(ei[0], ei[1], n, n), edge_weight=w),
        "EdgeIndex": as_adjacency(EdgeIndex(ei, sparse_size=(n, n)), edge_weight=w),
        "coo": as_adjacency(coo),
        "csr": as_adjacency(coo.to_sparse_csr()),
        "csc": as_adjacency(coo.to_sparse_csc()),
    }
    return forms


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_every_adjacency_form_gives_identical_results(reduce):
    n = 37
    ei = torch.unique(_graph(n, 200), dim=1)  # coalesced: no duplicate edges
    ei = ei[:, torch.argsort(ei[1] * n + ei[0])]
    w = torch.rand(ei.size(1))
    leaf, x = _activation((n, 13))
    outs, grads = {}, {}
    for name, adj in _forms(ei, n, w).items():
        y = BF.aggregate(x, adj, reduce, FINE)
        outs[name] = y
        grads[name] = _grad(y, leaf, torch.ones_like(y))[0]
    ref = _pyg_scatter(x, ei, w, reduce)
    same = _same_as_reference(f"aggregate_{reduce}")
    for name in outs:
        assert same(outs[name], ref), f"{name} differs"
        assert same(grads[name], grads["edge_index"]), f"{name} gradient differs"
    # sparse matrix product convention: out = adj_t @ x
    coo = torch.sparse_coo_tensor(torch.stack([ei[1], ei[0]]), w, (n, n))
    if reduce == "sum":
        assert torch.allclose(outs["csr"], torch.sparse.mm(coo, x.detach()), atol=1e-5)


def test_unsorted_edge_index_matches_up_to_rounding():
    ei = _graph(37, 200)
    perm = torch.randperm(ei.size(1), generator=torch.Generator().manual_seed(5))
    _, x = _activation()
    a = BF.aggregate(x, ei, "sum", FINE)
    b = BF.aggregate(x, ei[:, perm], "sum", FINE)
    assert torch.allclose(a, b, atol=1e-5)


def test_learnable_weights_inside_a_sparse_matrix():
    n = 37
    ei = torch.unique(_graph(n, 150), dim=1)
    w = torch.rand(ei.size(1), requires_grad=True)
    _, x = _activation((n, 13))
    adj = torch.sparse_coo_tensor(torch.stack([ei[1], ei[0]]), w, (n, n))
    y = BF.aggregate(x, adj, "sum", FINE)
    (gw,) = _grad(y, w, torch.ones_like(y))
    ref = _grad(_pyg_scatter(x, ei, w, "sum"), w, torch.ones_like(y))[0]
    assert rel_err(gw, ref) < 1e-2


def test_torch_sparse_sparse_tensor():
    torch_sparse = pytest.importorskip("torch_sparse", reason="torch_sparse is not installed here")
    ei = _graph(37, 150)
    adj_t = torch_sparse.SparseTensor(row=ei[1], col=ei[0], sparse_sizes=(37, 37))
    _, x = _activation()
    assert torch.allclose(BF.aggregate(x, adj_t, "sum", FINE), BF.aggregate(x, ei, "sum", FINE))


def test_num_nodes_inference_and_bipartite_sizes():
    ei = torch.tensor([[0, 1, 2], [1, 2, 4]])
    adj = as_adjacency(ei)
    assert (adj.num_src, adj.num_dst, adj.num_edges) == (5, 5, 3)
    adj = as_adjacency(ei, (3, 6))
    assert (adj.num_src, adj.num_dst) == (3, 6)
    assert torch.equal(adj.in_degree(), torch.tensor([0.0, 1, 1, 0, 1, 0]))
    assert as_adjacency(ei.int()).src.dtype == torch.int64


@pytest.mark.parametrize("bad, error, match", [
    ([[0, 1], [1, 0]], TypeError, "expected an edge_index"),
    (torch.rand(4, 4), TypeError, "dense adjacency"),
    (torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 2.0]]), TypeError, "int64"),
    (torch.zeros(3, 4, dtype=torch.long), ValueError, r"\[2, E\]"),
    (torch.tensor([[0, 9], [1, 0]]), ValueError, "outside"),
])
def test_adjacency_errors(bad, error, match):
    with pytest.raises(error, match=match):
        as_adjacency(bad, 5)


def test_edge_weight_errors():
    ei = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        as_adjacency(ei, 2, edge_weight=torch.ones(3))
    with pytest.raises(TypeError, match="floating"):
        as_adjacency(ei, 2, edge_weight=torch.ones(2, dtype=torch.long))


# ------------------------------------------------------------ input errors
def test_clear_errors():
    _, x = _activation()
    W = torch.randn(5, 13, requires_grad=True)
    with pytest.raises(ValueError, match=r"in_features.*\(37, 13\).*\(5, 12\)"):
        BF.linear(x, W[:, :12], None, FINE)
    with pytest.raises(TypeError, match="floating-point x; got torch.int64"):
        BF.linear(torch.ones(3, 13, dtype=torch.long), W, None, FINE)
    with pytest.raises(TypeError, match=r"QuantConfig, a preset name \(.*\) or None; got dict"):
        BF.linear(x, W, None, {"bits": 2})
    with pytest.raises(ValueError, match="reduce must be one of"):
        BF.aggregate(x, _graph(), "min")
    with pytest.raises(ValueError, match="37 source nodes but x has 10 rows"):
        BF.aggregate(x[:10], as_adjacency(_graph(), 37))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BF.dropout(x, 1.5)
    with pytest.raises(ValueError, match="normalized_shape"):
        BF.layer_norm(x, (12,))
    with pytest.raises(ValueError, match="approximate"):
        BF.gelu(x, "fast")
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        BF.batch_norm(x[0], None, None, training=True)
    with pytest.raises(ValueError, match="non-finite"):
        BF.linear(x * float("inf"), W, None, FINE)
