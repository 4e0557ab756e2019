"""Which codec runs where: kernels registered per device type with torch.library, overrides per device type,
launches on the tensor's own device, and constants built once per device."""
import contextlib

import pytest
import torch

import blockquant
from blockquant import QuantConfig
from blockquant.kernels import blockwise, default_backend, get_backend, native, reference, registry
from blockquant.kernels.registry import forced_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
needs_triton = pytest.mark.skipif(not blockwise.HAS_TRITON, reason="triton is not installed")


@pytest.fixture
def no_interpreter(monkeypatch):
    """Default selection as on a machine without TRITON_INTERPRET (the tests set it)."""
    monkeypatch.setattr(registry, "interpreting", lambda: False)
    monkeypatch.delenv("BLOCKQUANT_BACKEND", raising=False)


@needs_triton
def test_the_dispatcher_has_one_kernel_per_device_type_and_the_reference_as_default():
    for op in ("blockquant::quantize_blockwise", "blockquant::dequantize_blockwise"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")  # Triton
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")  # the compiled codec (or its fallback)
        # every other device type: the PyTorch reference
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd")


def test_the_ops_have_shape_only_fakes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(1000)
        payload, meta = torch.ops.blockquant.quantize_blockwise(x, 64, 2, torch.bfloat16, None, True, 1)
        out = torch.ops.blockquant.dequantize_blockwise(payload, meta, 1000, 64, 2, None, torch.float16)
    assert payload.shape == (reference.payload_bytes(1000, 64, 2),) and meta.shape == (2, 16)
    assert out.shape == (1000,) and out.dtype == torch.float16


@needs_triton
def test_default_per_device_type(no_interpreter):
    assert default_backend(CUDA).name == "triton"
    assert default_backend(CPU).name == ("native" if native.available() else "torch")
    assert default_backend(torch.device("meta")).name == "torch"


@needs_triton
def test_a_bare_name_overrides_only_the_device_types_it_runs_on(no_interpreter, monkeypatch):
    """BLOCKQUANT_BACKEND=native forces the CPU codec for CPU tensors; CUDA tensors of the same
    process keep Triton instead of failing (the override used to apply to every device)."""
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "native")
    if native.available():
        assert get_backend(CPU).name == "native"
    assert get_backend(CUDA).name == "triton"
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "torch")  # runs everywhere: everywhere
    assert get_backend(CPU).name == get_backend(CUDA).name == "torch"


@needs_triton
def test_per_device_type_overrides_and_their_errors(no_interpreter, monkeypatch):
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "cpu:torch, cuda:torch")
    assert get_backend(CPU).name == get_backend(CUDA).name == "torch"
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "cuda:torch")
    assert get_backend(CUDA).name == "torch" and forced_backend(CPU) is None  # the CPU keeps its default
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "cuda:native")
    with pytest.raises(ValueError, match=r"'native' \(set for cuda by BLOCKQUANT_BACKEND\) cannot handle tensors on "
                                         r"cuda:0 \(it runs on CPU tensors only\)"):
        get_backend(CUDA)
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "cpu:torch,cuda")
    with pytest.raises(ValueError, match=r"BLOCKQUANT_BACKEND='cpu:torch,cuda'.*'device_type:name'.*'cuda'"):
        get_backend(CPU)
    monkeypatch.setenv("BLOCKQUANT_BACKEND", "cpu:nope")
    with pytest.raises(ValueError, match="unknown blockquant backend 'nope'"):
        get_backend(CPU)
    monkeypatch.delenv("BLOCKQUANT_BACKEND")
    with pytest.raises(ValueError, match="'native' cannot handle tensors on cuda:0"):
        get_backend(CUDA, "native")  # an explicit backend= that cannot run there is an error


def test_forced_and_dispatched_codecs_agree_under_nearest_rounding(monkeypatch):
    monkeypatch.delenv("BLOCKQUANT_BACKEND", raising=False)
    x = torch.randn(3000)
    cfg = QuantConfig(bits=4, block_size=128, rounding="nearest", levels="optimal")
    dispatched = blockquant.quantize(x, cfg, seed=5)
    forced = blockquant.quantize(x, cfg, seed=5, backend="torch")
    assert torch.equal(dispatched.payload, forced.payload) and torch.equal(dispatched.meta, forced.meta)
    assert torch.equal(dispatched.dequantize(), forced.dequantize())


@needs_triton
def test_triton_launches_on_the_tensors_device(monkeypatch):
    """A model on cuda:1 without torch.cuda.set_device(1): the launch must run on cuda:1, not on the
    current device (GPU 0) with GPU 1's pointers. Every launch enters the tensor's device."""
    guard = blockwise._on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(blockwise._on_device(CPU), contextlib.nullcontext)
    if not blockwise.triton_supports(CPU):
        pytest.skip("the launch check runs the Triton kernels through the interpreter (TRITON_INTERPRET=1)")
    entered = []
    real = blockwise._on_device
    monkeypatch.setattr(blockwise, "_on_device", lambda device: entered.append(device) or real(device))
    x = torch.randn(500)
    payload, meta = blockwise.quantize_triton(x, 64, 2, torch.bfloat16, None, True, 3)
    blockwise.dequantize_triton(payload, meta, 500, 64, 2, None, torch.float32)
    assert entered == [x.device, x.device]


def test_levels_and_bit_weights_are_built_once_per_device():
    """Built from Python data, each would be a host-to-device copy (and a wait) per call on a GPU."""
    assert reference.levels_tensor([0.0, 1.0, 2.0, 3.0], "cpu") is reference.levels_tensor((0, 1, 2, 3), "cpu")
    assert reference.levels_arg(None, 2, "cpu") is None
    with pytest.raises(ValueError, match="levels must hold 2\\*\\*bits = 4 values for bits=2; got 3"):
        reference.levels_arg([0.0, 1.0, 3.0], 2, "cpu")
    from blockquant.kernels.bitmask import _weights

    assert _weights("cpu") is _weights(torch.device("cpu"))


def test_chunk_size_is_chosen_per_device():
    from blockquant import save_policy

    cpu, cuda = save_policy.chunk_elements(CPU), save_policy.chunk_elements(CUDA)
    assert cpu == save_policy.CHUNK_ELEMENTS["cpu"] and cuda == save_policy.CHUNK_ELEMENTS["cuda"] > cpu
    assert save_policy.chunk_elements(torch.device("meta")) == cpu
    cfg = QuantConfig(bits=2, block_size=64)
    assert save_policy.rows_per_chunk(128, cfg, CUDA) == 16 * save_policy.rows_per_chunk(128, cfg, CPU)
