"""On a CUDA GPU (skipped elsewhere; bench/gpu_check.sh runs them): converted models train on the device,
the CPU host-sync counter agrees with CUDA's own sync detector, and launches follow the tensor's device."""
import warnings

import pytest
import torch

import blockquant
from blockquant.bench.models import MODEL_NAMES, ZOO_MODEL_NAMES, build_model, build_zoo_model
from blockquant.host_syncs import count_host_syncs
from blockquant.kernels import get_backend, reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODELS = list(MODEL_NAMES) + list(ZOO_MODEL_NAMES)


def _model(name, features, classes, dropout):
    if name in MODEL_NAMES:
        return build_model(name, features, 32, classes, num_layers=2, dropout=dropout, heads=4)
    return build_zoo_model(name, features, 32, classes, dropout=dropout)


def _graph(device, n=2000, e=20000, features=16, classes=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    edge_index = torch.randint(0, n, (2, e), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x.to(device), edge_index.to(device), y.to(device)


def _step(model, opt, x, edge_index, y):
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x, edge_index), y).backward()
    opt.step()


@pytest.mark.parametrize("name", MODELS)
def test_converted_training_on_cuda_matches_pyg(name):
    """Forward in training mode equals the unconverted model's (no dropout); backward runs on the
    device (GAT's chunk bounds once searched a CPU tensor in a CUDA one here)."""
    x, edge_index, y = _graph("cuda")
    torch.manual_seed(0)
    plain = _model(name, 16, 4, 0.0).cuda().train()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    ref = plain(x, edge_index)
    torch.manual_seed(0)
    model = _model(name, 16, 4, 0.0).cuda().train()
    model.load_state_dict(state)
    model = blockquant.convert(model)
    assert get_backend(x.device).name == "triton"
    out = model(x, edge_index)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.nn.functional.cross_entropy(out, y).backward()
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_cuda_sync_detector_agrees_with_the_cpu_counter(name):
    """A steady-state step: torch.cuda.set_sync_debug_mode("warn") sees as many synchronising calls
    as blockquant.host_syncs counts (the one deferred finiteness check)."""
    x, edge_index, y = _graph("cuda")
    torch.manual_seed(0)
    model = blockquant.convert(_model(name, 16, 4, 0.5).cuda())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _step(model, opt, x, edge_index, y)
    with count_host_syncs() as report:
        _step(model, opt, x, edge_index, y)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _step(model, opt, x, edge_index, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synced = [str(w.message) for w in caught if "synchronizing" in str(w.message)]
    counted = sum(report.syncs.values()) + sum(report.copies.values()) + sum(report.dynamic.values())
    assert len(synced) == counted == 1, (synced, report.table())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_launches_run_on_the_tensors_device_not_the_current_one():
    torch.cuda.set_device(0)
    x = torch.randn(100_000, device="cuda:1")
    cfg = blockquant.QuantConfig(bits=2, block_size=1024, rounding="nearest")
    packed = blockquant.quantize(x, cfg, seed=1)
    ref = reference.quantize_torch(x.cpu(), 1024, 2, cfg.meta_dtype, None, False, 1)
    assert packed.payload.device == x.device
    assert torch.equal(packed.payload.cpu(), ref[0]) and torch.equal(packed.meta.cpu(), ref[1])
    torch.testing.assert_close(packed.dequantize().cpu(), reference.dequantize_torch(*ref, 100_000, 1024, 2, None,
                                                                                     torch.float32))


def test_constants_are_built_once_per_cuda_device():
    from blockquant.kernels.bitmask import _weights

    lv = reference.levels_tensor([0.0, 1.0, 2.5, 3.0], torch.device("cuda", 0))
    assert lv.device.type == "cuda" and lv is reference.levels_tensor((0, 1, 2.5, 3), torch.device("cuda", 0))
    assert _weights(torch.device("cuda", 0)) is _weights(torch.device("cuda", 0))
