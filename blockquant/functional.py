"""Autograd functions whose saved tensors are compressed (API stubs; implementation follows)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .config import QuantConfig


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           config: Optional[QuantConfig] = None) -> torch.Tensor:
    raise NotImplementedError


def aggregate(x: torch.Tensor, adj, reduce: str = "sum", config: Optional[QuantConfig] = None) -> torch.Tensor:
    raise NotImplementedError


def relu(x: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError


def leaky_relu(x: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    raise NotImplementedError


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    raise NotImplementedError


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, config: Optional[QuantConfig] = None) -> torch.Tensor:
    raise NotImplementedError


def layer_norm(x, normalized_shape: Sequence[int], weight=None, bias=None, eps: float = 1e-5,
               config: Optional[QuantConfig] = None) -> torch.Tensor:
    raise NotImplementedError


def elu(x: torch.Tensor, alpha: float = 1.0, config: Optional[QuantConfig] = None) -> torch.Tensor:
    raise NotImplementedError


def gelu(x: torch.Tensor, approximate: str = "none", config: Optional[QuantConfig] = None) -> torch.Tensor:
    raise NotImplementedError
