"""Helpers shared by the codec tests: backends to parametrize over and the theory to check against."""
from __future__ import annotations

import contextlib

import pytest
import torch

from blockquant.kernels import available_backends, native
from blockquant.levels import optimal_levels, uniform_levels

BACKENDS = ["torch", "native", "triton"]
_WHY_NOT = {
    "triton": "triton not installed or TRITON_INTERPRET unset",
    "native": "the compiled CPU codec is unavailable",
}


def backend_param(name: str):
    """A pytest param for ``name`` that skips, with the reason, where that backend cannot run."""
    marks = []
    if name not in available_backends(torch.device("cpu")):
        why = native.unavailable_reason() if name == "native" else _WHY_NOT.get(name, "")
        marks.append(pytest.mark.skip(reason=f"backend {name!r} cannot run on CPU here ({why})"))
    return pytest.param(name, id=name, marks=marks)


BACKEND_PARAMS = [backend_param(b) for b in BACKENDS]


def level_values(packed) -> torch.Tensor:
    cfg = packed.config
    lv = optimal_levels(cfg.bits, packed.block) if cfg.levels == "optimal" else uniform_levels(cfg.bits)
    return torch.tensor(lv, dtype=torch.float64)


def per_element_bounds(x: torch.Tensor, packed):
    """The two decoded levels bracketing each element of ``x`` (float64, flat).

    Stochastic rounding picks one of them; its variance is ``(x - a)(b - x)``.
    """
    flat = x.detach().reshape(-1).to(torch.float64)
    n, g = flat.numel(), packed.block
    blk = torch.arange(n) // g
    lo = packed.meta[0].to(torch.float64)[blk]
    step = packed.meta[1].to(torch.float64)[blk]
    lv = level_values(packed)
    top = lv.numel() - 1
    t = torch.where(step > 0, (flat - lo) / torch.where(step > 0, step, torch.ones_like(step)), torch.zeros_like(flat))
    t = t.clamp(0, top)
    k = (torch.searchsorted(lv, t, right=True) - 1).clamp(0, top - 1)
    a = lo + step * lv[k]
    b = lo + step * lv[k + 1]
    return a, b


def theoretical_variance(x: torch.Tensor, packed) -> torch.Tensor:
    a, b = per_element_bounds(x, packed)
    flat = x.detach().reshape(-1).to(torch.float64)
    return ((flat - a) * (b - flat)).clamp_min(0)


class ExactPacked:
    """Test-only exact 'codec' (what ``blockquant.save_policy.compress`` returns, minus the rounding):
    keeps a copy of the tensor, so gradients through it must equal full precision."""

    def __init__(self, x):
        self.x = x.detach().clone()
        self.dtype = x.dtype

    @property
    def nbytes(self):
        return self.x.untyped_storage().nbytes()

    def storages(self):
        return (self.x,)

    def dequantize(self):
        return self.x

    def left_matmul(self, a):
        return a @ self.x.reshape(-1, self.x.shape[-1]).to(a.dtype)


@contextlib.contextmanager
def lossless_codec():
    """Inside the block every tensor blockquant compresses is kept as an :class:`ExactPacked` copy
    (``blockquant.save_policy.compress`` replaced): gradients must then equal full precision."""
    from blockquant import save_policy

    original = save_policy.compress
    save_policy.compress = lambda x, config: ExactPacked(x)
    try:
        yield
    finally:
        save_policy.compress = original


def check_launcher_rejects_bad_arguments(quantize, dequantize) -> None:
    """A codec backend's launchers refuse bad bits, block, dtype, levels and mismatched payload/meta."""
    x = torch.randn(100)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(x, 16, 3, torch.float32, None, False, 0)
    with pytest.raises(ValueError, match="block must be a positive integer"):
        quantize(x, 0, 2, torch.float32, None, False, 0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize(x.double(), 16, 2, torch.float32, None, False, 0)
    with pytest.raises(ValueError, match="4 values"):
        quantize(x, 16, 2, torch.float32, (0.0, 1.0, 3.0), False, 0)
    p, m = quantize(x, 16, 2, torch.float32, None, False, 0)
    with pytest.raises(ValueError, match="payload/meta do not match"):
        dequantize(p[:-1], m, 100, 16, 2, None, torch.float32)
