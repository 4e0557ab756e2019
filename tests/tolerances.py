"""Tolerance helpers shared by the tests (one definition of each; ``from tolerances import rel_err``)."""
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in the Frobenius norm: the relative error of ``a`` against the reference ``b``
    (``b == 0`` gives ``|a|`` over a tiny floor instead of a division by zero)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_rel_err(a: dict, b: dict) -> float:
    """The largest :func:`rel_err` over the named tensors of the reference ``b`` (e.g. gradients by parameter
    name), in float64."""
    return max(rel_err(a[n].double(), b[n].double()) for n in b)
