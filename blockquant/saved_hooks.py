"""Compress whatever autograd saves for backward, for ops blockquant has no wrapper for.

:func:`compress_saved_tensors` installs ``torch.autograd.graph.saved_tensors_hooks``:

* floating tensors that are produced inside the graph (they have a
  ``grad_fn``) and hold at least ``min_numel`` elements are quantized with
  the config (random projection switched off: an arbitrary op may use the
  saved tensor non-linearly, where projection would add large variance);
* bool tensors are packed losslessly to 1 bit per element (bool tensors never
  carry a ``grad_fn``, so intermediate masks cannot be told from resident
  ones; a resident mask costs an extra 1/8 of its size);
* everything else is kept as it is: parameters and other resident tensors
  (no ``grad_fn``: data the caller holds anyway, so compressing would add
  memory), integer tensors, tensors below ``min_numel`` (default 1024
  elements, where block metadata and call overhead outweigh the saving), and
  tensors whose values are not finite (the codec cannot represent them).

On unpack the original shape and dtype come back (contiguous). A tensor
saved by several ops is compressed once (see
:func:`blockquant.functional.compress_shared`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional, Union

import torch

from blockquant.kernels.bitmask import BitMask

from .config import QuantConfig
from .functional import compress_shared, is_resident

DEFAULT_MIN_NUMEL = 1024

Recorder = Optional[Union[List[object], Callable[[object], None]]]


class _Packed:
    """What the pack hook returns for a compressed tensor."""

    __slots__ = ("obj", "kind")

    def __init__(self, obj, kind: str):
        self.obj = obj
        self.kind = kind  # "quant" or "mask"

    def unpack(self) -> torch.Tensor:
        return self.obj.unpack() if self.kind == "mask" else self.obj.dequantize()

    @property
    def nbytes(self) -> int:
        return self.obj.nbytes

    def storages(self):
        """The tensors held (so graph walkers such as ``track_saved`` can count them)."""
        return self.obj.storages()


_QUANTIZABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@contextlib.contextmanager
def compress_saved_tensors(config: Optional[QuantConfig] = None, *, min_numel: int = DEFAULT_MIN_NUMEL,
                           record: Recorder = None) -> Iterator[None]:
    """Context manager: tensors saved for backward inside it are stored compressed.

    Args:
        config: :class:`QuantConfig` (default: the ``"default"`` preset);
            ``rp_ratio`` is ignored (treated as 1).
        min_numel: tensors with fewer elements are saved as they are.
        record: a list (each packed object is appended) or a callable (called
            with each packed object) so memory tracking can see what is held:
            :class:`~blockquant.PackedTensor` or
            :class:`~blockquant.kernels.bitmask.BitMask` objects, both with
            ``.nbytes`` and ``.storages()``.

    Example::

        with blockquant.compress_saved_tensors(QuantConfig(bits=2)):
            loss = model(x).sum()
        loss.backward()
    """
    if config is None:
        config = QuantConfig.preset("default")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"compress_saved_tensors expects a QuantConfig; got {type(config).__name__}")
    if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
        raise ValueError(f"compress_saved_tensors: min_numel must be a non-negative int; got {min_numel!r}")
    if record is not None and not (callable(record) or hasattr(record, "append")):
        raise TypeError(f"compress_saved_tensors: record must be a list or a callable; got {type(record).__name__}")
    config = config if config.rp_ratio == 1 else config.replace(rp_ratio=1)
    note = None if record is None else (record if callable(record) else record.append)

    def pack(t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or t.numel() < min_numel or t.layout != torch.strided:
            return t
        if t.dtype == torch.bool:
            obj, kind = BitMask.pack(t), "mask"
        elif t.dtype in _QUANTIZABLE and not is_resident(t):
            try:
                obj, kind = compress_shared(t, config), "quant"
            except ValueError:  # non-finite values: keep them exact rather than fail the forward pass
                return t
        else:
            return t
        if note is not None:
            note(obj)
        return _Packed(obj, kind)

    def unpack(p):
        return p.unpack() if isinstance(p, _Packed) else p

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
