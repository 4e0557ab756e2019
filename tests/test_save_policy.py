"""blockquant.save_policy: what an op keeps of a tensor for backward (keep), and residency."""
import copy
import types
import weakref

import pytest
import torch

import blockquant
from blockquant import QuantConfig, save_policy
from blockquant.save_policy import is_resident, keep, keep_for_ctx, mark_resident

CFG = QuantConfig(bits=2, block_size=64)
PROJECTED = QuantConfig(bits=2, block_size=64, rp_ratio=4)


def _intermediate(shape=(30, 16)):
    leaf = torch.randn(*shape, requires_grad=True)
    return leaf * 1.0  # has a grad_fn: rebuilt every step, may be shared within one


def test_resident_tensor_is_kept_by_reference_and_nothing_is_computed_for_it():
    x = torch.randn(30, 16)
    mark_resident(x)
    called = []
    assert keep(x, CFG) is x
    assert keep(x, CFG, instead=lambda: called.append(1)) is x and not called
    ctx = types.SimpleNamespace()
    assert keep_for_ctx(ctx, x, CFG) == ([x], ()) and ctx.bq_ref is True


def test_intermediate_is_compressed_once_and_shared_unless_asked_for_an_independent_rounding():
    h = _intermediate()
    first = keep(h, CFG)
    assert isinstance(first, blockquant.PackedTensor) and first.shape == h.shape
    assert keep(h, CFG) is first  # a second op of the same forward shares it
    independent = keep(h, CFG, shared=False)
    assert independent is not first and independent.seed != first.seed
    ctx = types.SimpleNamespace()
    tensors, state = keep_for_ctx(ctx, h, CFG)
    assert tensors == [] and state == (first,) and ctx.bq_ref is False


def test_projection_only_where_asked_and_dtype_cast_first():
    h = _intermediate((30, 64))
    assert keep(h, PROJECTED).proj_dims == (64, 16)
    plain = keep(h, PROJECTED, projection=False)
    assert plain.proj_dims is None and plain.config.rp_ratio == 1
    assert save_policy.without_projection(PROJECTED) == PROJECTED.replace(rp_ratio=1)
    assert save_policy.without_projection(CFG) is CFG
    bf16 = keep(h, CFG, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.dequantize().dtype == torch.bfloat16


def test_instead_keeps_what_the_op_computes_when_the_input_is_not_resident():
    h = _intermediate()
    derivative = torch.sigmoid(h.detach())
    kept = keep(h, CFG, instead=lambda: save_policy.compress(derivative, CFG))
    assert kept.shape == h.shape and kept is not keep(h, CFG)
    ctx = types.SimpleNamespace()
    assert keep_for_ctx(ctx, h, CFG, instead=lambda: ("a", "b")) == ([], ("a", "b")) and ctx.bq_ref is False


def test_long_lived_tensor_without_grad_fn_is_rounded_afresh_every_time():
    x = torch.randn(30, 16)  # not marked: held by someone for an unknown time
    a, b = keep(x, CFG), keep(x, CFG)
    assert a is not b and a.seed != b.seed


def test_residency_is_weak_and_not_inherited_by_results_or_clones():
    x = torch.randn(1000, 16)
    mark_resident(x, "not a tensor", None)  # non-tensors are ignored
    assert is_resident(x) and is_resident(x[:, :4]) and is_resident(x.t())
    assert not is_resident(x.clone()) and not is_resident(x * 1) and not is_resident(torch.relu(x))
    # copies that someone holds carry the mark (the module docstring says so)
    assert is_resident(copy.deepcopy(x))
    # parameters, views of parameters and leaves that require grad need no mark
    w = torch.nn.Parameter(torch.randn(4, 4))
    leaf = torch.randn(3, requires_grad=True)
    assert is_resident(w) and is_resident(w.t()) and is_resident(leaf) and not is_resident(leaf * 2)
    # the mark holds nothing: the tensor is freed as soon as its owner drops it
    ref = weakref.ref(x)
    del x
    assert ref() is None


def test_residency_check_traces_without_a_graph_break():
    """torch.compile reads residency (a flag on the tensor) inside the graph: no break, and the
    compiled function answers as eager does for a marked, an unmarked and a parameter input."""
    w = torch.nn.Parameter(torch.randn(8, 8))

    def scaled(x):
        y = x @ w
        return y * 2 if is_resident(x) else y * 3

    marked, plain = torch.randn(4, 8), torch.randn(4, 8)
    mark_resident(marked)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(scaled)(marked)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(scaled, backend="eager")
    for x in (marked, plain, w):
        torch.testing.assert_close(compiled(x), scaled(x))
    # a view reads as not resident inside a compiled graph (its _base cannot be read there): it is
    # compressed, which costs memory, never correctness; eager recognises a parameter's view
    view = w[:4]
    assert is_resident(view)
    torch.testing.assert_close(compiled(view), view @ w * 3)
    torch._dynamo.reset()


def test_convert_marks_the_model_inputs_through_the_policy_for_the_call_only():
    model = blockquant.convert(torch.nn.Sequential(torch.nn.Linear(16, 8)), CFG)
    x = torch.randn(30, 16)
    assert not is_resident(x)
    y = model(x)
    assert y.grad_fn.bq_state == ()  # x kept by reference: nothing compressed
    assert not is_resident(x)  # the mark was scoped to the call


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_float64_intermediates_are_compressed_and_decode_to_their_dtype(dtype):
    h = _intermediate((40, 16)).to(dtype)
    kept = keep(h, CFG)
    assert kept.dtype == dtype and kept.dequantize().dtype == dtype
    assert kept.nbytes == keep(h.detach().float() * 1, CFG).nbytes
