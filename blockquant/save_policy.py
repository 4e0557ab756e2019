"""What blockquant keeps of a tensor for backward: the one rule, and its one entry point, :func:`keep`.

Every autograd op in :mod:`blockquant.functional` and :mod:`blockquant.attention` that keeps a
tensor (or a function of it) for a linear use in backward, and the hooks of
:func:`blockquant.compress_saved_tensors`, ask :func:`keep` what to hold. What is held is one of:

1. **The tensor itself, by reference**, when it is *resident* (:func:`is_resident`): a parameter,
   a leaf that requires grad, a tensor marked with :func:`mark_resident` (a converted model marks
   the tensors without ``grad_fn`` passed to its ``forward``, e.g. ``data.x`` and ``edge_index``, for
   the duration of the call: :func:`resident_during`), or a view of one of those. Its owner holds it
   for the whole step anyway, so a reference costs nothing and a compressed copy would *add* memory.
   Having no ``grad_fn`` is not enough: ``dropout(data.x)`` has none either, yet it is a fresh tensor
   that only the graph would keep alive.
2. **Compressed once and shared** (:func:`compress_shared`), for an intermediate (a tensor with a
   ``grad_fn``) that several ops of one forward save (SAGE's ``x`` feeds the aggregation and
   ``lin_r``): one compression per (tensor, version, config, dtype). A non-resident tensor without
   ``grad_fn`` is compressed afresh at every use: sharing it across steps would repeat the same
   rounding noise in every step.
3. **Compressed independently** (``shared=False``), where backward multiplies two quantities that
   come from the same tensor (GATv2's attention gradient; every save of
   :func:`~blockquant.compress_saved_tensors`): a product of one rounding with itself is biased.
4. **Kept exact**, when the op's backward is not linear in the tensor (softmax outputs, attention
   coefficients, the 1-bit sign masks of ReLU): stochastic rounding is unbiased only where backward
   uses the rounded tensor linearly. That choice is the op's (for the hooks: their allow-list of
   ops), and such tensors never reach :func:`keep`. Ops that need a non-linear function of the input
   (ELU/GELU's derivative, a normalisation's ``xn``) compute it exactly in forward and keep *that*
   compressed (``instead=``), or the input itself when it is resident.

Random projection (``config.rp_ratio > 1``) is applied only where backward uses the tensor in a
matrix product with the weight gradient (:func:`blockquant.functional.linear`); everywhere else
:func:`keep` is called with ``projection=False`` (:func:`without_projection`).

Residency is a flag on the tensor object itself (an attribute), not a registry: it goes away with
the tensor (nothing leaks), and ``torch.compile`` reads it without a graph break. Copies made with
``copy.deepcopy`` or ``torch.save``/``torch.load`` carry the flag (their owner holds them too);
``clone()`` and every op result do not. One limit under ``torch.compile``: a view taken *inside* the
compiled region of a marked tensor reads as not resident (dynamo does not expose the base's
attributes), so it is compressed, which costs its compressed size and never biases a gradient;
the same holds for every view inside a compiled graph (its ``_base`` cannot be read there);
parameters, leaves that require grad and marked tensors themselves are recognised.

Large 2-D tensors are compressed in row blocks (:class:`RowChunks`) so that the codec's transients
stay at :func:`chunk_elements` elements whatever the graph's size.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch

from ._compat import WeakIdKeyDictionary, tensor_version, view_base
from .config import QuantConfig
from .packed import PackedTensor, quantize
from .projection import stored_width

__all__ = ["keep", "keep_for_ctx", "is_resident", "mark_resident", "resident_during", "compress_shared", "compress",
           "without_projection", "RowChunks", "CHUNK_ELEMENTS", "chunk_elements", "row_blocks", "rows_per_chunk"]

#: Largest number of elements of one transient in chunked loops, per device type. They are the ``[chunk, F]``
#: gathers of max aggregation and edge-weight gradients, the per-edge transients of attention, and
#: the row blocks compressed (and decoded for weight gradients) at once, whatever the graph's size.
#: CPU: 1M elements (4 MiB in float32), sized for its caches. CUDA: 16M elements (64 MiB in
#: float32): one codec launch then runs 4096 programs of 4096 elements, about two full waves of an
#: H100 at full occupancy, where 1M would be a eighth of one. Other devices: the CPU's size.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}


def chunk_elements(device: Union[torch.device, str]) -> int:
    """Elements of one chunk for tensors on ``device`` (:data:`CHUNK_ELEMENTS`)."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return CHUNK_ELEMENTS.get(kind, CHUNK_ELEMENTS["cpu"])

Compressed = Union[PackedTensor, "RowChunks"]

# ----------------------------------------------------------------------------- residency

_RESIDENT_FLAG = "_blockquant_resident"


def mark_resident(*tensors: torch.Tensor) -> None:
    """Declare tensors that stay alive anyway (the graph's features, say), so compressed
    ops save them by reference instead of storing a compressed copy.

    A model converted by :func:`blockquant.convert` marks the tensors passed to its training
    ``forward`` that have no ``grad_fn`` (the features, the graph) for the duration of that call
    (:func:`resident_during`). The mark is an attribute of the tensor object: it goes away with
    the tensor. Arguments that are not tensors are ignored.
    """
    for t in tensors:
        if isinstance(t, torch.Tensor):
            setattr(t, _RESIDENT_FLAG, True)


@contextlib.contextmanager
def resident_during(*tensors: torch.Tensor) -> Iterator[None]:
    """Treat ``tensors`` as resident for the duration of the block (a converted model does this
    for the tensors without ``grad_fn`` passed to its training ``forward``). A compressed op that
    saved one by reference while the block ran keeps it by reference. Blocks nest; a tensor
    marked with :func:`mark_resident` stays marked."""
    enter_resident_call(tensors)
    try:
        yield
    finally:
        leave_resident_call(tensors)


# a counter rather than a flag, so that nested calls on the same tensor unwind correctly; updated
# with setattr only, which torch.compile traces (a delattr breaks its graph)
_CALL_COUNT = "_blockquant_resident_calls"


def enter_resident_call(tensors) -> None:
    """Start of a call during which ``tensors`` are resident (:func:`resident_during`)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            setattr(t, _CALL_COUNT, getattr(t, _CALL_COUNT, 0) + 1)


def leave_resident_call(tensors) -> None:
    """End of the call started by :func:`enter_resident_call` with the same tensors."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            count = getattr(t, _CALL_COUNT, 0)
            if count > 0:
                setattr(t, _CALL_COUNT, count - 1)


def _held_anyway(t: torch.Tensor) -> bool:
    return (isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad)
            or getattr(t, _RESIDENT_FLAG, False) is True or getattr(t, _CALL_COUNT, 0) > 0)


def is_resident(t: torch.Tensor) -> bool:
    """True when saving ``t`` by reference costs nothing extra: it is a parameter, a
    leaf that requires grad (held by the caller), a tensor marked with
    :func:`mark_resident`, or a view of one of those (e.g. ``weight.t()``).

    A tensor without ``grad_fn`` is not enough: ``dropout(data.x)`` or an
    aggregation of ``data.x`` has none either, yet it is a fresh intermediate
    that only the graph would keep alive. Guessing wrong that way would keep a
    full-precision copy; guessing wrong the other way only compresses a tensor
    that was resident, which costs its compressed size.
    """
    if _held_anyway(t):
        return True
    if torch.compiler.is_compiling():
        # a view's ``_base`` is not readable inside a compiled graph (AOTAutograd's functional
        # trace replays the lookup and gets None): a view is compressed there, which costs its
        # compressed size and never biases a gradient
        return False
    base = view_base(t)
    return base is not None and _held_anyway(base)


# ----------------------------------------------------------------------------- compression

def without_projection(config: QuantConfig) -> QuantConfig:
    """``config`` with random projection off. Projection is unbiased and cheap only where the
    tensor enters backward linearly through a matrix product (a linear layer's weight gradient);
    elementwise, normalisation, per-edge and attention uses get the plain codec."""
    return config if config.rp_ratio == 1 else config.replace(rp_ratio=1)


class RowChunks:
    """A 2-D tensor compressed as consecutive row blocks, each an independent packed tensor
    (own rounding seed, own projection seed), so that neither compressing nor decoding ever
    needs more than one block's transients. Row blocks hold a whole number of codec blocks,
    so payload and metadata take exactly the bytes of a single packed tensor.

    :meth:`dequantize` decodes everything (elementwise users need the whole input);
    :meth:`left_matmul` decodes one block at a time (linear users: weight gradients).
    """

    __slots__ = ("parts", "bounds", "shape", "dtype", "device")

    def __init__(self, parts, bounds, shape, dtype, device):
        self.parts = parts
        self.bounds = bounds
        self.shape = shape
        self.dtype = dtype
        self.device = device

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def storages(self):
        return tuple(t for p in self.parts for t in p.storages())

    def chunks(self):
        """``(row_start, row_stop, part)`` for every row block."""
        return ((a, b, p) for (a, b), p in zip(self.bounds, self.parts))

    def dequantize(self) -> torch.Tensor:
        """The whole decoded tensor, decoded one row block at a time."""
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        for a, b, p in self.chunks():
            out[a:b] = p.dequantize().view(b - a, *self.shape[1:])
        return out

    def left_matmul(self, a: torch.Tensor) -> torch.Tensor:
        """``a @ x_hat`` (``a``: ``[k, rows]``), summed over row blocks: never a whole decoded ``x``."""
        out = None
        for lo, hi, part in self.chunks():
            term = part.left_matmul(a[:, lo:hi])
            out = term if out is None else out.add_(term)
        return out


def compress_whole(x: torch.Tensor, config: QuantConfig) -> PackedTensor:
    """Compress ``x`` as one packed tensor (see :func:`compress` for large 2-D tensors)."""
    return quantize(x.detach(), config)


def rows_per_chunk(width: int, config: QuantConfig, device: Union[torch.device, str] = "cpu") -> int:
    """Rows of a 2-D tensor of ``width`` columns on ``device`` compressed at once: about
    :func:`chunk_elements` elements, and a whole number of codec blocks."""
    stored = stored_width(width, config.rp_ratio)
    block = config.block_size_for(stored)
    unit = block // math.gcd(block, stored)  # rows holding a whole number of blocks
    return max(unit, (chunk_elements(device) // max(width, 1)) // unit * unit)


def row_blocks(shape, config: QuantConfig, device: Union[torch.device, str] = "cpu") -> List[Tuple[int, int]]:
    """Row ranges ``[(start, stop), ...]`` in which a tensor of ``shape`` on ``device`` is compressed:
    blocks of :func:`rows_per_chunk` rows for a 2-D tensor of more than :func:`chunk_elements`
    elements, else one range over all rows."""
    shape = tuple(int(s) for s in shape)
    n = shape[0] if shape else 1
    if len(shape) != 2 or math.prod(shape) <= chunk_elements(device):
        return [(0, n)]
    rows = rows_per_chunk(shape[1], config, device)
    if rows >= n:
        return [(0, n)]
    return [(a, min(a + rows, n)) for a in range(0, n, rows)]


def compress(x: torch.Tensor, config: QuantConfig) -> Compressed:
    """Compress ``x`` with ``config``, independently of any other compression of it; a large 2-D
    tensor is compressed in row blocks (:class:`RowChunks`, :func:`row_blocks`) so the codec's
    transients stay at :func:`chunk_elements` elements whatever the graph's size."""
    if x.dim() != 2 or not x.is_floating_point():
        return compress_whole(x, config)
    bounds = row_blocks(x.shape, config, x.device)
    if len(bounds) == 1:
        return compress_whole(x, config)
    x = x.detach()
    parts = [compress_whole(x[a:b], config) for a, b in bounds]
    return RowChunks(parts, bounds, x.shape, x.dtype, x.device)


# tensor -> {(version, config, dtype): compressed}. Weak on the tensor: an entry goes
# away with its tensor, so nothing here outlives the activation it describes.
_SHARED: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def compress_shared(x: torch.Tensor, config: QuantConfig, *, dtype: Optional[torch.dtype] = None) -> Compressed:
    """Compress ``x`` with ``config``, reusing an earlier result for the same tensor
    object, unchanged (same ``_version``) and the same config. With ``dtype``,
    ``x`` is cast to it first (autocast: the dtype the op computed in); the
    result decodes to ``dtype`` and is shared per ``dtype``.

    Only intermediates (tensors with a ``grad_fn``) are shared: they are rebuilt
    every step, so a shared result never outlives the graph it serves. A
    long-lived tensor without ``grad_fn`` that is not resident is compressed
    afresh each time; reusing it would repeat the same rounding noise in every
    step, and its gradient error would never average out.

    Under ``torch.compile`` nothing is shared: the table is keyed on tensor identity (a weak
    dictionary dynamo cannot trace, and ``grad_fn`` is not readable inside a compiled graph),
    so every use compresses afresh, which costs one more compressed copy where a tensor feeds
    two compressing ops and never biases a gradient.
    """
    source = x if dtype is None or dtype == x.dtype else x.detach().to(dtype)
    if torch.compiler.is_compiling() or x.grad_fn is None:
        return compress(source, config)
    key = (tensor_version(x), config, source.dtype)
    per_tensor = _SHARED.get(x)
    if per_tensor is not None:
        hit = per_tensor.get(key)
        if hit is not None:
            return hit
    else:
        per_tensor = {}
        _SHARED[x] = per_tensor
    packed = compress(source, config)
    # entries for older versions can never hit again
    for stale in [k for k in per_tensor if k[0] != tensor_version(x)]:
        del per_tensor[stale]
    per_tensor[key] = packed
    return packed


# ----------------------------------------------------------------------------- the entry point

def keep(x: torch.Tensor, config: QuantConfig, *, projection: bool = True, shared: bool = True,
         dtype: Optional[torch.dtype] = None, instead: Optional[Callable[[], object]] = None):
    """What to hold of ``x`` for a backward that uses it linearly (the rule: module docstring).

    Returns ``x`` itself when it is resident (save it with ``ctx.save_for_backward``: by
    reference, 0 B), else what to hold instead: ``instead()`` when given (an op that keeps a
    compressed function of ``x``, such as ELU's derivative, which backward recomputes exactly
    from a resident ``x``), otherwise ``x`` compressed with ``config`` (with random projection
    only if ``projection``; shared with other ops of the same forward if ``shared``, else an
    independent rounding; cast to ``dtype`` first when given, e.g. autocast's compute dtype).
    A compressed result has ``dequantize()``, ``nbytes`` and ``storages()``.
    """
    if is_resident(x):
        return x
    if instead is not None:
        return instead()
    cfg = config if projection else without_projection(config)
    if shared:
        return compress_shared(x, cfg, dtype=dtype)
    return compress(x if dtype is None or dtype == x.dtype else x.detach().to(dtype), cfg)


def keep_for_ctx(ctx, x: torch.Tensor, config: QuantConfig, **options) -> Tuple[List[torch.Tensor], Tuple]:
    """:func:`keep` for an ``autograd.Function``: ``([x], ())`` when ``x`` is kept by reference
    (put into ``ctx.save_for_backward``), else ``([], state)`` with the compressed object(s) for
    ``ctx.bq_state`` (a tuple returned by ``instead`` is the state as it is). Sets ``ctx.bq_ref``."""
    kept = keep(x, config, **options)
    ctx.bq_ref = kept is x
    if ctx.bq_ref:
        return [x], ()
    return [], (kept if isinstance(kept, tuple) else (kept,))
