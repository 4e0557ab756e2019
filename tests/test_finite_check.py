"""The deferred finiteness check: one synchronisation per block of work, never a silent NaN."""
import pytest
import torch

import blockquant
from blockquant import QuantConfig, defer_finite_check, quantize

CFG = QuantConfig(bits=2, block_size=64)


def _bad(n=300, at=123, value=float("nan")):
    x = torch.randn(n)
    x[at] = value
    return x


def test_default_checks_each_call_at_once():
    with pytest.raises(ValueError, match="1 non-finite value"):
        quantize(_bad(), CFG, backend="torch")


def test_deferred_nan_raises_when_the_block_ends(monkeypatch):
    with pytest.raises(ValueError, match=r"deferred check\): 1 of 3 tensors .* call 2, shape \(300,\)"):
        with defer_finite_check() as check:
            quantize(torch.randn(10, 30), CFG, backend="torch")
            packed = quantize(_bad(), CFG, backend="torch")  # no error yet
            quantize(torch.randn(5), CFG, backend="torch")
            assert len(check) == 3
            # the offending block decodes to NaN until the check fires: nothing is silently finite
            assert torch.isnan(packed.dequantize()[64:128]).all()


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_deferred_inf_and_metadata_overflow_raise(value):
    with pytest.raises(ValueError, match="deferred check"):
        with defer_finite_check():
            quantize(_bad(value=value), CFG, backend="torch")
    with pytest.raises(ValueError, match="metadata torch.float16"):
        with defer_finite_check():
            quantize(torch.tensor([1e5, -1e5, 3.0, 4.0]), QuantConfig(block_size=4, meta_dtype="float16"),
                     backend="torch")


def test_deferred_check_does_not_read_device_values(monkeypatch):
    """Inside the context quantize never converts a tensor to a Python bool (a device sync on GPU)."""
    x = torch.randn(1000)
    with defer_finite_check() as check:
        def no_sync(self):
            raise AssertionError("quantize synchronised inside defer_finite_check")

        monkeypatch.setattr(torch.Tensor, "__bool__", no_sync)
        monkeypatch.setattr(torch.Tensor, "item", no_sync)
        quantize(x, CFG, seed=1, backend="torch")
        monkeypatch.undo()
        assert len(check) == 1


def test_explicit_check_raises_at_that_point_and_resets():
    with defer_finite_check() as check:
        quantize(_bad(), CFG, backend="torch")
        with pytest.raises(ValueError, match="1 of 1 tensors"):
            check.check()
        assert len(check) == 0
        quantize(torch.randn(50), CFG, backend="torch")
    # the block ended cleanly: the NaN was reported once, by check()


def test_an_error_inside_the_block_is_not_masked():
    with pytest.raises(KeyError):
        with defer_finite_check():
            quantize(_bad(), CFG, backend="torch")
            raise KeyError("user error")


def test_nested_contexts_check_once_at_the_outermost_exit():
    with pytest.raises(ValueError, match="1 of 2 tensors"):
        with defer_finite_check() as outer:
            with defer_finite_check() as inner:
                assert inner is outer
                quantize(_bad(), CFG, backend="torch")
            assert len(outer) == 1  # the inner exit did not check
            quantize(torch.randn(20), CFG, backend="torch")


def test_deferred_check_in_a_training_step():
    """Wrapping the forward pass: the NaN is reported before backward and the optimizer step."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(20, 8)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="deferred check"):
        with defer_finite_check():
            with blockquant.compress_saved_tensors(QuantConfig(bits=4, block_size=16), min_numel=1):
                loss = torch.relu(lin(x)).sum()
    assert lin.weight.grad is None
    del loss


# ------------------------------------------------------------------ converted models: one check per forward
def _converted_sage(seed=0):
    from blockquant.bench.models import build_model

    torch.manual_seed(seed)
    model = blockquant.convert(build_model("sage", 8, 16, 3, num_layers=2, dropout=0.0))
    x = torch.randn(40, 8)
    edge_index = torch.randint(0, 40, (2, 160))
    y = torch.randint(0, 3, (40,))
    return model, x, edge_index, y


def test_a_converted_forward_checks_once_and_raises_before_the_optimizer_step(torch_backend):
    """Training normally for a few epochs, then a weight turns NaN (as after a too large step):
    the next forward raises, naming the module and the tensor saved first with the NaN, before
    backward and the optimizer step; each forward reads the device once."""
    from blockquant.host_syncs import count_host_syncs

    model, x, edge_index, y = _converted_sage()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(3):
        opt.zero_grad(set_to_none=True)
        with count_host_syncs() as report:
            loss = torch.nn.functional.cross_entropy(model(x, edge_index), y)
        loss.backward()
        opt.step()
        if epoch:  # the first forward on the graph also builds its cached structure
            assert sum(report.syncs.values()) == 1 and "in check" in next(iter(report.syncs)), report.table()
    with torch.no_grad():
        model.blocks[0].conv.lin_l.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.named_parameters()}
    opt.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"deferred check\).*shape \(40, 16\), torch.float32.* saved by "
                                         r"_BatchNorm.forward in module 'blocks.0.norm' \(QBatchNorm1d\)"):
        torch.nn.functional.cross_entropy(model(x, edge_index), y).backward()
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.named_parameters():  # no optimizer step happened
        assert torch.equal(torch.nan_to_num(v), torch.nan_to_num(before[k])), k
    # the check does not stay open after the error: a later quantize outside the model checks at once
    with pytest.raises(ValueError, match="1 non-finite value"):
        quantize(_bad(), CFG, backend="torch")


def test_the_forward_check_is_off_in_eval_and_inside_a_callers_own_check(torch_backend):
    model, x, edge_index, y = _converted_sage(1)
    with defer_finite_check() as outer:
        model(x, edge_index)
        assert len(outer) > 0  # the model's tensors were recorded in the caller's check
    model.eval()
    with torch.no_grad():
        model(x, edge_index)  # nothing compressed, nothing checked
