"""Compressed wrappers of the basic torch / PyG layers.

Each wrapper subclasses the module it replaces and shares its Parameters
(see :class:`~blockquant.nn.registry.CompressedModule`). In ``eval()`` or
under ``torch.no_grad()`` it runs the original ``forward`` unchanged; in
training it calls the matching :mod:`blockquant.functional` op, whose output
equals the original's (bit for bit, except dropout, which draws its mask from
its own RNG stream with the same probability and scaling).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as BF
from .registry import CompressedModule, register_wrapper

try:
    from torch_geometric.nn.dense.linear import Linear as _PyGLinear
    from torch_geometric.nn.norm import BatchNorm as _PyGBatchNorm
except Exception:  # pragma: no cover - PyG is a hard dependency of the package, but keep nn importable
    _PyGLinear = _PyGBatchNorm = None

__all__ = ["QLinear", "QPyGLinear", "QBatchNorm1d", "QPyGBatchNorm", "QLayerNorm", "QReLU", "QLeakyReLU",
           "QELU", "QGELU", "QDropout"]


@register_wrapper(nn.Linear)
class QLinear(CompressedModule, nn.Linear):
    """:class:`torch.nn.Linear` storing its input compressed (random projection per config)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.compressing():
            return super().forward(input)
        return BF.linear(input, self.weight, self.bias, self.bq_config)


def _uninitialized(p) -> bool:
    return isinstance(p, nn.parameter.UninitializedParameter)


if _PyGLinear is not None:

    @register_wrapper(_PyGLinear)
    class QPyGLinear(CompressedModule, _PyGLinear):
        """PyG's :class:`torch_geometric.nn.dense.linear.Linear` storing its input compressed.

        A lazily initialised layer (``in_channels=-1``) is refused until it has
        seen one forward pass (``convert`` leaves it exact and says so).
        """

        def __repr__(self) -> str:  # PyG builds this repr itself (no extra_repr): append the config
            return f"{super().__repr__()[:-1]}, bq={self.bq_config.short()})"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.compressing() or _uninitialized(self.weight):
                return super().forward(x)
            return BF.linear(x, self.weight, self.bias, self.bq_config)
else:  # pragma: no cover
    QPyGLinear = None


@register_wrapper(nn.BatchNorm1d)
class QBatchNorm1d(CompressedModule, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` storing its input compressed (no projection) plus batch statistics."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.compressing() or input.numel() == 0:  # empty (no nodes): nothing to keep, torch's own handling
            return super().forward(input)
        self._check_input_dim(input)
        # the same momentum / num_batches_tracked / bn_training logic as torch's _BatchNorm.forward
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return BF.batch_norm(input, self.running_mean if use_running else None,
                             self.running_var if use_running else None, self.weight, self.bias,
                             bn_training, momentum, self.eps, self.bq_config)


if _PyGBatchNorm is not None:

    @register_wrapper(_PyGBatchNorm)
    class QPyGBatchNorm(CompressedModule, _PyGBatchNorm):
        """PyG's :class:`torch_geometric.nn.norm.BatchNorm`: it wraps a
        ``torch.nn.BatchNorm1d`` (``self.module``), which is swapped for a
        :class:`QBatchNorm1d` sharing the same parameters and buffers (the
        original PyG module keeps its own plain child).

        The inner module is what holds the compressed input, so :func:`blockquant.convert`
        visits it like any child (``bq_convert_children``): a config given for
        ``"norms.0"`` reaches ``"norms.0.module"`` by name, one given for
        ``torch.nn.BatchNorm1d`` by type, and ``None`` for either leaves it exact."""

        bq_convert_children = ("module",)

        def _bq_init(self) -> None:
            inner = self._modules.get("module")
            if type(inner) is nn.BatchNorm1d:
                self._modules = dict(self._modules)  # do not touch the original module's children
                self._modules["module"] = QBatchNorm1d.from_module(inner, self.bq_config)

        def to_original(self) -> nn.Module:
            orig = super().to_original()
            inner = orig._modules.get("module")
            if isinstance(inner, CompressedModule):  # the plain BatchNorm1d again (same parameters)
                orig._modules = dict(orig._modules)
                orig._modules["module"] = inner.to_original()
            return orig
else:  # pragma: no cover
    QPyGBatchNorm = None


@register_wrapper(nn.LayerNorm)
class QLayerNorm(CompressedModule, nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` storing its input compressed (no projection) plus row statistics."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.compressing():
            return super().forward(input)
        return BF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, self.bq_config)


@register_wrapper(nn.ReLU)
class QReLU(CompressedModule, nn.ReLU):
    """:class:`torch.nn.ReLU` storing a 1-bit sign mask (``inplace`` is ignored in training)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.compressing():
            return super().forward(input)
        return BF.relu(input)


@register_wrapper(nn.LeakyReLU)
class QLeakyReLU(CompressedModule, nn.LeakyReLU):
    """:class:`torch.nn.LeakyReLU` storing a 1-bit sign mask (``inplace`` is ignored in training)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.compressing():
            return super().forward(input)
        return BF.leaky_relu(input, self.negative_slope)


@register_wrapper(nn.ELU)
class QELU(CompressedModule, nn.ELU):
    """:class:`torch.nn.ELU` storing its input compressed (``inplace`` is ignored in training)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.compressing():
            return super().forward(input)
        return BF.elu(input, self.alpha, self.bq_config)


@register_wrapper(nn.GELU)
class QGELU(CompressedModule, nn.GELU):
    """:class:`torch.nn.GELU` storing its input compressed."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.compressing():
            return super().forward(input)
        return BF.gelu(input, self.approximate, self.bq_config)


@register_wrapper(nn.Dropout)
class QDropout(CompressedModule, nn.Dropout):
    """:class:`torch.nn.Dropout` that stores only an RNG seed for backward
    (same drop probability and ``1 / (1 - p)`` scaling; its own RNG stream)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.compressing():
            return super().forward(input)
        return BF.dropout(input, self.p, True)
