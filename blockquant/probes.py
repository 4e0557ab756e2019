"""Measuring a converted model against full precision at fixed weights: the tools of
:func:`blockquant.tune` and :func:`blockquant.noise_report`.

A :class:`Prober` holds a private, unconverted copy of the model trained for a few fp32 steps
(the *probe* weights), and measures fresh converted copies of it at those weights:

* the squared error of all weight gradients against full precision, in training mode with the
  same dropout masks in both (:class:`PairedDropout`: compression the only difference), one draw
  or several;
* the bytes held for backward, as :func:`blockquant.track_saved` measures them (data excluded);
* the variance of the fp32 gradient over dropout's own randomness, the yardstick
  :func:`blockquant.noise_report` compares compression against.

Randomness: the probes seed the CPU generator and those of the CUDA devices the model and data
are on, and :func:`caller_rng_kept` restores all of them afterwards (``torch.manual_seed`` would
reseed every CUDA generator of the process).
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode

from .saved_hooks import not_routed

__all__ = ["Prober", "ProbeError", "default_loss", "PairedDropout", "caller_rng_kept"]


class ProbeError(ValueError):
    """A measurement the model cannot give (e.g. dropout noise of a model without dropout)."""


def default_loss(data) -> Callable[[torch.Tensor], torch.Tensor]:
    y = data.y
    split = getattr(data, "split", None)
    if isinstance(split, dict) and "train" in split:
        idx = split["train"]
    elif getattr(data, "train_mask", None) is not None:
        idx = data.train_mask
    else:
        idx = slice(None)
    multilabel = y.dim() == 2 and y.is_floating_point()
    if multilabel:
        return lambda out: torch.nn.functional.binary_cross_entropy_with_logits(out[idx], y[idx].float())
    return lambda out: torch.nn.functional.cross_entropy(out[idx], y[idx])


_ELEMENTWISE_DROPOUT = {torch.nn.functional.dropout, torch.dropout}


class PairedDropout(TorchFunctionMode):
    """Dropout called as ``F.dropout`` / ``torch.dropout`` (``torch.nn.Dropout`` included) draws its
    keep-mask from a private generator seeded by ``(seed, call index)``: two forwards under the same
    seed drop the same elements, whatever else draws random numbers in between (a compressed model
    draws rounding seeds from the global generator). Same distribution as torch's dropout."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = int(seed)
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _ELEMENTWISE_DROPOUT:
            return func(*args, **kwargs)
        names = ("input", "p", "training", "inplace") if func is torch.nn.functional.dropout else \
            ("input", "p", "train")
        bound = dict(zip(names, args), **kwargs)
        x, p = bound["input"], float(bound.get("p", 0.5))
        if not bound.get("training", bound.get("train", True)) or p == 0.0:
            return x
        if p == 1.0:
            return x * 0.0
        gen = torch.Generator(device=x.device)
        gen.manual_seed((self.seed * 1000003 + 7919 * self.calls) & ((1 << 62) - 1))
        self.calls += 1
        keep = torch.rand(x.shape, generator=gen, device=x.device) >= p
        return x * keep.to(x.dtype) / (1.0 - p)


@contextlib.contextmanager
def _attention_dropout_off(model: torch.nn.Module) -> Iterator[None]:
    """The float ``dropout`` of message-passing layers (GAT's attention dropout) set to 0: blockquant's
    attention draws its masks its own way, so they cannot be paired with the original's."""
    from torch_geometric.nn.conv import MessagePassing

    saved = [(m, m.dropout) for m in model.modules()
             if isinstance(m, MessagePassing) and isinstance(getattr(m, "dropout", None), float)]
    for m, _ in saved:
        m.dropout = 0.0
    try:
        yield
    finally:
        for m, v in saved:
            m.dropout = v


def _cuda_devices(model: torch.nn.Module, data) -> List[int]:
    """Indices of the CUDA devices the model's tensors and the data's live on."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for t in (getattr(data, "x", None), getattr(data, "edge_index", None)) if isinstance(t, torch.Tensor)]
    return sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                   for t in tensors if t.device.type == "cuda"})


@contextlib.contextmanager
def caller_rng_kept(model: torch.nn.Module, data) -> Iterator[Callable[[int], None]]:
    """Restores, on exit, every generator the probes seed, and yields the function that seeds them:
    the CPU generator and those of the CUDA devices in use, and no other (``torch.manual_seed``
    would reseed every CUDA generator of the process, devices the caller never gave us included)."""
    devices = _cuda_devices(model, data)

    def seed_all(seed: int) -> None:
        torch.default_generator.manual_seed(seed)
        for d in devices:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)

    with torch.random.fork_rng(devices=devices):
        yield seed_all


class Prober:
    """A private, unconverted copy of the model, the probe weights and the fp32 reference gradients;
    measures fresh converted copies of it (every measurement converts a new copy of the
    unconverted model, as a user converts theirs).

    Gradients are taken in training mode with dropout on, its masks paired (:class:`PairedDropout`):
    draw ``k`` at probe ``i`` drops the same elements in the fp32 model and in every converted copy,
    so that the difference of two gradients is the compression alone, measured where training
    meets it (a linear layer fed ``dropout(x)`` compresses that fresh tensor, not the resident
    ``x``). Converted copies use torch's dropout for this (blockquant's ``QDropout`` keeps only a
    seed, which changes bytes, not gradients); attention dropout inside message-passing layers is
    switched off in those comparisons (blockquant's attention draws its masks its own way).

    Args:
        model: the unconverted model, called as ``model(data.x, data.edge_index)``; copied, not modified.
        probe_steps: fp32 Adam steps (lr ``lr``) after which the weights are probed.
        seed_all: seeds the generators the probes use (from :func:`caller_rng_kept`).
        dropout_draws: with 2 or more, the fp32 gradient's variance over that many dropout
            draws is measured at every probe (``dropout_var``, all dropout on), so that errors
            can be given in units of it (:meth:`use_dropout_units`, :meth:`noise_ratio`).
    """

    GRADIENT = "relative squared gradient error"
    DROPOUT = "compression variance / dropout variance"

    def __init__(self, model: torch.nn.Module, data, loss_fn, probe_steps: Sequence[int], seed: int,
                 seed_all: Callable[[int], None], lr: float = 0.01, dropout_draws: int = 0):
        self.data = data
        self.loss_fn = loss_fn
        self.seed = seed
        self.seed_all = seed_all
        self.base = copy.deepcopy(model)
        self.base.train()
        self.known_names = {n for n, _ in self.base.named_modules()}
        self.exclude = tuple(t for t in (data.x, data.edge_index, getattr(data, "y", None)) if t is not None)
        self.states: List[Dict[str, torch.Tensor]] = []
        seed_all(seed)
        opt = torch.optim.Adam(self.base.parameters(), lr=lr)
        done = 0
        for target in sorted(set(int(s) for s in probe_steps)):
            while done < target:
                opt.zero_grad(set_to_none=True)
                self.loss_fn(self.forward(self.base)).backward()
                opt.step()
                done += 1
            self.states.append(copy.deepcopy(self.base.state_dict()))
        self.names = [n for n, p in self.base.named_parameters() if p.requires_grad]
        self.sizes = [p.numel() for n, p in self.base.named_parameters() if p.requires_grad]
        self._fp32: Dict[Tuple[int, int], torch.Tensor] = {}
        self.ref = [self.fp32_grads(i, 0) for i in range(len(self.states))]
        self.ref_norm2 = [float(g.pow(2).sum()) for g in self.ref]
        self.dropout_var: Optional[List[torch.Tensor]] = None
        if dropout_draws:
            self.dropout_var = [self.dropout_variance(i, dropout_draws) for i in range(len(self.states))]
        self.unit = self.GRADIENT
        self.norms = self.ref_norm2  # what error() divides each probe's squared error by

    # ------------------------------------------------------------------ models
    def forward(self, model: torch.nn.Module) -> torch.Tensor:
        return model(self.data.x, self.data.edge_index)

    def converted(self, spec) -> torch.nn.Module:
        """A fresh copy of the unconverted model, converted with ``spec`` (``None``: the copy as it is)."""
        from .conversion import convert

        model = copy.deepcopy(self.base)
        if spec is None:
            return model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = convert(model, spec)
        if new is not model:
            raise ProbeError("the model's root module is itself a compressible layer; wrap it in a container "
                             "module (e.g. torch.nn.Sequential) so that its name is not ''")
        return new

    def at_probe(self, model: torch.nn.Module, i: int) -> torch.nn.Module:
        model.load_state_dict(self.states[i])
        model.train()
        return model

    # --------------------------------------------------------------- gradients
    def _draw_seed(self, i: int, draw: int) -> int:
        return self.seed * 1000003 + 7919 * (i + 1) + 104729 * draw

    def grads(self, model: torch.nn.Module, i: int, draw: int = 0, *, paired: bool = True) -> torch.Tensor:
        """All weight gradients (float64, flat, in ``names`` order) at probe ``i`` with the
        dropout masks of ``draw``; ``paired=False``: every dropout as the model draws it."""
        from .nn.registry import CompressedModule

        self.at_probe(model, i)
        seed = self._draw_seed(i, draw)
        self.seed_all(seed)
        model.zero_grad(set_to_none=True)
        if paired:  # torch's dropout instead of QDropout, so that PairedDropout sees it
            for parent in list(model.modules()):
                for name, child in list(parent._modules.items()):
                    if isinstance(child, CompressedModule) and issubclass(child.wraps, torch.nn.Dropout):
                        parent._modules[name] = child.to_original()
        with contextlib.ExitStack() as stack:
            if paired:
                stack.enter_context(_attention_dropout_off(model))
                # a converted forward runs F.dropout as blockquant's seeded dropout: pass it on to PairedDropout
                stack.enter_context(not_routed(*_ELEMENTWISE_DROPOUT))
                stack.enter_context(PairedDropout(seed))
            self.loss_fn(self.forward(model)).backward()
        params = dict(model.named_parameters())
        g = torch.cat([(params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])).reshape(-1)
                       .double() for n in self.names])
        model.zero_grad(set_to_none=True)
        return g

    def fp32_grads(self, i: int, draw: int) -> torch.Tensor:
        """The fp32 gradient at probe ``i`` with the paired dropout masks of ``draw`` (cached)."""
        key = (i, draw)
        if key not in self._fp32:
            self._fp32[key] = self.grads(self.base, i, draw)
        return self._fp32[key]

    def squared_errors(self, spec, draws: int = 1) -> List[torch.Tensor]:
        """Per probe, ``(g - g_fp32)^2`` per coordinate averaged over ``draws`` draws (new dropout
        masks, paired with fp32's, and new rounding each): the variance compression adds."""
        model = self.converted(spec)
        out = []
        for i in range(len(self.states)):
            acc = torch.zeros_like(self.ref[i])
            for k in range(draws):
                acc += (self.grads(model, i, k) - self.fp32_grads(i, k)).pow(2)
            out.append(acc / draws)
        return out

    def error(self, spec) -> float:
        """Mean over probes of ``||g - g_fp32||^2`` with the model converted by ``spec`` (one draw),
        divided by ``||g_fp32||^2`` (``GRADIENT``), or by the variance dropout causes after
        :meth:`use_dropout_units` (``DROPOUT``)."""
        errs = self.squared_errors(spec)
        return sum(float(e.sum()) / max(n, 1e-300) for e, n in zip(errs, self.norms)) / len(errs)

    # ----------------------------------------------------------------- dropout
    def dropout_variance(self, i: int, draws: int) -> torch.Tensor:
        """Per coordinate, the variance of the fp32 gradient over ``draws`` dropout draws at probe
        ``i``, every dropout on (attention dropout included); unbiased sample variance."""
        if draws < 2:
            raise ProbeError(f"dropout variance needs at least 2 draws; got {draws}")
        gs = torch.stack([self.grads(self.base, i, 1000 + k, paired=False) for k in range(draws)])
        return gs.var(dim=0, unbiased=True)

    def has_dropout_noise(self) -> bool:
        return self.dropout_var is not None and min(float(v.sum()) for v in self.dropout_var) > 0.0

    def use_dropout_units(self) -> None:
        """From now on :meth:`error` divides by dropout's variance instead of ``||g_fp32||^2``."""
        if not self.has_dropout_noise():
            raise ProbeError("the model's fp32 gradient does not vary with dropout (no dropout, or dropout not "
                             "measured): compression noise cannot be given in units of dropout's noise")
        self.unit = self.DROPOUT
        mean = sum(float(v.sum()) for v in self.dropout_var) / len(self.dropout_var)
        self.norms = [mean] * len(self.dropout_var)  # error() then gives sum of errors / sum of variances

    def noise_ratio(self, spec, draws: int = 1) -> Optional[float]:
        """The variance compression adds to the weight gradients over the variance dropout causes,
        both summed over the probes; ``None`` without dropout noise."""
        if not self.has_dropout_noise():
            return None
        errs = self.squared_errors(spec, draws)
        return sum(float(e.sum()) for e in errs) / sum(float(v.sum()) for v in self.dropout_var)

    # ------------------------------------------------------------------- bytes
    def saved_bytes(self, spec) -> int:
        """Bytes held for backward after one training forward (dropout as in training), as
        :func:`blockquant.track_saved` measures them with the data excluded."""
        from .memory import track_saved

        model = self.at_probe(self.converted(spec), 0)
        self.seed_all(self.seed)
        with track_saved(model, exclude=self.exclude) as mem:
            out = self.forward(model)
        del out
        return int(mem.total_bytes)

    def training_output(self, spec) -> torch.Tensor:
        """The output (with its autograd graph) of one training forward of the model converted by ``spec``."""
        model = self.at_probe(self.converted(spec), 0)
        self.seed_all(self.seed)
        return self.forward(model)
