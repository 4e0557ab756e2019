"""The compiled CPU codec (``native``) against the PyTorch reference, and its fallback.

Nearest rounding is deterministic: payload, metadata and decoded values must be
bit-identical to the reference for every bit width, block size, level set,
input and metadata dtype. Stochastic rounding draws its own noise, so its
statistics are checked in test_codec.py (which runs every backend); here we
check that the draws do not depend on how the blocks are split between threads.
"""
import itertools
import warnings

import pytest
import torch

import blockquant
from blockquant import ROW, QuantConfig
from blockquant.kernels import reference
from blockquant.kernels import get_backend, native, registry
from blockquant.levels import optimal_levels
from codec_utils import check_launcher_rejects_bad_arguments

needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"compiled CPU codec unavailable: {native.unavailable_reason()}")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (n, G): tails shorter than a block, G not a power of two, codes straddling the block end, G = 1
SIZES = ((1000, 64), (37, 64), (1003, 5), (700, 300), (2500, 1000), (160, 16), (9, 1), (3001, 1024))


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of the raw bytes (NaN patterns and signed zeros included)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _test_input(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3 + 1
    x[::7] = 0.0  # exact zeros and repeated values exercise the rounding edges
    return x.to(dtype)


def _check_identical(x, block, bits, levels, meta_dtype):
    n = x.numel()
    ref_p, ref_m = reference.quantize_torch(x, block, bits, meta_dtype, levels, False, 0)
    nat_p, nat_m = native.quantize_native(x, block, bits, meta_dtype, levels, False, 0)
    where = f"n={n} G={block} int{bits} levels={'optimal' if levels else 'uniform'} x={x.dtype} meta={meta_dtype}"
    assert _bits_equal(nat_p, ref_p), f"payload differs from the reference ({where})"
    assert _bits_equal(nat_m, ref_m), f"metadata differs in {(nat_m != ref_m).sum().item()} entries ({where})"
    ref_d = reference.dequantize_torch(ref_p, ref_m, n, block, bits, levels, x.dtype)
    nat_d = native.dequantize_native(ref_p, ref_m, n, block, bits, levels, x.dtype)
    assert _bits_equal(nat_d, ref_d), f"decode differs in {(nat_d != ref_d).sum().item()} elements ({where})"


@needs_native
@pytest.mark.parametrize("levels", ["uniform", "optimal"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8], ids=lambda b: f"int{b}")
def test_nearest_bit_identical_to_reference(bits, levels):
    for (n, block), x_dtype, meta_dtype in itertools.product(SIZES, DTYPES, DTYPES):
        lv = optimal_levels(bits, block) if levels == "optimal" else None
        _check_identical(_test_input(n, x_dtype, seed=n + block), block, bits, lv, meta_dtype)


@needs_native
@pytest.mark.parametrize("meta_dtype", DTYPES, ids=str)
def test_nearest_bit_identical_edge_values(meta_dtype):
    cases = {
        "tiny": torch.rand(500) * 1e-30,                     # subnormal in fp16/bf16 metadata
        "negative-tiny": -torch.rand(500) * 1e-30,
        "wide-range": torch.randn(500) * torch.logspace(-20, 20, 500),
        "zeros": torch.zeros(500),
        "constant": torch.full((500,), 0.1234567),
        "huge": torch.randn(500) * 1e38,                      # overflows fp16 metadata: non-finite, like the reference
    }
    for name, x in cases.items():
        for bits in (2, 8):
            _check_identical(x, 64, bits, None, meta_dtype)
            _check_identical(x, 64, bits, optimal_levels(bits, 64), meta_dtype)


@needs_native
def test_nearest_bit_identical_row_blocks_and_max_block():
    torch.manual_seed(0)
    x = torch.randn(300, 16)  # row mode after an 8x projection of 128 columns
    for bits in (1, 2, 4, 8):
        _check_identical(x.reshape(-1), 16, bits, None, torch.bfloat16)
    big = torch.randn(65536 + 123)
    _check_identical(big, 65536, 2, optimal_levels(2, 65536), torch.float32)


@needs_native
def test_public_api_matches_reference():
    torch.manual_seed(1)
    x = torch.randn(57, 130)
    for cfg in (QuantConfig(bits=2, block_size=ROW, rp_ratio=8, rounding="nearest"),
                QuantConfig(bits=4, block_size=100, levels="optimal", rounding="nearest", meta_dtype="float16")):
        a = blockquant.quantize(x, cfg, seed=3, backend="native")
        b = blockquant.quantize(x, cfg, seed=3, backend="torch")
        assert _bits_equal(a.payload, b.payload) and _bits_equal(a.meta, b.meta)
        assert _bits_equal(a.dequantize(), b.dequantize())


@needs_native
@pytest.mark.parametrize("levels", ["uniform", "optimal"])
def test_stochastic_draws_do_not_depend_on_the_thread_split(levels):
    x = _test_input(5000, torch.float32)
    lv = optimal_levels(4, 100) if levels == "optimal" else None
    lib = native._library()
    one = native._quantize(lib, x, 100, 4, torch.bfloat16, lv, True, 77, threads=1)
    three = native._quantize(lib, x, 100, 4, torch.bfloat16, lv, True, 77, threads=3)
    # _ranges never splits below MIN_ELEMENTS_PER_THREAD; call the ranges by hand to force a split
    split_p = torch.empty_like(one[0])
    split_m = torch.empty_like(one[1])
    lv_table = reference.levels_tensor(lv, "cpu") if lv is not None else None
    for b0, b1 in ((0, 17), (17, 18), (18, 50)):
        assert lib.bq_quantize(x.data_ptr(), 0, x.numel(), 100, 4, 2,
                               None if lv_table is None else lv_table.data_ptr(), 1, 77, split_p.data_ptr(),
                               split_m.data_ptr(), 50, b0, b1) == 0
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    assert torch.equal(one[0], split_p) and torch.equal(one[1], split_m)
    # a different seed draws different codes; the same seed the same
    other = native.quantize_native(x, 100, 4, torch.bfloat16, lv, True, 78)
    again = native.quantize_native(x, 100, 4, torch.bfloat16, lv, True, 77)
    assert not torch.equal(other[0], one[0]) and torch.equal(again[0], one[0])


@needs_native
def test_multithreaded_call_matches_single_thread(monkeypatch):
    """Large enough to be split between threads: the split changes nothing."""
    monkeypatch.setattr(native, "MIN_ELEMENTS_PER_THREAD", 1000)
    x = _test_input(10_000, torch.bfloat16)
    lib = native._library()
    for stochastic in (False, True):
        a = native._quantize(lib, x, 64, 2, torch.float16, None, stochastic, 5, threads=1)
        b = native._quantize(lib, x, 64, 2, torch.float16, None, stochastic, 5, threads=4)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        da = native._dequantize(lib, a[0], a[1], x.numel(), 64, 2, None, torch.float32, threads=1)
        db = native._dequantize(lib, a[0], a[1], x.numel(), 64, 2, None, torch.float32, threads=4)
        assert torch.equal(da, db)


@needs_native
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_value_poisons_only_its_block(bad):
    x = _test_input(3000, torch.float32)
    x[2100] = bad
    _, meta = native.quantize_native(x, 16, 2, torch.bfloat16, None, True, 3)
    finite = torch.isfinite(meta).all(0)
    assert not finite[2100 // 16] and finite.sum() == finite.numel() - 1
    x[64:128] = float("nan")  # a block made only of NaN
    _, meta = native.quantize_native(x, 64, 2, torch.float32, None, False, 3)
    assert not torch.isfinite(meta[:, 1]).any()
    with pytest.raises(ValueError, match="non-finite"):
        blockquant.quantize(x, QuantConfig(bits=2, block_size=64), backend="native")


@needs_native
def test_launcher_rejects_bad_arguments():
    check_launcher_rejects_bad_arguments(native.quantize_native, native.dequantize_native)


# ---------------------------------------------------------------- selection and fallback


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A native module that builds afresh (into tmp_path) at its next use; restored afterwards."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    native._reset_for_tests()
    yield
    monkeypatch.undo()
    native._reset_for_tests()


@pytest.fixture
def no_interpreter(monkeypatch):
    """Default selection as on a machine without TRITON_INTERPRET (the tests set it)."""
    monkeypatch.setattr(registry, "interpreting", lambda: False)
    monkeypatch.delenv("BLOCKQUANT_BACKEND", raising=False)


@needs_native
def test_cpu_tensors_default_to_the_compiled_codec(no_interpreter):
    assert get_backend(torch.device("cpu")).name == "native"


@pytest.mark.parametrize("how", ["disabled", "no-compiler", "compiler-fails"])
def test_fallback_to_the_reference_when_the_build_is_unavailable(how, fresh_native, no_interpreter, monkeypatch,
                                                                  tmp_path):
    if how == "disabled":
        monkeypatch.setenv(native.DISABLE_ENV, "0")
        expect = "disabled"
    elif how == "no-compiler":
        monkeypatch.setattr(native, "_compiler", lambda: None)
        expect = "no C compiler"
    else:
        failing = tmp_path / "failing-cc"
        failing.write_text("#!/bin/sh\necho 'cc: error: simulated failure' >&2\nexit 1\n")
        failing.chmod(0o755)
        monkeypatch.setenv("CC", str(failing))
        expect = "simulated failure"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not native.available()
        assert not native.available()  # asked again: no second warning
        assert get_backend(torch.device("cpu")).name == "torch"
    fallback = [w for w in caught if issubclass(w.category, native.CodecFallbackWarning)]
    if how == "disabled":  # chosen on purpose: nothing to warn about
        assert fallback == []
    else:  # the slow path is never silent: one warning per process, with the reason
        assert len(fallback) == 1 and expect in str(fallback[0].message), [str(w.message) for w in caught]
        assert native.BUILD_COMMAND in str(fallback[0].message)
    assert expect in native.unavailable_reason()
    assert not any(p.name.endswith(".so") for p in tmp_path.iterdir())
    # the registry falls back to the reference, which gives the same nearest-rounding result
    assert get_backend(torch.device("cpu")).name == "torch"
    x = _test_input(1000, torch.float32)
    cfg = QuantConfig(bits=2, block_size=64, rounding="nearest")
    p = blockquant.quantize(x, cfg)
    assert p.payload.numel() == reference.payload_bytes(1000, 64, 2)
    ref = reference.quantize_torch(x, 64, 2, cfg.meta_dtype, None, False, 0)
    assert torch.equal(p.payload, ref[0]) and torch.equal(p.meta, ref[1])
    # asking for it by name says why it cannot be used
    with pytest.raises(ValueError, match=f"cannot handle tensors on cpu .*{expect}"):
        blockquant.quantize(x, cfg, backend="native")
    with pytest.raises(RuntimeError, match=expect):
        native.quantize_native(x, 64, 2, torch.float32, None, False, 0)


@needs_native
def test_a_second_process_loads_the_cached_build_without_compiling(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise AssertionError(f"the compiler ran again: {args}")

    monkeypatch.setattr(native.subprocess, "run", no_compiler)
    native._reset_for_tests()
    try:
        assert native.available(), native.unavailable_reason()
    finally:
        monkeypatch.undo()
        native._reset_for_tests()


@needs_native
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_threads(monkeypatch):
    """Work sent to the parent's pool from a forked child would never run (a hang): the child builds its own."""
    import os

    monkeypatch.setattr(native, "MIN_ELEMENTS_PER_THREAD", 1000)
    x = _test_input(20_000, torch.float32)
    lib = native._library()
    expect = native._quantize(lib, x, 64, 2, torch.float32, None, True, 1, threads=2)  # creates the pool
    pid = os.fork()
    if pid == 0:  # child: exit status 0 only if the threaded call finishes with the same codes
        ok = False
        try:
            got = native._quantize(lib, x, 64, 2, torch.float32, None, True, 1, threads=2)
            ok = torch.equal(got[0], expect[0])
        finally:
            os._exit(0 if ok else 1)
    deadline_s = 60
    import time

    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's codec call hung")


@needs_native
def test_a_build_that_fails_the_self_check_is_not_used(no_interpreter, monkeypatch):
    """A miscompiled library (simulated: its encoder writes nothing) is rejected and the reference is used."""
    real_quantize = native._quantize

    def broken(lib, flat, *args, **kwargs):
        payload, meta = real_quantize(lib, flat, *args, **kwargs)
        return torch.zeros_like(payload), meta

    monkeypatch.setattr(native, "_quantize", broken)
    native._reset_for_tests()  # reloads the cached build: no compilation
    try:
        assert not native.available()
        assert "self-check" in native.unavailable_reason()
        assert get_backend(torch.device("cpu")).name == "torch"
    finally:
        monkeypatch.undo()
        native._reset_for_tests()
