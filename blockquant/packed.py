"""The public codec: :func:`quantize` and the :class:`PackedTensor` it returns.

The codec itself runs as three ``torch.library`` custom ops (namespace
``blockquant``): ``quantize``, ``dequantize`` and ``projection``. Each has a
fake (shape-only) implementation, so ``torch.compile`` traces a compressing
model through them without a graph break. They call the block codec
(:mod:`blockquant.kernels.ops`: one kernel per device type, chosen by the dispatcher).

Seeds are host scalars by design: 0-d int64 CPU tensors, never on a device, read only
through :func:`seed_value`. Reading one never waits for a device, so a training step's
only device-to-host read here is the finiteness check (see :func:`defer_finite_check`).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
import sys
from typing import Iterator, List, Optional, Tuple, Union

import torch

from blockquant.kernels.ops import dequantize_blockwise, quantize_blockwise
from blockquant.kernels.reference import payload_bytes
from blockquant.kernels.registry import forced_backend

from ._compat import custom_op
from .config import QuantConfig
from .distributed import process_rank, rank_seed
from .levels import optimal_levels
from .projection import rademacher, stored_width
from .seeds import active_stream, seed_value  # noqa: F401 - seed_value: importable from here too

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Dtypes the codec backends encode and decode."""
INPUT_DTYPES = SUPPORTED_DTYPES + (torch.float64,)
"""Dtypes :func:`quantize` accepts: float64 is encoded through float32 (see :func:`quantize`)."""
_SEED_MASK = (1 << 62) - 1
# the projection's seed is the rounding seed XOR this (62-bit) constant: tensor arithmetic
# without overflow, so it is computed inside a compiled graph as well as eagerly
_PROJ_SEED_SALT = 0x232BE59BD9B4E019


def draw_seed() -> int:
    """A fresh seed from PyTorch's default CPU generator (so ``torch.manual_seed`` reproduces runs).

    Uses the CPU generator on purpose: no device synchronisation. Under
    ``torch.distributed`` the draw is mixed with the process's rank
    (:func:`blockquant.distributed.rank_seed`): ranks seeded alike get
    independent noise; rank 0 gets the single-process seeds.
    """
    return rank_seed(int(torch.randint(0, 1 << 62, (1,), dtype=torch.int64).item()), process_rank())


def draw_seed_tensor(purpose: str = "codec") -> torch.Tensor:
    """:func:`draw_seed` as a 0-d int64 CPU tensor: the same draw and the same value eagerly,
    and under ``torch.compile`` a random op inside the graph instead of a ``.item()`` graph break.

    Inside a converted model's training forward the seed is derived instead, from the one draw
    that forward made and a counter per ``purpose`` (``"codec"`` or ``"dropout"``): see
    :mod:`blockquant.seeds`."""
    stream = active_stream()
    if stream is not None:
        return torch.tensor(stream.next(purpose), dtype=torch.int64)
    seed = torch.randint(0, 1 << 62, (1,), dtype=torch.int64).view(())
    rank = process_rank()
    return seed if rank == 0 else _rank_seed_op(seed, rank)


def as_seed_tensor(seed: Union[int, torch.Tensor]) -> torch.Tensor:
    """A user's seed (a Python int or an integer tensor) as the codec's 0-d int64 CPU tensor in ``[0, 2**62)``."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise TypeError(f"blockquant.quantize expects seed to be an int or a one-element integer tensor; "
                            f"got a {seed.dtype} tensor of shape {tuple(seed.shape)}")
        return seed.reshape(()).to(device="cpu", dtype=torch.int64) & _SEED_MASK
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"blockquant.quantize expects seed to be an int or a one-element integer tensor; "
                        f"got {type(seed).__name__}")
    return torch.tensor(seed & _SEED_MASK, dtype=torch.int64)


def projection_seed(seed: torch.Tensor) -> torch.Tensor:
    """The random projection's seed, derived from the rounding seed (a 0-d int64 tensor)."""
    return seed ^ _PROJ_SEED_SALT


# ----------------------------------------------------------------------------
# the codec as custom ops (eager: the registered backend; compiled: an opaque call)
# ----------------------------------------------------------------------------

@custom_op("blockquant::rank_seed", mutates_args=())
def _rank_seed_op(seed: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.tensor(rank_seed(seed_value(seed), rank), dtype=torch.int64)


@_rank_seed_op.register_fake
def _(seed, rank):
    return torch.empty((), dtype=torch.int64)


@torch.compiler.assume_constant_result
def _levels_for(bits: int, block: int, optimal: bool) -> Optional[List[float]]:
    # a pure function of its arguments, solved once (lru_cache) by an optimizer that needs autograd:
    # outside the op (whose body runs below autograd) and, under torch.compile, a constant of the graph
    return list(optimal_levels(bits, block)) if optimal else None


def stored_shape(shape, config: QuantConfig) -> Tuple[int, ...]:
    """Shape of what :func:`quantize` encodes for a tensor of ``shape``: the last dimension
    becomes :func:`blockquant.projection.stored_width` (the projected width, when projected)."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return shape
    return shape[:-1] + (stored_width(shape[-1], config.rp_ratio),)


def packed_nbytes(shape, config: QuantConfig) -> int:
    """Exact bytes :func:`quantize` holds for a tensor of ``shape`` (:attr:`~blockquant.PackedTensor.nbytes`):
    the packed codes of the stored (projected, if projected) tensor plus two ``meta_dtype``
    values per block. The codec's byte formula; :func:`blockquant.tune` plans with it."""
    stored = stored_shape(shape, config)
    n = math.prod(stored)
    if n == 0:
        return 0
    block = config.block_size_for(stored[-1] if stored else 1)
    meta_item = torch.empty((), dtype=config.meta_dtype, device="meta").element_size()
    return payload_bytes(n, block, config.bits) + 2 * (-(-n // block)) * meta_item


@custom_op("blockquant::projection", mutates_args=())
def _projection_op(proj_seed: torch.Tensor, in_dim: int, out_dim: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    return rademacher(in_dim, out_dim, seed_value(proj_seed), device, dtype)


@_projection_op.register_fake
def _(proj_seed, in_dim, out_dim, device, dtype):
    return torch.empty((in_dim, out_dim), device=device, dtype=dtype)


@custom_op("blockquant::quantize", mutates_args=())
def _quantize_op(x: torch.Tensor, seed: torch.Tensor, bits: int, block: int, meta_dtype: torch.dtype,
                 levels: Optional[List[float]], stochastic: bool, proj_dim: int, check_finite: bool,
                 backend: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode non-empty ``x`` (projected to ``proj_dim`` columns first when ``proj_dim > 0``);
    returns ``(payload, meta, projection seed)``. With ``check_finite``, non-finite metadata raises
    ``ValueError`` here.

    The projection seed comes out of the op (rather than being computed beside it) so that a
    compiled graph saves it for backward like the codes: traced beside the op, the random draw
    it derives from could be replayed in the backward graph, giving another projection.
    """
    data = x
    if proj_dim:
        d = x.shape[-1]
        p = rademacher(d, proj_dim, seed_value(projection_seed(seed)), x.device, torch.float32)
        data = (x.reshape(-1, d).to(torch.float32) @ p).to(x.dtype)
    flat = data.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    payload, meta = quantize_blockwise(flat, block, bits, meta_dtype, levels, stochastic, seed_value(seed), backend)
    if check_finite and not bool(torch.isfinite(meta).all()):
        _raise_non_finite(x if not bool(torch.isfinite(x).all()) else data, meta_dtype)
    assert payload.numel() == payload_bytes(n, block, bits), "backend returned a malformed payload"
    return payload, meta, projection_seed(seed)


@_quantize_op.register_fake
def _(x, seed, bits, block, meta_dtype, levels, stochastic, proj_dim, check_finite, backend):
    n = x.numel() if proj_dim == 0 else x.numel() // x.shape[-1] * proj_dim  # proj_dim: quantize's stored width
    nb = (n + block - 1) // block
    return (x.new_empty(payload_bytes(n, block, bits), dtype=torch.uint8), x.new_empty((2, nb), dtype=meta_dtype),
            torch.empty((), dtype=torch.int64))


@custom_op("blockquant::dequantize", mutates_args=())
def _dequantize_op(payload: torch.Tensor, meta: torch.Tensor, n: int, bits: int, block: int,
                   levels: Optional[List[float]], out_dtype: torch.dtype, backend: Optional[str]) -> torch.Tensor:
    """Decode ``n`` values (flat, ``out_dtype``) from a payload and metadata made by ``blockquant::quantize``."""
    return dequantize_blockwise(payload, meta, n, block, bits, levels, out_dtype, backend)


@_dequantize_op.register_fake
def _(payload, meta, n, bits, block, levels, out_dtype, backend):
    return payload.new_empty(n, dtype=out_dtype)


def storage_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the storages behind ``tensors``, each at its full size (a view holds all of its storage)."""
    return sum(int(t.untyped_storage().nbytes()) for t in tensors)


class PackedTensor:
    """A tensor stored in block-wise low-bit form.

    Holds the packed codes (``payload``), per-block metadata (``meta``, shape
    ``(2, num_blocks)``: lower bound and step), the rounding ``seed`` and, when
    a random projection was applied, only the projection's seed
    (``proj_seed``); both seeds are 0-d int64 CPU tensors. :meth:`dequantize`
    returns a tensor of the original shape and dtype (the back-projected
    estimate when projected); :meth:`left_matmul` multiplies by it without
    decoding a projected tensor to full width.
    """

    __slots__ = ("payload", "meta", "shape", "dtype", "config", "block", "seed",
                 "proj_seed", "proj_dims", "backend")

    def __init__(self, payload, meta, shape, dtype, config, block, seed, proj_seed=None,
                 proj_dims=None, backend=None):
        self.payload = payload
        self.meta = meta
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.config = config
        self.block = block
        self.seed = seed
        self.proj_seed = proj_seed
        self.proj_dims = proj_dims  # (in_dim, out_dim) when projected
        self.backend = backend

    # ---------------------------------------------------------------- sizes
    @property
    def bits(self) -> int:
        return self.config.bits

    @property
    def device(self) -> torch.device:
        return self.payload.device

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def stored_shape(self) -> torch.Size:
        """Shape of the tensor whose codes are stored (the projected one, if projected)."""
        if self.proj_dims is None:
            return self.shape
        return torch.Size((*self.shape[:-1], self.proj_dims[1]))

    @property
    def nbytes(self) -> int:
        """Exact bytes of every buffer held, counted by whole storages (codes, metadata and padding)."""
        return storage_bytes(self.payload, self.meta)

    def storages(self):
        """The tensors whose storages this object keeps alive (for memory accounting)."""
        return (self.payload, self.meta)

    def __repr__(self) -> str:
        proj = f", projected={self.proj_dims[0]}->{self.proj_dims[1]}" if self.proj_dims else ""
        return (f"PackedTensor(bits={self.bits}, block_size={self.block}, shape={tuple(self.shape)}, "
                f"dtype={self.dtype}, nbytes={self.nbytes}{proj}, levels={self.config.levels!r})")

    # -------------------------------------------------------------- decoding
    def projection(self, dtype=None) -> torch.Tensor:
        """The ``in_dim x out_dim`` projection matrix, regenerated from its seed."""
        if self.proj_dims is None:
            raise ValueError("this PackedTensor was stored without random projection")
        return _projection_op(self.proj_seed, *self.proj_dims, self.device, dtype or torch.float32)

    def dequantize_stored(self) -> torch.Tensor:
        """Decode the stored codes only (the projected tensor when projected)."""
        shape = self.stored_shape
        n = shape.numel()
        if n == 0:
            return torch.empty(shape, dtype=self.dtype, device=self.device)
        decoded = self.dtype if self.dtype in SUPPORTED_DTYPES else torch.float32  # float64: through float32
        levels = _levels_for(self.bits, self.block, self.config.levels == "optimal")
        flat = _dequantize_op(self.payload, self.meta, n, self.bits, self.block, levels, decoded, self.backend)
        return flat.view(shape).to(self.dtype)

    def dequantize(self) -> torch.Tensor:
        """Unbiased reconstruction with the original shape and dtype (``stored @ P^T`` when projected)."""
        stored = self.dequantize_stored()
        if self.proj_dims is None:
            return stored
        acc = torch.promote_types(self.dtype, torch.float32)
        return (stored.to(acc) @ self.projection(acc).t()).to(self.dtype)

    def left_matmul(self, a: torch.Tensor) -> torch.Tensor:
        """``a @ x_hat`` in ``a``'s dtype, ``x_hat`` the decoded tensor viewed as ``[-1, shape[-1]]``
        (``a``: ``[k, rows]``); when projected, ``(a @ stored) @ P^T``, which never decodes ``x_hat``
        to full width (a linear layer's weight gradient ``g^T x_hat``)."""
        if self.proj_dims is None:
            return a @ self.dequantize().reshape(-1, self.shape[-1]).to(a.dtype)
        stored = self.dequantize_stored().reshape(-1, self.proj_dims[1]).to(a.dtype)
        return (a @ stored) @ self.projection(a.dtype).t()

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes of the stored tensor, flat (for inspection and tests)."""
        from blockquant.kernels.reference import codes_torch

        return codes_torch(self.payload, self.stored_shape.numel(), self.block, self.bits)


def _check_input(x, config) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"blockquant.quantize expects a torch.Tensor; got {type(x).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"blockquant.quantize expects a QuantConfig; got {type(config).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"blockquant.quantize expects a float32, float16, bfloat16 or float64 tensor; got {x.dtype}")


def _raise_non_finite(x: torch.Tensor, meta_dtype: torch.dtype) -> None:
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise ValueError(
            f"blockquant.quantize: input of shape {tuple(x.shape)} has {bad} non-finite value(s) (NaN or Inf); "
            "activations must be finite to be compressed (check the learning rate or the input data)")
    raise ValueError(
        f"blockquant.quantize: the input's range (max |x| = {x.abs().max().item():.4g}) does not fit the "
        f"{meta_dtype} block metadata; use QuantConfig(meta_dtype=torch.bfloat16) or torch.float32")


class FiniteCheck:
    """Deferred finiteness check of the tensors quantized while it is active.

    Each ``quantize`` call records, on the tensor's device, whether all of its
    block metadata is finite (a NaN or Inf input, or a range the metadata
    dtype cannot hold, makes it non-finite), with where it was saved (the op and
    the converted module, see ``_saving_site``); :meth:`check` reads all those
    flags with one device synchronisation per device and raises if any is false.
    """

    def __init__(self, owner: Optional[torch.nn.Module] = None) -> None:
        self.owner = owner  # the converted model whose forward opened it (None: defer_finite_check)
        self._token: Optional[contextvars.Token] = None
        self._flags: List[torch.Tensor] = []
        self._what: List[Tuple[Tuple[int, ...], torch.dtype, torch.dtype, str]] = []

    def record(self, meta: torch.Tensor, shape, dtype: torch.dtype, meta_dtype: torch.dtype) -> None:
        self._flags.append(torch.isfinite(meta).all())  # stays on the device: no synchronisation
        self._what.append((tuple(shape), dtype, meta_dtype, _saving_site()))

    def __len__(self) -> int:
        return len(self._flags)

    def check(self) -> None:
        """Raise ``ValueError`` if any recorded tensor was not finite; forget the recorded flags."""
        flags, what = self._flags, self._what
        self._flags, self._what = [], []
        if not flags:
            return
        by_device = {}
        for i, f in enumerate(flags):
            by_device.setdefault(f.device, []).append(i)
        bad: List[int] = []
        for idx in by_device.values():
            together = torch.stack([flags[i] for i in idx])
            if bool(together.all()):  # the one synchronisation per device
                continue
            bad += [i for i, good in zip(idx, together.tolist()) if not good]  # only on the error path
        if bad:
            first = min(bad)
            shape, dtype, meta_dtype, site = what[first]
            raise ValueError(
                f"blockquant.quantize (deferred check): {len(bad)} of {len(flags)} tensors quantized since the "
                f"last check had non-finite values (NaN or Inf) or a range their block metadata cannot hold; "
                f"the first was call {first + 1}, shape {shape}, {dtype}, metadata {meta_dtype}{site} "
                "(check the learning rate or the input data, or use meta_dtype=torch.bfloat16 or float32)")


def _saving_site() -> str:
    """``", saved by <op> in module '<name>' (<type>)"``: the op (an autograd Function's forward, else
    the innermost library function) and the converted module on the stack of a ``quantize`` call
    (module names are those :func:`blockquant.convert` gave)."""
    op = innermost = module = None
    frame = sys._getframe(2)
    while frame is not None and module is None:
        code = frame.f_code
        owner = frame.f_locals.get("self") if code.co_name == "forward" and code.co_varnames[:1] == ("self",) \
            else None
        if isinstance(owner, torch.nn.Module) and hasattr(owner, "bq_config"):
            module = f"module '{getattr(owner, 'bq_name', '') or '<root>'}' ({type(owner).__name__})"
        elif code.co_filename.startswith(_PACKAGE_DIR) and code.co_filename not in _PLUMBING:
            name = getattr(code, "co_qualname", code.co_name)
            innermost = innermost or name
            if op is None and code.co_name == "forward":
                op = name
        frame = frame.f_back
    op = op or innermost
    text = f", saved by {op}" if op else ""
    return text + (f" in {module}" if module else "")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# where quantize is called from on every path, never the op that decided to save a tensor
_PLUMBING = {os.path.abspath(__file__), os.path.join(_PACKAGE_DIR, "save_policy.py")}

_ACTIVE_CHECK: "contextvars.ContextVar[Optional[FiniteCheck]]" = contextvars.ContextVar(
    "blockquant_finite_check", default=None)


@contextlib.contextmanager
def defer_finite_check() -> Iterator[FiniteCheck]:
    """Check the finiteness of quantized tensors once, at the end of the block, not per call.

    Outside any such block, every :func:`quantize` call checks its metadata at once,
    which on a GPU is one host-device synchronisation per call. Inside this context
    the checks are recorded on the device instead and read together when the
    block exits normally (or when you call ``check()`` on the returned object):
    a non-finite input still raises ``ValueError``, only later -- wrap the
    forward pass, so that the error comes before ``backward()`` and the
    optimizer step. Until then the offending tensor's codes decode to NaN.
    Nested contexts share the outermost check.

    A model converted by :func:`blockquant.convert` does this by itself: each training
    forward of the converted model is one deferred check (one synchronisation per step),
    raised when the forward returns, naming the op and the module that saved the first
    non-finite tensor.

    Example::

        with blockquant.defer_finite_check():
            loss = model(x, adj).sum()
        loss.backward()
    """
    outer = _ACTIVE_CHECK.get()
    if outer is not None:
        yield outer
        return
    check = FiniteCheck()
    token = _ACTIVE_CHECK.set(check)
    try:
        yield check
    finally:
        _ACTIVE_CHECK.reset(token)
    check.check()  # not reached when the block raised: that error is the one to see


def check_encoded(meta: torch.Tensor, x: torch.Tensor, meta_dtype: torch.dtype) -> None:
    """The finiteness rule of :func:`quantize` for codes of ``x`` encoded outside it (the batch
    norm fused with the compiled codec): ``meta`` recorded on the active deferred check, else
    checked now (raises ``ValueError``)."""
    deferred = _ACTIVE_CHECK.get()
    if deferred is not None:
        deferred.record(meta, x.shape, x.dtype, meta_dtype)
    elif not bool(torch.isfinite(meta).all()):
        _raise_non_finite(x, meta_dtype)


def open_forward_check(owner: torch.nn.Module) -> None:
    """Start the deferred check of one forward of ``owner`` (a converted model), unless a check
    is already active (the caller's :func:`defer_finite_check`, or an outer converted model)."""
    active = _ACTIVE_CHECK.get()
    if active is not None:
        return
    check = FiniteCheck(owner)
    check._token = _ACTIVE_CHECK.set(check)


def close_forward_check(owner: torch.nn.Module, raised: bool) -> None:
    """End the check :func:`open_forward_check` started for ``owner``: read it (one synchronisation),
    or, when the forward ``raised``, drop it (that error is the one to see)."""
    active = _ACTIVE_CHECK.get()
    if active is None or active.owner is not owner:
        return
    try:
        _ACTIVE_CHECK.reset(active._token)
    except ValueError:  # set in another context (not expected from module hooks): clear it
        _ACTIVE_CHECK.set(None)
    if not raised:
        active.check()


def quantize(x: torch.Tensor, config: Optional[QuantConfig] = None,
             seed: Optional[Union[int, torch.Tensor]] = None, *, backend: Optional[str] = None) -> PackedTensor:
    """Compress ``x`` block-wise to ``config.bits`` bits per element.

    Args:
        x: float32/float16/bfloat16/float64 tensor of any shape (non-contiguous is fine).
            float64 is encoded through float32 (the codec's arithmetic) and decodes to float64:
            the float32 rounding of the input (2^-24 relative) is far below the codec's noise.
        config: a :class:`QuantConfig` (default ``QuantConfig()``, the ``"default"`` preset).
        seed: seed for stochastic rounding and the projection, an int or a
            one-element integer tensor; drawn from PyTorch's default generator
            when ``None``. Kept as a 0-d int64 CPU tensor (``PackedTensor.seed``).
        backend: force ``"torch"``, ``"native"`` or ``"triton"``; default picks by device.

    Raises:
        TypeError: wrong input or config type or dtype.
        ValueError: non-finite values, or a range the metadata dtype cannot hold
            (at once; inside :func:`defer_finite_check`, when that block ends; under
            ``torch.compile`` always at once, from inside the compiled codec op).
    """
    config = QuantConfig() if config is None else config
    _check_input(x, config)
    dtype = x.dtype
    x = x.detach() if dtype in SUPPORTED_DTYPES else x.detach().to(torch.float32)
    seed = draw_seed_tensor() if seed is None else as_seed_tensor(seed)
    shape = x.shape
    proj_seed = proj_dims = None
    row = x.shape[-1] if x.dim() >= 1 else 1
    if x.dim() >= 1 and stored_width(row, config.rp_ratio) < row:
        proj_seed = projection_seed(seed)
        proj_dims = (row, stored_width(row, config.rp_ratio))
        row = proj_dims[1]
    block = config.block_size_for(row)
    if x.numel() == 0:
        if not torch.compiler.is_compiling():
            forced_backend(x.device, backend)  # an unknown backend name fails here too
        payload = torch.empty(0, dtype=torch.uint8, device=x.device)
        meta = torch.empty(2, 0, dtype=config.meta_dtype, device=x.device)
    else:
        # a compiled graph cannot defer (the check object lives outside it): it checks in the op
        deferred = None if torch.compiler.is_compiling() else _ACTIVE_CHECK.get()
        levels = _levels_for(config.bits, block, config.levels == "optimal")
        payload, meta, op_proj_seed = _quantize_op(x, seed, config.bits, block, config.meta_dtype, levels,
                                     config.rounding == "stochastic", 0 if proj_dims is None else proj_dims[1],
                                     deferred is None, backend)
        if deferred is not None:
            deferred.record(meta, shape, dtype, config.meta_dtype)
        if proj_dims is not None:
            proj_seed = op_proj_seed
    return PackedTensor(payload, meta, shape, dtype, config, block, seed, proj_seed, proj_dims,
                        backend=backend)


def dequantize(packed: PackedTensor) -> torch.Tensor:
    """Functional form of :meth:`PackedTensor.dequantize`."""
    return packed.dequantize()
