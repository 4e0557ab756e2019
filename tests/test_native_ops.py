"""The compiled CPU elementwise ops (``blockquant.kernels.native_ops``): the same results as PyTorch's ops,
masks regenerated identically whatever the thread split, and the ops picked only where the codec is native."""
import math

import pytest
import torch

from blockquant import functional as BF
from blockquant.kernels import native, native_ops
from blockquant.kernels.bitmask import BitMask

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"compiled CPU codec unavailable: {native.unavailable_reason()}")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def native_backend(monkeypatch):
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "native")


def _x(shape, dtype=torch.float32, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x[::5, 0] = 0.0  # zeros sit on the mask's edge
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slope", [None, 0.2], ids=["relu", "leaky"])
def test_activation_and_gradient_equal_torch(native_backend, dtype, slope):
    leaf = _x((1003, 7), dtype).requires_grad_()  # 7021 elements: the mask's last byte is partial
    h = leaf * 1
    assert native_ops.enabled(h)
    out = BF.relu(h) if slope is None else BF.leaky_relu(h, slope)
    ref = torch.relu(h) if slope is None else torch.nn.functional.leaky_relu(h, slope)
    assert torch.equal(out, ref)
    mask = out.grad_fn.bq_state[0]
    assert torch.equal(mask.unpack(), h > 0) and mask.nbytes == math.ceil(h.numel() / 8)
    go = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, leaf, go, retain_graph=True)
    (want,) = torch.autograd.grad(ref, leaf, go)
    assert torch.equal(got, want)


def test_mask_and_gradient_do_not_depend_on_the_thread_split(native_backend):
    x = _x((3000, 500))  # 1.5M elements: several threads' ranges
    one = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, bits1 = native_ops.relu_pack(x, None)
        drop1 = native_ops.dropout(x, 0.3, 77)
        torch.set_num_threads(3)
        assert len(native_ops._element_ranges(x.numel(), 8)) == 3
        out3, bits3 = native_ops.relu_pack(x, None)
        drop3 = native_ops.dropout(x, 0.3, 77)
        g3 = native_ops.mask_grad(x, bits3, 0.1)
    finally:
        torch.set_num_threads(one)
    assert torch.equal(out1, out3) and torch.equal(bits1, bits3) and torch.equal(drop1, drop3)
    assert torch.equal(g3, torch.where(x > 0, x, x * 0.1))
    assert torch.equal(BitMask(bits1, x.shape).unpack(), x > 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_keeps_one_minus_p_and_backward_regenerates_the_mask(native_backend, dtype):
    leaf = _x((400, 301), dtype).requires_grad_()  # 120,400 elements: not a multiple of the noise chunk
    h = leaf * 1
    p = 0.4
    y = BF.dropout(h, p)
    kept = y != 0
    frac = kept[h != 0].float().mean().item()
    assert abs(frac - (1 - p)) < 4 * math.sqrt(p * (1 - p) / h.numel())
    scale = torch.ones((), dtype=dtype) / (1 - p)
    assert torch.equal(y[kept], h[kept] * scale)
    (g,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
    assert torch.equal(g, torch.where(native_ops.dropout(None, p, y.grad_fn.bq_seed, like=h) != 0, scale,
                                      torch.zeros((), dtype=dtype)))
    # the noise tensor (attention dropout) is the same mask
    noise = native_ops.dropout(None, p, y.grad_fn.bq_seed, like=h)
    assert torch.equal(y, h * noise)
    # masks of neighbouring seeds and chunks are not correlated
    other = native_ops.dropout(None, p, int(y.grad_fn.bq_seed) + 1, like=h) != 0
    agree = (other == (noise != 0)).float().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01


def test_dropout_reproducible_from_the_torch_seed_and_edge_probabilities(native_backend):
    x = _x((300, 40))
    torch.manual_seed(5)
    a = BF.dropout(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(a, BF.dropout(x, 0.5))
    assert torch.equal(BF.dropout(x.requires_grad_(), 0.0), x)
    assert torch.count_nonzero(BF.dropout(x, 1.0)) == 0


def test_compiled_ops_only_where_the_codec_is_native(monkeypatch):
    x = _x((10, 10))
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "torch")
    assert not native_ops.enabled(x)
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "native")
    assert native_ops.enabled(x) and not native_ops.enabled(x.double())


@pytest.mark.parametrize("config", ["iexact", "default"])
@pytest.mark.parametrize("rows", [3000, 9000], ids=["one-block", "row-chunks"])  # 9000 x 128 > CHUNK_ELEMENTS
def test_batch_norm_fused_with_the_codec_equals_the_unfused_path(native_backend, monkeypatch, config, rows):
    """Batch norm encodes xn straight from x and differentiates from the codes block by block: the same
    codes (same seeds, same values) as normalising then quantizing, gradients equal to float round-off,
    and no decoded [N, C] xn in backward."""
    from blockquant.functional import normalization as norm
    from blockquant.packed import PackedTensor

    def run(fused):
        torch.manual_seed(0)
        c = 128
        weight, bias = torch.randn(c, requires_grad=True), torch.randn(c, requires_grad=True)
        leaf = (torch.randn(rows, c) * 3 + 1).requires_grad_()
        go = torch.randn(rows, c)
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(norm, "_fused_encode_applies", lambda *a: False)
                m.setattr(norm, "_fused_backward_applies", lambda *a: False)
            else:
                m.setattr(PackedTensor, "dequantize", lambda self: pytest.fail("xn was decoded whole"))
            torch.manual_seed(1)
            y = BF.batch_norm(leaf * 1.0, torch.zeros(c), torch.ones(c), weight, bias, True, config=config)
            state = y.grad_fn.bq_state
            grads = torch.autograd.grad(y, (leaf, weight, bias), go)
        return y, state, grads

    y_f, state_f, grads_f = run(True)
    y_u, state_u, grads_u = run(False)
    assert torch.equal(y_f, y_u)
    parts_f = state_f[0].parts if hasattr(state_f[0], "parts") else [state_f[0]]
    parts_u = state_u[0].parts if hasattr(state_u[0], "parts") else [state_u[0]]
    assert len(parts_f) == len(parts_u) == (1 if rows == 3000 else 2)
    for a, b in zip(parts_f, parts_u):
        assert torch.equal(a.payload, b.payload) and torch.equal(a.meta, b.meta) and torch.equal(a.seed, b.seed)
    for a, b in zip(state_f[1].parts, state_u[1].parts):  # the sampled square estimator
        assert torch.equal(a.values, b.values) and torch.equal(a.seed, b.seed)
    for a, b in zip(grads_f, grads_u):
        assert ((a - b).norm() / b.norm()).item() < 1e-6


@pytest.mark.parametrize("conv", ["gat", "gatv2"])
def test_attention_heads_in_one_pass_equal_the_per_head_products(native_backend, monkeypatch, conv):
    """Multi-head aggregation and the per-edge dot products run as compiled passes over the graph: outputs
    and gradients equal the PyTorch path (one sparse product per head, gathered features) to float round-off."""
    from torch_geometric.nn import GATConv, GATv2Conv

    import blockquant
    from blockquant import QuantConfig

    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 24, generator=g)
    ei = torch.randint(0, 300, (2, 4000), generator=g)
    cfg = QuantConfig(bits=8, rounding="nearest")

    def run(compiled_ops):
        torch.manual_seed(0)
        layer = (GATConv if conv == "gat" else GATv2Conv)(24, 16, heads=4)
        model = blockquant.convert(layer, cfg)
        with monkeypatch.context() as m:
            if not compiled_ops:
                m.setattr(native_ops, "heads_applies", lambda *a: False)
            else:
                calls = []
                for op in ("heads_spmm", "heads_sddmm"):
                    real = getattr(native_ops, op)
                    m.setattr(native_ops, op, lambda *a, _r=real, _o=op: calls.append(_o) or _r(*a))
            leaf = x.clone().requires_grad_()
            out = model(leaf * 1.0, ei)
            grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                        [leaf, *model.parameters()])
        if compiled_ops:
            assert calls.count("heads_spmm") == 1 and "heads_sddmm" in calls
        return out, grads

    out_c, grads_c = run(True)
    out_t, grads_t = run(False)
    torch.testing.assert_close(out_c, out_t, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_t):
        assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_converted_batch_norm_codes_are_checked_by_the_forward_check(native_backend, monkeypatch):
    """In a converted model's forward (which opens the deferred finiteness check) batch norm encodes
    through the compiled codec, records its metadata on that check, and trains; a non-finite input
    raises when the forward returns, naming the batch norm that saved it."""
    import blockquant
    from blockquant.functional import normalization as norm

    fused = []
    pack = norm._pack_affine
    monkeypatch.setattr(norm, "_pack_affine", lambda *a: fused.append(1) or pack(*a))
    torch.manual_seed(0)
    model = blockquant.convert(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32),
                                                   torch.nn.ReLU(), torch.nn.Linear(32, 4)))
    x = torch.randn(256, 16)
    model(x).sum().backward()
    assert fused and all(torch.isfinite(p.grad).all() for p in model.parameters())
    x[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"deferred check.*module '1' \(QBatchNorm1d\)"):
        model(x)
