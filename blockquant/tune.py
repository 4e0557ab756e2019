"""Choose bits, block size, projection and levels per layer, from measurements, under a memory budget.

:func:`tune` (and ``blockquant tune``) works in four steps:

1. **Profile.** The compressible layers are the modules :func:`blockquant.convert`
   swaps whose saved bytes depend on the config (a ReLU's 1-bit mask or a
   Dropout's seed do not). For each one, a forward with only that layer
   converted captures the tensors it compresses (shape, dtype, whether the
   wrapper projects it). The bytes of any candidate then follow exactly from
   the codec's byte formula (:func:`packed_nbytes`: packed codes plus two
   metadata values per block). The block variance model of ALGORITHM.md
   (per-block ranges of the captured activations, i-Exact's clipped-normal
   rounding variance for the levels, projection variance ``(D-1)/R ||H||^2``)
   predicts each candidate's reconstruction error; candidates that another
   one beats on both predicted error and bytes are pruned. The survivors are
   *measured*: the relative squared error of all weight gradients against
   full precision with only that layer compressed, one forward+backward per
   probe (a few probes: weights at a few early fp32 training steps, one
   rounding seed each). Cost: layers x surviving candidates x probes passes.
2. **Allocate.** Independent zero-mean rounding noises add in variance, so the
   plan's predicted error is the sum of its layers' measured errors and its
   bytes the plain bytes of the converted model plus the layers' bytes. A
   greedy marginal-gain allocation over each layer's lower convex hull
   (error saved per byte spent), then single-layer swaps that still fit,
   minimises the predicted error within the budget.
3. **Verify and refine.** The converted model is measured once: bytes with
   :func:`blockquant.track_saved` (must equal the prediction exactly) and the
   gradient error with the same probes. Uniform configs that fit the budget
   are measured as well; if one beats the allocated plan it is taken (the
   tuned plan is never worse than the best uniform config at its bytes, in
   the tuner's own measurement). One-step moves per layer (bits up/down,
   block doubled/halved) are kept when they lower the measured error at equal
   or fewer bytes.
4. **Report.** :class:`TuneResult` has the per-layer table, the plan
   (:class:`blockquant.Plan`, JSON for ``convert``/``bench --configs``), the
   uniform configs' memory/error points and a Pareto plot.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._compat import is_saved_tensor, raw_saved_slots, saved_tensor_data, sequence_nr
from .config import MAX_BLOCK_SIZE, ROW, QuantConfig
from .plan import Plan
from .functional.normalization import square_estimator_nbytes

__all__ = ["tune", "TuneResult", "TuneError", "LayerChoice", "packed_nbytes", "candidate_configs",
           "gradient_error"]

BITS = (1, 2, 4, 8)
BLOCK_SIZES: Tuple[Union[int, str], ...] = tuple(1 << k for k in range(4, 17)) + (ROW,)  # 16 .. 65536, row
RP_RATIOS = (1, 2, 4, 8)
LEVELS = ("uniform", "optimal")
UNIFORM_GRID = tuple(dict.fromkeys(
    [QuantConfig(bits=b, block_size=g, rp_ratio=r, levels="uniform" if b == 1 else "optimal")
     for b in BITS for g in (64, 1024, ROW) for r in (1, 8)]
    + [QuantConfig.preset(p) for p in ("int2", "exact", "iexact", "default")]))
"""Uniform configs measured for the Pareto comparison (one config for every layer)."""


class TuneError(ValueError):
    """A tuning request that cannot be met; the message is one line and says why."""


def candidate_configs(bits=BITS, block_sizes=BLOCK_SIZES, rp_ratios=RP_RATIOS, levels=LEVELS,
                      meta_dtype=torch.bfloat16) -> List[QuantConfig]:
    """The candidate grid (1-bit "optimal" levels equal uniform ones and are left out)."""
    return [QuantConfig(bits=b, block_size=g, rp_ratio=r, levels=lv, meta_dtype=meta_dtype)
            for b in bits for g in block_sizes for r in rp_ratios for lv in levels
            if not (b == 1 and lv == "optimal")]


# ----------------------------------------------------------------------------- byte formula


def _payload_bytes(n: int, block: int, bits: int) -> int:
    from blockquant.kernels.reference import payload_bytes

    return payload_bytes(n, block, bits)


def _stored_shape(shape: Sequence[int], config: QuantConfig) -> Tuple[int, ...]:
    from .projection import projected_dim

    shape = tuple(int(s) for s in shape)
    if config.rp_ratio > 1 and len(shape) >= 1 and shape[-1] > 1:
        r = projected_dim(shape[-1], config.rp_ratio)
        if r < shape[-1]:
            return shape[:-1] + (r,)
    return shape


def packed_nbytes(shape: Sequence[int], config: QuantConfig) -> int:
    """Exact bytes :func:`blockquant.quantize` holds for a tensor of ``shape``:
    packed codes (after the projection, if any) plus two ``meta_dtype`` values per block."""
    stored = _stored_shape(shape, config)
    n = math.prod(stored)
    if n == 0:
        return 0
    block = config.block_size_for(stored[-1] if stored else 1)
    num_blocks = -(-n // block)
    meta_item = torch.empty((), dtype=config.meta_dtype).element_size()
    return _payload_bytes(n, block, config.bits) + 2 * num_blocks * meta_item


# ----------------------------------------------------------------------------- variance model


@functools.lru_cache(maxsize=None)
def _rounding_variance(bits: int, block: int, levels: str) -> float:
    """Expected stochastic-rounding variance per element, in units of (range / (2^bits - 1))^2."""
    from .levels import block_sigma, expected_variance, optimal_levels, uniform_levels

    lv = optimal_levels(bits, block) if levels == "optimal" else uniform_levels(bits)
    return float(expected_variance(torch.tensor(lv, dtype=torch.float64), block_sigma(bits, block)))


def _range_energy(flat: torch.Tensor, block: int) -> float:
    """``sum over blocks of (block length) * (block max - block min)^2``."""
    n = flat.numel()
    if n == 0:
        return 0.0
    full = (n // block) * block
    total = 0.0
    if full:
        b = flat[:full].view(-1, block)
        r = (b.amax(1) - b.amin(1)).double()
        total += float((r * r).sum()) * block
    if full < n:
        t = flat[full:]
        total += float((t.max() - t.min()).double() ** 2) * (n - full)
    return total


@dataclasses.dataclass
class _CapturedTensor:
    """One tensor a layer compresses: its shape and whether the wrapper projects it."""

    shape: Tuple[int, ...]
    dtype: str
    projectable: bool
    sample: Optional[torch.Tensor] = None  # near-exact reconstruction, for the variance model only
    _energy: Dict[Any, float] = dataclasses.field(default_factory=dict)

    def effective(self, config: QuantConfig) -> QuantConfig:
        return config if self.projectable or config.rp_ratio == 1 else config.replace(rp_ratio=1)

    def nbytes(self, config: QuantConfig) -> int:
        return packed_nbytes(self.shape, self.effective(config))

    def predicted_error(self, config: QuantConfig) -> float:
        """Predicted ``E||x_hat - x||^2`` under the block variance model."""
        cfg = self.effective(config)
        x = self.sample
        if x is None or x.numel() == 0:
            return 0.0
        stored = _stored_shape(self.shape, cfg)
        d = self.shape[-1] if self.shape else 1
        proj = stored != self.shape
        key = (cfg.rp_ratio if proj else 1, cfg.block_size)
        if key not in self._energy:
            data = x.reshape(-1, d).float()
            if proj:
                from .projection import rademacher

                p = rademacher(d, stored[-1], 12345, data.device, torch.float32)
                data = data @ p
            block = cfg.block_size_for(data.shape[-1])
            self._energy[key] = _range_energy(data.reshape(-1), block)
            if proj and ("norm",) not in self._energy:
                self._energy[("norm",)] = float(x.double().pow(2).sum())
        block = cfg.block_size_for(stored[-1] if stored else 1)
        quant = self._energy[key] * _rounding_variance(cfg.bits, block, cfg.levels) / ((1 << cfg.bits) - 1) ** 2
        if not proj:
            return quant
        r = stored[-1]
        return (d - 1) / r * self._energy[("norm",)] + d / r * quant


# ----------------------------------------------------------------------------- graph inspection


def _find_packed(obj: Any, out: Dict[int, Any], depth: int = 0) -> None:
    from .functional.normalization import _EstimatorChunks
    from .packed import PackedTensor

    if depth > 5 or obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, _EstimatorChunks):  # a normalisation's xn**2 estimator: bytes from its own rule
        out.setdefault(id(obj), obj)
    elif isinstance(obj, PackedTensor):
        out.setdefault(id(obj), obj)
    elif callable(getattr(obj, "storages", None)):  # a holder of packed storage (saved-tensor hooks, float64)
        attrs = getattr(obj, "__dict__", None)
        if attrs is None:
            attrs = {s: getattr(obj, s, None) for c in type(obj).__mro__ for s in getattr(c, "__slots__", ())}
        for v in attrs.values():
            _find_packed(v, out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _find_packed(v, out, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            _find_packed(v, out, depth + 1)
    elif is_saved_tensor(obj):
        _find_packed(saved_tensor_data(obj), out, depth + 1)


def _packed_in_graph(outputs: Sequence[torch.Tensor]) -> List[Any]:
    """Every PackedTensor the autograd graph behind ``outputs`` holds, in a stable order."""
    found: Dict[int, Any] = {}
    seen = set()
    todo = [t.grad_fn for t in outputs if t.grad_fn is not None]
    order = []
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        todo.extend(n for n, _ in node.next_functions)
    for node in sorted(order, key=sequence_nr):
        for name in raw_saved_slots(node):
            try:
                _find_packed(getattr(node, name), found)
            except RuntimeError:
                pass
        for v in getattr(node, "__dict__", {}).values():
            _find_packed(v, found)
    return list(found.values())


# ----------------------------------------------------------------------------- measurement


def _default_loss(data) -> Callable[[torch.Tensor], torch.Tensor]:
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


class _DropoutOff:
    """Dropout (modules and PyG's float ``dropout`` attributes, e.g. GAT's attention dropout)
    switched off, so that compression is the only difference between two passes."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.saved: List[Tuple[Any, str, Any]] = []

    def __enter__(self):
        for m in self.model.modules():
            if isinstance(m, torch.nn.Dropout):
                self.saved.append((m, "p", m.p))
                m.p = 0.0
            elif isinstance(getattr(m, "dropout", None), float):
                self.saved.append((m, "dropout", m.dropout))
                m.dropout = 0.0
        return self

    def __exit__(self, *exc):
        for m, attr, v in reversed(self.saved):
            setattr(m, attr, v)
        self.saved = []


class _Prober:
    """Holds a private copy of the model, the probe weights and the fp32 reference gradients."""

    def __init__(self, model: torch.nn.Module, data, loss_fn, probe_steps: Sequence[int], seed: int,
                 lr: float = 0.01):
        self.data = data
        self.loss_fn = loss_fn
        self.seed = seed
        self.model = copy.deepcopy(model)
        self.model.train()
        self.exclude = tuple(t for t in (data.x, data.edge_index, getattr(data, "y", None)) if t is not None)
        self.states: List[Dict[str, torch.Tensor]] = []
        torch.manual_seed(seed)
        opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        steps = sorted(set(int(s) for s in probe_steps))
        done = 0
        for target in steps:
            while done < target:
                opt.zero_grad(set_to_none=True)
                self.loss_fn(self.forward()).backward()
                opt.step()
                done += 1
            self.states.append(copy.deepcopy(self.model.state_dict()))
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.ref = [self._grads(i) for i in range(len(self.states))]
        self.ref_norm2 = [float(g.pow(2).sum()) for g in self.ref]

    def forward(self) -> torch.Tensor:
        return self.model(self.data.x, self.data.edge_index)

    def convert(self, spec) -> None:
        from .conversion import convert

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = convert(self.model, spec)
        if new is not self.model:
            raise TuneError("tune: the model's root module is itself a compressible layer; wrap it in a container "
                            "module (e.g. torch.nn.Sequential) so that its name is not ''")

    def _grads(self, i: int) -> torch.Tensor:
        self.model.load_state_dict(self.states[i])
        self.model.train()
        torch.manual_seed(self.seed * 1000003 + 7919 * (i + 1))
        with _DropoutOff(self.model):
            self.model.zero_grad(set_to_none=True)
            self.loss_fn(self.forward()).backward()
        params = dict(self.model.named_parameters())
        g = torch.cat([(params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])).reshape(-1)
                       .double() for n in self.names])
        self.model.zero_grad(set_to_none=True)
        return g

    def error(self, spec) -> float:
        """Mean over probes of ``||g - g_fp32||^2 / ||g_fp32||^2`` with the model converted by ``spec``."""
        self.convert(spec)
        errs = []
        for i in range(len(self.states)):
            g = self._grads(i)
            errs.append(float((g - self.ref[i]).pow(2).sum()) / max(self.ref_norm2[i], 1e-300))
        return sum(errs) / len(errs)

    def saved_bytes(self, spec) -> int:
        """Bytes held for backward after one training forward (dropout as in training)."""
        from .memory import track_saved

        self.convert(spec)
        self.model.load_state_dict(self.states[0])
        self.model.train()
        torch.manual_seed(self.seed)
        with track_saved(self.model, exclude=self.exclude) as mem:
            out = self.forward()
        del out
        return int(mem.total_bytes)

    def capture(self, spec) -> List[Any]:
        """The PackedTensors one training forward (dropout on, as in training) creates with the
        model converted by ``spec``."""
        self.convert(spec)
        self.model.load_state_dict(self.states[0])
        self.model.train()
        torch.manual_seed(self.seed)
        out = self.forward()
        from .functional.normalization import _EstimatorChunks

        found = _packed_in_graph([out])
        del out
        self.estimators = [(e.shape, e.count) for e in found if isinstance(e, _EstimatorChunks)]
        return [p for p in found if not isinstance(p, _EstimatorChunks)]


def gradient_error(model: torch.nn.Module, data, config, *, probe_steps: Sequence[int] = (0, 10), seed: int = 0,
                   loss_fn=None) -> float:
    """Relative squared weight-gradient error of ``convert(model, config)`` against full
    precision, averaged over the probes :func:`tune` uses (the model is not modified)."""
    prober = _Prober(model, data, loss_fn or _default_loss(data), probe_steps, seed)
    return prober.error(config)


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class Candidate:
    config: QuantConfig
    nbytes: int
    predicted: float  # block variance model, activation error energy (pruning only)
    error: Optional[float] = None  # measured relative squared gradient error, this layer alone


@dataclasses.dataclass
class LayerChoice:
    """One compressible layer: what it compresses, its measured candidates and the chosen one."""

    name: str
    module_type: str
    tensors: List[Tuple[Tuple[int, ...], str, bool]]
    candidates: List[Candidate]
    num_candidates: int
    chosen: Optional[Candidate] = None
    captured: List[_CapturedTensor] = dataclasses.field(default_factory=list, repr=False)
    """The captured tensors (with activation samples) while tuning; emptied when done."""
    estimators: List[Tuple[Tuple[int, ...], int]] = dataclasses.field(default_factory=list, repr=False)
    """``(input shape, count)`` of each normalisation whose input gradient keeps an estimate of
    ``xn ** 2`` beside ``xn`` (its bytes: ``blockquant.functional.square_estimator_nbytes``)."""

    def to_dict(self) -> Dict[str, Any]:
        def cand(c: Candidate) -> Dict[str, Any]:
            return {"config": c.config.to_dict(), "short": c.config.short(), "bytes": c.nbytes,
                    "predicted_activation_error": c.predicted, "grad_error": c.error}

        return {"name": self.name, "module_type": self.module_type,
                "tensors": [{"shape": list(s), "dtype": d, "projectable": p} for s, d, p in self.tensors],
                "num_candidates": self.num_candidates, "measured": [cand(c) for c in self.candidates],
                "chosen": cand(self.chosen) if self.chosen else None}


@dataclasses.dataclass
class TuneResult:
    """What :func:`tune` found. ``plan`` is what to pass to :func:`blockquant.convert`."""

    plan: Plan
    layers: List[LayerChoice]
    budget_bytes: Optional[int]
    max_grad_error: Optional[float]
    fp32_bytes: int
    plain_bytes: int
    predicted_bytes: int
    measured_bytes: int
    predicted_error: float
    measured_error: float
    min_bytes: int
    uniform: List[Dict[str, Any]]
    source: str
    refine_moves: List[str]
    timings: Dict[str, float]
    num_nodes: Optional[int] = None
    message: str = ""

    @property
    def compressed(self) -> bool:
        return self.plan.default is not None or any(c is not None for c in self.plan.layers.values())

    def table(self) -> str:
        """Per-layer table: chosen bits, block size, projection, levels, bytes and error share."""
        if not self.compressed:
            return self.message
        head = f"{'layer':<22} {'type':<12} {'bits':>4} {'block':>6} {'proj':>4} {'levels':<8} " \
               f"{'bytes':>11} {'byte %':>6} {'grad err':>9} {'err %':>6}"
        lines = [head, "-" * len(head)]
        total_err = sum(l.chosen.error or 0.0 for l in self.layers if l.chosen) or 1.0
        for l in self.layers:
            c = l.chosen
            cfg = c.config
            lines.append(f"{l.name:<22} {l.module_type[:12]:<12} {cfg.bits:>4} {str(cfg.block_size):>6} "
                         f"{cfg.rp_ratio:>4} {cfg.levels:<8} {c.nbytes:>11,} "
                         f"{100 * c.nbytes / max(self.measured_bytes, 1):>5.1f}% {c.error:>9.2e} "
                         f"{100 * (c.error or 0.0) / total_err:>5.1f}%")
        lines.append("-" * len(head))
        lines.append(f"{'other saved tensors':<22} {'(plain)':<12} {'':>4} {'':>6} {'':>4} {'':<8} "
                     f"{self.plain_bytes:>11,} {100 * self.plain_bytes / max(self.measured_bytes, 1):>5.1f}%")
        per_node = f" ({self.measured_bytes / self.num_nodes:.1f} B/node)" if self.num_nodes else ""
        lines.append(f"total: predicted {self.predicted_bytes:,} B, measured {self.measured_bytes:,} B{per_node} "
                     f"= {self.measured_bytes / 2**20:.3f} MiB ({100 * self.measured_bytes / self.fp32_bytes:.1f}% "
                     f"of fp32 {self.fp32_bytes:,} B)")
        lines.append(f"gradient error (relative squared): predicted {self.predicted_error:.3e}, measured "
                     f"{self.measured_error:.3e}; plan from {self.source}")
        if self.budget_bytes is not None:
            lines.append(f"budget {self.budget_bytes:,} B; smallest achievable {self.min_bytes:,} B")
        if self.refine_moves:
            lines.append("refinement kept: " + "; ".join(self.refine_moves))
        best_u = self.best_uniform()
        if best_u is not None:
            lines.append(f"best uniform config within the same bytes: {best_u['short']} ({best_u['bytes']:,} B, "
                         f"grad error {best_u['grad_error']:.3e})")
        if self.message:
            lines.append(self.message)
        return "\n".join(lines)

    def best_uniform(self) -> Optional[Dict[str, Any]]:
        fits = [u for u in self.uniform if u["bytes"] <= self.measured_bytes and u.get("grad_error") is not None]
        return min(fits, key=lambda u: u["grad_error"]) if fits else None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "plan": self.plan.to_dict(), "layers": [l.to_dict() for l in self.layers],
            "budget_bytes": self.budget_bytes, "max_grad_error": self.max_grad_error,
            "fp32_bytes": self.fp32_bytes, "plain_bytes": self.plain_bytes,
            "predicted_bytes": self.predicted_bytes, "measured_bytes": self.measured_bytes,
            "predicted_error": self.predicted_error, "measured_error": self.measured_error,
            "min_bytes": self.min_bytes, "uniform": self.uniform, "source": self.source,
            "refine_moves": self.refine_moves, "timings": self.timings, "num_nodes": self.num_nodes,
            "message": self.message,
        }

    def plot(self, path: str, title: str = "") -> str:
        """PNG: gradient error vs bytes of the uniform configs (and their Pareto front) and the tuned plan."""
        from ._optional import require

        require("matplotlib", "tune's plot (pareto.png)").use("Agg", force=True)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 5))
        pts = [(u["bytes"], u["grad_error"], u["short"]) for u in self.uniform if u.get("grad_error")]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, c="0.6", label="uniform configs")
            front, best = [], math.inf
            for b, e, s in sorted(pts):
                if e < best:
                    front.append((b, e, s))
                    best = e
            ax.plot([p[0] for p in front], [p[1] for p in front], "-o", c="tab:blue", ms=4,
                    label="uniform Pareto front")
            for b, e, s in front:
                ax.annotate(s, (b, e), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if self.compressed and self.measured_error > 0:
            ax.scatter([self.measured_bytes], [self.measured_error], marker="*", s=180, c="tab:red", zorder=5,
                       label=f"tuned plan ({self.measured_bytes:,} B)")
        if self.budget_bytes is not None:
            ax.axvline(self.budget_bytes, ls="--", c="tab:red", lw=0.8, label="budget")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes held for backward (track_saved)")
        ax.set_ylabel("relative squared weight-gradient error")
        ax.set_title(title or "memory vs gradient error")
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def write(self, out_dir: str, title: str = "") -> List[str]:
        """Write ``plan.json``, ``tune.json``, ``tune_table.txt`` and ``pareto.png`` into ``out_dir``."""
        os.makedirs(out_dir, exist_ok=True)
        paths = [os.path.join(out_dir, n) for n in ("plan.json", "tune.json", "tune_table.txt", "pareto.png")]
        self.plan.to_json(paths[0])
        with open(paths[1], "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        with open(paths[2], "w") as f:
            f.write(self.table() + "\n")
        self.plot(paths[3], title)
        return paths


# ----------------------------------------------------------------------------- allocation


def _hull(cands: List[Candidate]) -> List[Candidate]:
    """Lower convex hull of (bytes, error), from fewest bytes up, error strictly falling."""
    pts = sorted(cands, key=lambda c: (c.nbytes, c.error))
    pareto: List[Candidate] = []
    for c in pts:
        if not pareto or c.error < pareto[-1].error:
            if pareto and pareto[-1].nbytes == c.nbytes:
                pareto[-1] = c
            else:
                pareto.append(c)
    hull: List[Candidate] = []
    for c in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a-c: drop it
            if (b.error - a.error) * (c.nbytes - a.nbytes) >= (c.error - a.error) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def _allocate(layers: List[LayerChoice], room: Optional[int], max_error: Optional[float]) -> Dict[str, Candidate]:
    """Greedy marginal gain on each layer's hull, then single-layer swaps that fit.

    ``room``: bytes available to the layers (budget minus plain bytes), or ``None``
    with ``max_error``: add bytes until the predicted error is at most ``max_error``.
    """
    hulls = {l.name: _hull(l.candidates) for l in layers}
    pos = {n: 0 for n in hulls}
    pick = {n: h[0] for n, h in hulls.items()}
    used = sum(c.nbytes for c in pick.values())
    err = sum(c.error for c in pick.values())
    while max_error is None or err > max_error:
        best = None
        for n, h in hulls.items():
            i = pos[n]
            if i + 1 >= len(h):
                continue
            db = h[i + 1].nbytes - h[i].nbytes
            de = h[i].error - h[i + 1].error
            if room is not None and used + db > room:
                continue
            gain = de / max(db, 1)
            if best is None or gain > best[0]:
                best = (gain, n)
        if best is None:
            break
        n = best[1]
        used += hulls[n][pos[n] + 1].nbytes - hulls[n][pos[n]].nbytes
        err -= hulls[n][pos[n]].error - hulls[n][pos[n] + 1].error
        pos[n] += 1
        pick[n] = hulls[n][pos[n]]
    if room is not None:  # fill what is left with any single-layer change that fits and helps
        improved = True
        while improved:
            improved = False
            for l in layers:
                cur = pick[l.name]
                for c in l.candidates:
                    if c.error < cur.error and used - cur.nbytes + c.nbytes <= room:
                        used += c.nbytes - cur.nbytes
                        cur = pick[l.name] = c
                        improved = True
    return pick


def _prune(cands: List[Candidate], max_keep: int, tolerance: float) -> List[Candidate]:
    """Keep candidates that no other one beats on both bytes and predicted error by more than ``tolerance``."""
    order = sorted(cands, key=lambda c: (c.nbytes, c.predicted))
    kept, slack = [], []
    best = math.inf
    for c in order:
        if c.predicted < best:
            kept.append(c)
        elif c.predicted <= best * (1.0 + tolerance):
            slack.append(c)
        best = min(best, c.predicted)
    if len(kept) > max_keep:  # spread the survivors evenly over the byte range
        idx = sorted({round(i * (len(kept) - 1) / (max_keep - 1)) for i in range(max_keep)})
        kept = [kept[i] for i in idx]
    room = max_keep - len(kept)
    if room > 0 and slack:
        slack.sort(key=lambda c: c.predicted / max(min(k.predicted for k in kept if k.nbytes <= c.nbytes), 1e-300))
        kept += slack[:room]
    return sorted(kept, key=lambda c: c.nbytes)


# ----------------------------------------------------------------------------- tune


def _resolve_budget(budget) -> Tuple[Optional[int], Optional[QuantConfig]]:
    if budget is None:
        return None, None
    if isinstance(budget, bool):
        raise TypeError("tune: budget must be a number of bytes, a QuantConfig or a preset name; got a bool")
    if isinstance(budget, (int, float)):
        if not budget > 0 or not math.isfinite(budget):
            raise TuneError(f"tune: budget must be a positive number of bytes; got {budget}")
        return int(budget), None
    if isinstance(budget, str):
        return None, QuantConfig.preset(budget)
    if isinstance(budget, QuantConfig):
        return None, budget
    raise TypeError(f"tune: budget must be a number of bytes, a QuantConfig or a preset name; "
                    f"got {type(budget).__name__}")


def tune(model: torch.nn.Module, data, budget: Union[int, float, str, QuantConfig, None] = None, *,
         max_grad_error: Optional[float] = None, candidates: Optional[Sequence[QuantConfig]] = None,
         probe_steps: Sequence[int] = (0, 10), seed: int = 0, max_candidates_per_layer: int = 16,
         prune_tolerance: float = 0.25, refine: bool = True, uniform_grid: Sequence[QuantConfig] = UNIFORM_GRID,
         loss_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, progress: bool = True) -> TuneResult:
    """Find a per-layer plan minimising the weight-gradient error within a memory budget.

    Args:
        model: the (unconverted) model; called as ``model(data.x, data.edge_index)``. Not modified.
        data: a PyG ``Data`` (``x``, ``edge_index``, ``y``, ``train_mask``) or a
            ``blockquant.bench`` dataset (``split["train"]``).
        budget: bytes held for backward after the forward (as :func:`track_saved`
            measures them, data excluded), or a ``QuantConfig``/preset name meaning
            "the bytes of that config applied uniformly".
        max_grad_error: instead of a budget: the fewest bytes whose predicted
            relative squared gradient error is at most this.
        candidates: the per-layer candidate grid (default :func:`candidate_configs`).
        probe_steps: fp32 training steps at which the weights are probed (one
            forward+backward per probe and candidate).
        seed: makes the whole run deterministic.
        max_candidates_per_layer, prune_tolerance: how many candidates per layer
            survive the variance-model pruning to be measured.
        refine: try one-step moves per layer on the verified plan.
        loss_fn: ``loss_fn(model_output) -> loss``; default cross-entropy on the training nodes.

    Returns:
        a :class:`TuneResult`; ``result.plan`` goes to :func:`blockquant.convert`.

    Raises:
        TuneError: the budget is below the smallest achievable (the message says
            what that is), or ``max_grad_error`` cannot be reached.
    """
    from tqdm.auto import tqdm

    from .nn.registry import CompressedModule

    if (budget is None) == (max_grad_error is None):
        raise TuneError("tune: give exactly one of budget (bytes, or a uniform config whose bytes to match) "
                        "and max_grad_error")
    if max_grad_error is not None and not (max_grad_error > 0 and math.isfinite(max_grad_error)):
        raise TuneError(f"tune: max_grad_error must be a positive number; got {max_grad_error}")
    budget_bytes, budget_config = _resolve_budget(budget)
    if not probe_steps:
        raise TuneError("tune: probe_steps must name at least one step, e.g. (0, 10)")
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    loss_fn = loss_fn or _default_loss(data)
    default_cfg = QuantConfig.preset("default")
    grid = list(candidates) if candidates is not None else candidate_configs()

    torch_state = torch.random.get_rng_state()
    try:
        prober = _Prober(model, data, loss_fn, probe_steps, seed)
        fp32_bytes = prober.saved_bytes(Plan.uniform(None))
        # which modules convert swaps, and which of them compress anything config-dependent
        probe_copy = copy.deepcopy(prober.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from .conversion import convert

            probe_copy = convert(probe_copy, default_cfg)
        swapped = [(n, type(m).wraps.__name__) for n, m in probe_copy.named_modules()
                   if isinstance(m, CompressedModule) and n]
        del probe_copy
        swapped_names = [n for n, _ in swapped]

        def alone(name: str, cfg: QuantConfig) -> Dict[str, Optional[QuantConfig]]:
            spec: Dict[str, Optional[QuantConfig]] = {"": None, name: cfg}
            for other in swapped_names:
                if other.startswith(name + "."):
                    spec[other] = None
            return spec

        stats_cfg = QuantConfig(bits=8, block_size=16, rp_ratio=1, levels="uniform", meta_dtype=torch.float32)
        proj_cfg = QuantConfig(bits=8, block_size=16, rp_ratio=2, levels="uniform", meta_dtype=torch.float32)
        layers: List[LayerChoice] = []
        t0 = time.perf_counter()
        for name, tname in swapped:
            exact = prober.capture(alone(name, stats_cfg))
            estimators = prober.estimators
            if not exact:
                continue
            projected = prober.capture(alone(name, proj_cfg))
            if len(projected) != len(exact):
                raise TuneError(f"tune: layer {name!r} compressed {len(exact)} tensors in one pass and "
                                f"{len(projected)} in another; cannot profile it")
            key = lambda p: (tuple(p.shape), str(p.dtype))  # noqa: E731
            exact.sort(key=key)
            projected.sort(key=key)
            tensors = [_CapturedTensor(tuple(p.shape), str(p.dtype).replace("torch.", ""),
                                       q.proj_dims is not None or q.config.rp_ratio > 1,
                                       p.dequantize().float())
                       for p, q in zip(exact, projected)]
            for p, t in zip(exact, tensors):
                if p.nbytes != t.nbytes(p.config):
                    raise TuneError(f"tune: the byte formula gives {t.nbytes(p.config)} B for a {p!r} holding "
                                    f"{p.nbytes} B; the codec's layout changed (update blockquant.tune.packed_nbytes)")
            layers.append(LayerChoice(name, tname, [(t.shape, t.dtype, t.projectable) for t in tensors], [],
                                      len(grid), captured=tensors, estimators=estimators))
        if not layers:
            raise TuneError("tune: no compressible layer found (convert swaps no module that compresses a "
                            "config-dependent tensor in this model)")

        # byte model: plain bytes of the converted model (independent of the configs) + layers' bytes
        def layer_bytes(layer: LayerChoice, cfg: QuantConfig) -> int:
            return (sum(t.nbytes(cfg) for t in layer.captured)
                    + sum(square_estimator_nbytes(shape, cfg, count, packed_nbytes)
                          for shape, count in layer.estimators))

        ref_plan = Plan({l.name: default_cfg for l in layers}, default=default_cfg)
        plain_bytes = prober.saved_bytes(ref_plan) - sum(layer_bytes(l, default_cfg) for l in layers)
        timings["capture_s"] = time.perf_counter() - t0

        def plan_bytes(cfgs: Dict[str, QuantConfig]) -> int:
            return plain_bytes + sum(layer_bytes(l, cfgs[l.name]) for l in layers)

        if budget_config is not None:
            budget_bytes = plan_bytes({l.name: budget_config for l in layers})

        # 1. profile: variance-model pruning, then measure the survivors
        t0 = time.perf_counter()
        todo: List[Tuple[LayerChoice, Candidate]] = []
        for l in layers:
            cands = [Candidate(c, layer_bytes(l, c),
                               sum(t.predicted_error(c) for t in l.captured))
                     for c in grid]
            # identical (bytes, prediction) pairs are the same measurement in practice: keep the first
            uniq: Dict[Tuple[int, float], Candidate] = {}
            for c in cands:
                uniq.setdefault((c.nbytes, round(c.predicted, 12)), c)
            l.candidates = _prune(list(uniq.values()), max_candidates_per_layer, prune_tolerance)
            todo.extend((l, c) for c in l.candidates)
        timings["predict_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for l, c in tqdm(todo, desc="tune: profiling layers x candidates", disable=not progress,
                         dynamic_ncols=True):
            c.error = prober.error(alone(l.name, c.config))
        timings["profile_s"] = time.perf_counter() - t0
        timings["profile_passes"] = float(len(todo) * len(prober.states))

        min_bytes = plain_bytes + sum(min(c.nbytes for c in l.candidates) for l in layers)
        uniform_meta: List[Dict[str, Any]] = []

        def finish(plan: Plan, predicted_bytes: int, predicted_err: float, measured_err: float, source: str,
                   moves: List[str], message: str = "") -> TuneResult:
            measured_bytes = prober.saved_bytes(plan)
            if measured_bytes != predicted_bytes:
                warnings.warn(f"blockquant.tune: predicted {predicted_bytes} B but track_saved measured "
                              f"{measured_bytes} B for the plan (a layer's saved tensors depend on another "
                              f"layer's config)", RuntimeWarning, stacklevel=3)
            timings["total_s"] = time.perf_counter() - t_start
            for layer in layers:
                layer.captured = []  # drop the activation samples
            n = getattr(data, "num_nodes", None)
            return TuneResult(plan=plan, layers=layers, budget_bytes=budget_bytes, max_grad_error=max_grad_error,
                              fp32_bytes=fp32_bytes, plain_bytes=plain_bytes, predicted_bytes=predicted_bytes,
                              measured_bytes=measured_bytes, predicted_error=predicted_err,
                              measured_error=measured_err, min_bytes=min_bytes, uniform=uniform_meta,
                              source=source, refine_moves=moves, timings=timings,
                              num_nodes=int(n) if n is not None else None, message=message)

        if budget_bytes is not None and budget_bytes >= fp32_bytes:
            for l in layers:
                l.chosen = None
            msg = (f"budget {budget_bytes:,} B is at or above full precision ({fp32_bytes:,} B held for backward "
                   f"without compression): no compression chosen")
            res = finish(Plan.uniform(None), fp32_bytes, 0.0, 0.0, "full precision", [], msg)
            return res
        if budget_bytes is not None and budget_bytes < min_bytes:
            raise TuneError(f"budget {budget_bytes:,} B ({budget_bytes / 2**20:.3f} MiB) cannot be met: the smallest "
                            f"achievable is {min_bytes:,} B ({min_bytes / 2**20:.3f} MiB) for this model and data")

        # 2. allocate
        t0 = time.perf_counter()
        room = None if budget_bytes is None else budget_bytes - plain_bytes
        pick = _allocate(layers, room, max_grad_error)
        pred_err = sum(c.error for c in pick.values())
        if max_grad_error is not None and pred_err > max_grad_error:
            raise TuneError(f"max_grad_error {max_grad_error:.3e} cannot be met: the smallest predicted gradient "
                            f"error among the candidates is {pred_err:.3e}")
        if max_grad_error is not None:
            budget_limit = plan_bytes({n: c.config for n, c in pick.items()})
        else:
            budget_limit = budget_bytes

        def make_plan(cfgs: Dict[str, QuantConfig], source: str) -> Plan:
            return Plan({l.name: cfgs[l.name] for l in layers}, default=default_cfg, info={"source": source})

        cfgs = {n: c.config for n, c in pick.items()}
        plan = make_plan(cfgs, "greedy allocation")
        measured = prober.error(plan)
        source = "greedy allocation"
        timings["allocate_s"] = time.perf_counter() - t0

        # 3a. uniform configs: measured for the Pareto plot, and taken if one beats the plan
        t0 = time.perf_counter()
        for u in tqdm(list(uniform_grid), desc="tune: uniform configs", disable=not progress, dynamic_ncols=True):
            ub = plan_bytes({l.name: u for l in layers})
            rec = {"config": u.to_dict(), "short": u.short(), "bytes": ub, "grad_error": prober.error(
                Plan({l.name: u for l in layers}, default=default_cfg))}
            uniform_meta.append(rec)
            if ub <= budget_limit and rec["grad_error"] < measured:
                measured, cfgs, source = rec["grad_error"], {l.name: u for l in layers}, f"uniform {u.short()}"
        timings["uniform_s"] = time.perf_counter() - t0
        plan = make_plan(cfgs, source)

        # 3b. refine: one-step moves per layer at equal or fewer bytes
        t0 = time.perf_counter()
        moves: List[str] = []
        if refine:
            cur_bytes = plan_bytes(cfgs)
            for l in layers:
                cfg = cfgs[l.name]
                options = []
                bi = BITS.index(cfg.bits)
                for nb in (BITS[bi - 1] if bi > 0 else None, BITS[bi + 1] if bi + 1 < len(BITS) else None):
                    if nb is not None:  # 1-bit "optimal" levels are the uniform ones: one name for it
                        options.append(cfg.replace(bits=nb, levels="uniform" if nb == 1 else cfg.levels))
                if cfg.block_size != ROW:
                    for g in (cfg.block_size * 2, cfg.block_size // 2):
                        if 16 <= g <= MAX_BLOCK_SIZE:
                            options.append(cfg.replace(block_size=g))
                for opt in options:
                    trial = dict(cfgs, **{l.name: opt})
                    tb = plan_bytes(trial)
                    if tb > cur_bytes:
                        continue
                    e = prober.error(make_plan(trial, "refined"))
                    if e < measured:
                        moves.append(f"{l.name}: {cfg.short()} -> {opt.short()} (err {measured:.3e} -> {e:.3e})")
                        cfgs, measured, cur_bytes, cfg = trial, e, tb, opt
                        source = source if source.endswith("+ refinement") else source + " + refinement"
            plan = make_plan(cfgs, source)
        timings["refine_s"] = time.perf_counter() - t0

        for l in layers:
            cfg = cfgs[l.name]
            match = next((c for c in l.candidates if c.config == cfg), None)
            if match is None:  # from the uniform fallback or refinement: measure this layer alone
                match = Candidate(cfg, layer_bytes(l, cfg), sum(t.predicted_error(cfg) for t in l.captured),
                                  prober.error(alone(l.name, cfg)))
            l.chosen = match
        pred_err = sum(l.chosen.error for l in layers)
        plan.info.update({"budget_bytes": budget_bytes, "predicted_bytes": plan_bytes(cfgs),
                          "predicted_grad_error": pred_err, "measured_grad_error": measured})
        res = finish(plan, plan_bytes(cfgs), pred_err, measured, source, moves)
        plan.info["measured_bytes"] = res.measured_bytes
        return res
    finally:
        torch.random.set_rng_state(torch_state)
