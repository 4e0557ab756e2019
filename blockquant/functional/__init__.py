"""Autograd operations that keep compressed tensors for backward.

Every forward here is computed exactly (it calls the same ATen op as
``torch.nn.functional``, so outputs are bit-identical); only what is *saved*
for backward changes. Each Function's docstring lists what it saves, and it
saves nothing a requested gradient does not need (``ctx.needs_input_grad``).

Memory accounting convention (read by :func:`blockquant.track_saved`): a
Function keeps its compressed state in ``ctx.bq_state``, a tuple of objects
that are tensors or have ``.storages()`` (:class:`~blockquant.PackedTensor`,
:class:`~blockquant.kernels.bitmask.BitMask`); plain tensors that are resident
anyway (parameters, the input features) go through ``ctx.save_for_backward``.

What each op keeps of its inputs (by reference when resident, compressed once and
shared, compressed independently, or exact when backward is not linear in it) is
decided by one rule, :func:`blockquant.save_policy.keep`; its module docstring
states it. :func:`is_resident`, :func:`mark_resident` and :func:`compress_shared`
are re-exported here from :mod:`blockquant.save_policy`.

One module per op family: :mod:`~blockquant.functional.linear_map` (``linear``),
:mod:`~blockquant.functional.aggregation` (``aggregate``, ``aggregate_linear``),
:mod:`~blockquant.functional.masked` (``relu``, ``leaky_relu``, ``dropout``),
:mod:`~blockquant.functional.normalization` (``batch_norm``, ``layer_norm``),
:mod:`~blockquant.functional.smooth` (``elu``, ``gelu``, ``sigmoid``, ``tanh``); the helpers they share are in
:mod:`~blockquant.functional._common`. Every name is importable from here.
"""
from __future__ import annotations

from blockquant.kernels.bitmask import BitMask

from ..save_policy import compress_shared, is_resident, mark_resident
from .aggregation import aggregate, aggregate_linear
from .linear_map import linear
from .masked import dropout, leaky_relu, relu
from .normalization import batch_norm, layer_norm
from .smooth import elu, gelu, sigmoid, tanh

# not in __all__, but importable from here as they were from the single module this package replaces
from ._common import DOUBLE_BACKWARD_MESSAGE  # noqa: F401
from .masked import _dropout_noise  # noqa: F401
from .normalization import SideRounding, SquareSample, _EstimatorChunks, square_estimator_nbytes  # noqa: F401

__all__ = [
    "linear", "aggregate", "aggregate_linear", "relu", "leaky_relu", "dropout", "batch_norm", "layer_norm", "elu",
    "gelu", "sigmoid", "tanh", "compress_shared", "is_resident", "mark_resident", "BitMask",
]
