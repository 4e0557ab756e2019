"""Under torch.autocast the compressed activations keep autocast's semantics: a matmul-like op's saved
input is compressed in the dtype the op computed in, and gradients match the plain autocast model."""
import copy

import pytest
import torch

import blockquant
import blockquant.functional as bqf
from blockquant import save_policy
from blockquant.bench.datasets import load_dataset
from blockquant.bench.models import build_model
from codec_utils import ExactPacked
from tolerances import max_rel_err

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")

DEVICES = [("cpu", torch.bfloat16)]
if torch.cuda.is_available():
    DEVICES += [("cuda", torch.bfloat16), ("cuda", torch.float16)]


def _data(device):
    ds = load_dataset("synthetic:tiny")
    return ds.to(torch.device(device))


def _models(ds, config, device):
    torch.manual_seed(0)
    ref = build_model("sage", ds.num_features, 64, ds.num_classes, num_layers=3, dropout=0.0).to(device)
    return ref, blockquant.convert(copy.deepcopy(ref), config)


def _grads(model, ds, device, dtype, enabled=True):
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=dtype, enabled=enabled):
        out = model(ds.x, ds.edge_index)
        loss = torch.nn.functional.cross_entropy(out.float(), ds.y)
    loss.backward()
    # lin_l biases feed BatchNorm, whose mean removal makes their true gradient ~0: relative error is noise
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if not n.endswith("lin_l.bias")}


@pytest.mark.parametrize("device,dtype", DEVICES, ids=[f"{d}-{str(t)[6:]}" for d, t in DEVICES])
def test_gradients_match_plain_autocast_under_an_exact_codec(monkeypatch, device, dtype):
    ds = _data(device)
    ref, conv = _models(ds, blockquant.QuantConfig(bits=8), device)
    kept = []

    def exact(x, config):
        kept.append(x.dtype)
        return ExactPacked(x)

    monkeypatch.setattr(save_policy, "compress", exact)
    out_ref, g_ref = _grads(ref, ds, device, dtype)
    out_q, g_q = _grads(conv, ds, device, dtype)
    assert out_ref.dtype == out_q.dtype == dtype
    # the linears' inputs are kept in the dtype the op computed in; BatchNorm's xn in float32,
    # the dtype of its statistics and of its backward's arithmetic
    assert kept and dtype in kept and set(kept) <= {dtype, torch.float32}, kept
    _, g_fp32 = _grads(ref, ds, device, dtype, enabled=False)
    autocast_effect = max_rel_err(g_ref, g_fp32)
    assert autocast_effect > 1e-3  # autocast visibly changes the gradients ...
    # ... and the converted model follows autocast, not fp32: BatchNorm's backward is blockquant's
    # own (unbiased under rounding), so it matches ATen's bf16 kernel up to bf16 rounding order
    assert max_rel_err(g_q, g_ref) < 0.2 * autocast_effect, (max_rel_err(g_q, g_ref), autocast_effect)


@pytest.mark.parametrize("device,dtype", DEVICES, ids=[f"{d}-{str(t)[6:]}" for d, t in DEVICES])
def test_packed_activations_decode_to_the_autocast_dtype(monkeypatch, device, dtype):
    ds = _data(device)
    _, conv = _models(ds, "iexact", device)
    packed = []
    real = save_policy.compress

    def spy(x, config):
        p = real(x, config)
        packed.append((x.dtype, p))
        return p

    monkeypatch.setattr(save_policy, "compress", spy)
    _grads(conv, ds, device, dtype)
    # each tensor is kept in the dtype its op computed in: the linears' inputs in the autocast
    # dtype; a normalisation's xn in its statistics' float32 (what its backward computes in)
    assert packed and all(p.dtype == src and p.dequantize().dtype == src for src, p in packed)
    assert any(src == dtype for src, _ in packed)
    packed.clear()
    _grads(conv, ds, device, dtype, enabled=False)  # without autocast: float32 as before
    assert packed and all(p.dtype == torch.float32 for _, p in packed)


def test_autocast_keeps_the_memory_saving_and_trains():
    ds = _data("cpu")
    ref, conv = _models(ds, "iexact", "cpu")
    held = {}
    for name, m in (("plain", ref), ("iexact", conv)):
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16), \
                blockquant.track_saved(m, exclude=(ds.x, ds.edge_index, ds.y)) as mem:
            out = m(ds.x, ds.edge_index)
        del out
        held[name] = mem.total_bytes
    assert held["iexact"] < 0.1 * held["plain"], held  # plain autocast already halves fp32; iexact keeps ~2 bits
    opt = torch.optim.Adam(conv.parameters(), lr=0.01)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(conv(ds.x, ds.edge_index).float()[ds.split["train"]],
                                                     ds.y[ds.split["train"]])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_shared_input_is_compressed_once_per_autocast_dtype(monkeypatch):
    """A tensor feeding two linears is cast and compressed once, as without autocast."""
    calls = []
    real = save_policy.compress

    def spy(x, config):
        calls.append(x.dtype)
        return real(x, config)

    monkeypatch.setattr(save_policy, "compress", spy)
    w1 = torch.randn(8, 16, requires_grad=True)
    w2 = torch.randn(4, 16, requires_grad=True)
    x = torch.randn(64, 16, requires_grad=True)
    cfg = blockquant.QuantConfig(bits=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = x * 2  # an intermediate (has a grad_fn), float32
        y = bqf.linear(h, w1, config=cfg).sum() + bqf.linear(h, w2, config=cfg).sum()
    y.backward()
    assert calls == [torch.bfloat16]
    assert w1.grad.dtype == w2.grad.dtype == torch.float32
