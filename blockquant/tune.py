"""Choose bits, block size, projection and levels per layer, from measurements, under a memory budget.

:func:`tune` (and ``blockquant tune``) runs five phases, each a function of this module that can be
read and called on its own:

1. :func:`profile_layers`. The compressible layers are the modules :func:`blockquant.convert` swaps whose
   saved bytes depend on the config (a ReLU's 1-bit mask or a Dropout's seed do not). For each one,
   a forward with only that layer converted captures the tensors it compresses (shape, dtype,
   whether the wrapper projects it). The bytes of any candidate then follow from the codec's byte
   formula (:func:`blockquant.packed.packed_nbytes`), and the bytes of a plan are the *plain*
   bytes of the converted model (everything :func:`blockquant.track_saved` counts that no layer's
   config changes, measured once) plus its layers' bytes. The block variance model of
   ALGORITHM.md (per-block ranges of the captured activations, i-Exact's clipped-normal rounding
   variance for the levels, projection variance ``(D-1)/R ||H||^2``) predicts each candidate's
   reconstruction error; candidates that another one beats on both predicted error and bytes are
   pruned. The survivors are *measured*: the relative squared error of all weight gradients
   against full precision with only that layer compressed, one forward+backward per probe (a few
   probes: weights at a few early fp32 training steps, one rounding seed each; dropout on, with
   the same masks in both models, see :class:`blockquant.probes.Prober`). Cost: layers x
   surviving candidates x probes passes. With ``max_noise_ratio`` the errors are divided by the
   variance dropout causes instead (:func:`blockquant.noise_report`).
2. :func:`allocate`. Independent zero-mean rounding noises add in variance, so a plan's predicted
   error is the sum of its layers' measured errors. A greedy marginal-gain allocation over each
   layer's lower convex hull (error saved per byte spent), then single-layer swaps that still fit,
   minimises the predicted error within the bytes left to the layers.
3. :func:`allocate_verified` (with :func:`verify_plan`). The plan is converted onto a fresh copy of
   the model and measured as the user will measure it: bytes with :func:`blockquant.track_saved`
   (data excluded) and the gradient error with the same probes. A plan holding more than the budget
   is never returned: the allocation is redone with the layers' room reduced by the excess (the byte
   model's miss), and if that does not converge the result falls back to the budget's own uniform
   config (or to the smallest plan, or raises :class:`TuneError`).
4. :func:`refine_plan` (after :func:`measure_uniform`). Uniform configs that fit the budget
   (measured) and beat the plan (measured) are taken instead, so the tuned plan is never worse than
   the best uniform config at its bytes in the tuner's own measurement; then one-step moves per
   layer (bits up/down, block doubled/halved) are kept when they lower the measured error and the
   measured bytes stay within the budget.
5. :func:`report`. :class:`TuneResult` has the per-layer table, the plan (:class:`blockquant.Plan`,
   JSON for ``convert``/``bench --configs``), the uniform configs' memory/error points and a Pareto
   plot.

A budget given as a config (``budget="iexact"``) means the bytes ``track_saved`` measures for
``convert(model, "iexact")``, data excluded; the modules the plan does not name keep that config.
Every conversion the tuner measures starts from a fresh copy of the unconverted model, as a user's
does. The caller's random state (the CPU generator and those of the devices the model and data are
on) is the same after :func:`tune` as before.
"""
from __future__ import annotations

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
from .packed import packed_nbytes, stored_shape
from .plan import Plan
from .probes import ProbeError, Prober, caller_rng_kept, default_loss

__all__ = ["tune", "TuneResult", "TuneError", "LayerChoice", "candidate_configs", "gradient_error"]

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
        stored = stored_shape(self.shape, cfg)
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
    from .save_policy import RowChunks

    if depth > 5 or obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, (_EstimatorChunks, PackedTensor, RowChunks)):
        # one tensor each: a normalisation's xn**2 estimator (bytes from its own rule), a packed
        # tensor, or a large tensor compressed in row blocks (the bytes of one packed tensor)
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
    """Every compressed tensor the autograd graph behind ``outputs`` holds, in a stable order."""
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


@dataclasses.dataclass
class _Captured:
    """What one forward compressed for one layer: the tensors (packed or in row blocks) and the
    normalisations' ``xn ** 2`` estimators (``(input shape, count)``)."""

    tensors: List[Any]
    estimators: List[Tuple[Tuple[int, ...], int]]


def _first_part(p: Any) -> Any:
    """The PackedTensor of a packed tensor, or the first row block of one compressed in row blocks."""
    return p.parts[0] if hasattr(p, "parts") else p


# ----------------------------------------------------------------------------- measurement


def _capture(prober: Prober, spec) -> _Captured:
    """What one training forward (dropout on, as in training) compresses with the model converted by ``spec``."""
    from .functional import _EstimatorChunks

    out = prober.training_output(spec)
    found = _packed_in_graph([out])
    del out
    return _Captured([p for p in found if not isinstance(p, _EstimatorChunks)],
                     [(e.shape, e.count) for e in found if isinstance(e, _EstimatorChunks)])


def gradient_error(model: torch.nn.Module, data, config, *, probe_steps: Sequence[int] = (0, 10), seed: int = 0,
                   loss_fn=None) -> float:
    """Relative squared weight-gradient error of ``convert(model, config)`` against full
    precision, averaged over the probes :func:`tune` uses (the model is not modified)."""
    with caller_rng_kept(model, data) as seed_all:
        prober = Prober(model, data, loss_fn or default_loss(data), probe_steps, seed, seed_all)
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
    error_unit: str = Prober.GRADIENT
    """The unit of the errors. The relative squared gradient error, or (with ``max_noise_ratio``)
    the variance compression adds to the weight gradients over the variance dropout causes."""
    max_noise_ratio: Optional[float] = None
    noise_ratio: Optional[float] = None
    """The plan's compression variance over dropout's variance at the probe weights (``None``
    when the model has no dropout); see :func:`blockquant.noise_report`."""

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
        lines.append(f"error ({self.error_unit}): predicted {self.predicted_error:.3e}, measured "
                     f"{self.measured_error:.3e}; plan from {self.source}")
        if self.noise_ratio is not None:
            lines.append(f"compression noise: {100 * self.noise_ratio:.1f}% of the variance dropout causes in the "
                         f"weight gradients (at the probe weights)")
        if self.budget_bytes is not None:
            lines.append(f"budget {self.budget_bytes:,} B; smallest achievable {self.min_bytes:,} B")
        if self.refine_moves:
            lines.append("refinement kept: " + "; ".join(self.refine_moves))
        best_u = self.best_uniform()
        if best_u is not None:
            lines.append(f"best uniform config within the same bytes: {best_u['short']} ({best_u['bytes']:,} B, "
                         f"error {best_u['grad_error']:.3e})")
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
            "message": self.message, "error_unit": self.error_unit, "max_noise_ratio": self.max_noise_ratio,
            "noise_ratio": self.noise_ratio,
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
        ax.set_ylabel(self.error_unit)
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


# ----------------------------------------------------------------------------- what the phases share


@dataclasses.dataclass
class PlanState:
    """A plan under consideration: one config per layer, the config of every other module, where
    it came from, and what it holds and costs as measured on a fresh converted copy."""

    configs: Dict[str, QuantConfig]
    default: QuantConfig
    source: str
    held_bytes: int
    grad_error: float


@dataclasses.dataclass
class Session:
    """The prober, the layers :func:`profile_layers` found and the byte model of their plans."""

    prober: Prober
    layers: List["LayerChoice"]
    base: QuantConfig
    """The config of every module a plan does not name (the budget's config, else the default preset)."""
    plain_bytes: int
    """Bytes that no layer's config changes (measured with every module at ``base``)."""
    fp32_bytes: int
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> List[str]:
        return [l.name for l in self.layers]

    def predicted_bytes(self, configs: Dict[str, QuantConfig]) -> int:
        """The byte model: plain bytes plus each layer's bytes by the codec's formula."""
        return self.plain_bytes + sum(layer_bytes(l, configs[l.name]) for l in self.layers)

    def plan(self, configs: Dict[str, QuantConfig], source: str = "", default: Optional[QuantConfig] = None) -> Plan:
        return Plan({l.name: configs[l.name] for l in self.layers}, default=default or self.base,
                    info={"source": source} if source else None)

    def min_bytes(self) -> int:
        return self.plain_bytes + sum(min(c.nbytes for c in l.candidates) for l in self.layers)


def layer_bytes(layer: "LayerChoice", config: QuantConfig) -> int:
    """Bytes ``layer`` holds at ``config``: its captured tensors by the codec's formula
    (:func:`blockquant.packed.packed_nbytes`) and its normalisations' ``xn ** 2`` estimators."""
    from .functional import square_estimator_nbytes

    return (sum(t.nbytes(config) for t in layer.captured)
            + sum(square_estimator_nbytes(shape, config, count, packed_nbytes) for shape, count in layer.estimators))


def _alone(name: str, config: Optional[QuantConfig], layer_names: Sequence[str]) -> Dict[str, Optional[QuantConfig]]:
    """A conversion spec with only ``name`` compressed (at ``config``), its sub-layers and everything else exact."""
    spec: Dict[str, Optional[QuantConfig]] = {"": None, name: config}
    for other in layer_names:
        if other.startswith(name + "."):
            spec[other] = None
    return spec


# ----------------------------------------------------------------------------- phase 1: profile

# captures at 8 bits in blocks of 16 with float32 metadata: a near-exact sample for the variance model
_CAPTURE_CONFIG = QuantConfig(bits=8, block_size=16, rp_ratio=1, levels="uniform", meta_dtype=torch.float32)
_CAPTURE_PROJECTED = _CAPTURE_CONFIG.replace(rp_ratio=2)  # tells which tensors the wrapper projects


def compressible_modules(prober: Prober, base: QuantConfig) -> List[Tuple[str, str]]:
    """``(name, original type)`` of every module :func:`blockquant.convert` swaps, by the names of the
    unconverted model (a module shared by two parents is named once, as ``named_modules`` does)."""
    from .nn.registry import CompressedModule

    converted = prober.converted(base)
    return [(n, type(m).wraps.__name__) for n, m in converted.named_modules()
            if isinstance(m, CompressedModule) and n and n in prober.known_names]


def capture_layer(prober: Prober, name: str, module_type: str, layer_names: Sequence[str],
                  num_candidates: int) -> Optional["LayerChoice"]:
    """What module ``name`` compresses when it alone is converted; ``None`` when that is nothing
    (its bytes do not depend on the config, or a sub-module holds them)."""
    exact = _capture(prober, _alone(name, _CAPTURE_CONFIG, layer_names))
    if not exact.tensors:
        return None
    projected = _capture(prober, _alone(name, _CAPTURE_PROJECTED, layer_names)).tensors
    if len(projected) != len(exact.tensors):
        raise TuneError(f"tune: layer {name!r} compressed {len(exact.tensors)} tensors in one pass and "
                        f"{len(projected)} in another; cannot profile it")
    key = lambda p: (tuple(p.shape), str(p.dtype))  # noqa: E731
    pairs = zip(sorted(exact.tensors, key=key), sorted(projected, key=key))
    tensors = [_CapturedTensor(tuple(p.shape), str(p.dtype).replace("torch.", ""),
                               _first_part(q).proj_dims is not None or _first_part(q).config.rp_ratio > 1,
                               p.dequantize().float())
               for p, q in pairs]
    return LayerChoice(name, module_type, [(t.shape, t.dtype, t.projectable) for t in tensors], [], num_candidates,
                       captured=tensors, estimators=exact.estimators)


def measure_candidates(prober: Prober, layers: List["LayerChoice"], grid: Sequence[QuantConfig], *,
                       max_candidates: int, prune_tolerance: float, progress: bool) -> int:
    """Each layer's candidates: bytes by formula, error predicted by the variance model, pruned,
    then measured alone. Returns the number of forward+backward passes spent."""
    from tqdm.auto import tqdm

    names = [l.name for l in layers]
    todo: List[Tuple[LayerChoice, Candidate]] = []
    for l in layers:
        cands = [Candidate(c, layer_bytes(l, c), sum(t.predicted_error(c) for t in l.captured)) for c in grid]
        # identical (bytes, prediction) pairs are the same measurement in practice: keep the first
        uniq: Dict[Tuple[int, float], Candidate] = {}
        for c in cands:
            uniq.setdefault((c.nbytes, round(c.predicted, 12)), c)
        l.candidates = _prune(list(uniq.values()), max_candidates, prune_tolerance)
        todo.extend((l, c) for c in l.candidates)
    for l, c in tqdm(todo, desc="tune: profiling layers x candidates", disable=not progress, dynamic_ncols=True):
        c.error = prober.error(_alone(l.name, c.config, names))
    return len(todo) * len(prober.states)


def profile_layers(prober: Prober, base: QuantConfig, grid: Sequence[QuantConfig], *, max_candidates: int,
                   prune_tolerance: float, progress: bool) -> Session:
    """Phase 1: find and capture the compressible layers, measure the plain bytes, measure the
    surviving candidates of every layer."""
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    fp32_bytes = prober.saved_bytes(Plan.uniform(None))
    swapped = compressible_modules(prober, base)
    names = [n for n, _ in swapped]
    layers = [l for l in (capture_layer(prober, n, t, names, len(grid)) for n, t in swapped) if l is not None]
    if not layers:
        raise TuneError("tune: no compressible layer found (convert swaps no module that compresses a "
                        "config-dependent tensor in this model)")
    plain = prober.saved_bytes(Plan.uniform(base)) - sum(layer_bytes(l, base) for l in layers)
    timings["capture_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    passes = measure_candidates(prober, layers, grid, max_candidates=max_candidates, prune_tolerance=prune_tolerance,
                                progress=progress)
    timings["profile_s"] = time.perf_counter() - t0
    timings["profile_passes"] = float(passes)
    return Session(prober, layers, base, plain, fp32_bytes, timings)


# ----------------------------------------------------------------------------- phase 2: allocate


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


def allocate(layers: List[LayerChoice], room: Optional[int], max_error: Optional[float]) -> Dict[str, Candidate]:
    """Phase 2: greedy marginal gain on each layer's hull, then single-layer swaps that fit.

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




# ----------------------------------------------------------------------------- phase 3: verify

_VERIFY_ATTEMPTS = 4


def verify_plan(session: Session, configs: Dict[str, QuantConfig], source: str,
                default: Optional[QuantConfig] = None) -> PlanState:
    """The plan converted onto a fresh copy of the model: bytes as :func:`blockquant.track_saved`
    measures them (data excluded) and the measured gradient error."""
    plan = session.plan(configs, default=default)
    return PlanState(dict(configs), default or session.base, source, session.prober.saved_bytes(plan),
                     session.prober.error(plan))


def allocate_verified(session: Session, budget_bytes: Optional[int], max_grad_error: Optional[float],
                      budget_config: Optional[QuantConfig]) -> Tuple[PlanState, int]:
    """Phases 2 and 3: allocate, verify, and allocate again with less room while the verified
    plan holds more than the budget. Returns the plan and the byte limit later phases keep to
    (the budget; with ``max_grad_error``, the verified plan's bytes)."""
    room = None if budget_bytes is None else budget_bytes - session.plain_bytes
    floor = sum(min(c.nbytes for c in l.candidates) for l in session.layers)
    for _ in range(_VERIFY_ATTEMPTS):
        pick = allocate(session.layers, room, max_grad_error)
        predicted_err = sum(c.error for c in pick.values())
        if max_grad_error is not None and predicted_err > max_grad_error:
            raise TuneError(f"max_grad_error {max_grad_error:.3e} cannot be met: the smallest predicted gradient "
                            f"error among the candidates is {predicted_err:.3e}")
        state = verify_plan(session, {n: c.config for n, c in pick.items()}, "greedy allocation")
        if budget_bytes is None:
            return state, state.held_bytes
        if state.held_bytes <= budget_bytes:
            return state, budget_bytes
        # the byte model missed: ask the allocation for that much less
        room -= state.held_bytes - budget_bytes
        if room < floor:
            break
    if budget_config is not None:  # the budget's own config holds the budget by definition
        state = verify_plan(session, {n: budget_config for n in session.names}, f"uniform {budget_config.short()}",
                            default=budget_config)
    else:
        smallest = {l.name: min(l.candidates, key=lambda c: c.nbytes).config for l in session.layers}
        state = verify_plan(session, smallest, "smallest candidates")
    if state.held_bytes > budget_bytes:
        raise TuneError(f"no plan found within the budget of {budget_bytes:,} B: the smallest plan tried holds "
                        f"{state.held_bytes:,} B as track_saved measures it")
    return state, budget_bytes


# ----------------------------------------------------------------------------- phase 4: refine


def measure_uniform(session: Session, grid: Sequence[QuantConfig], progress: bool) -> List[Dict[str, Any]]:
    """Bytes (track_saved) and measured gradient error of each config applied to the whole model."""
    from tqdm.auto import tqdm

    records = []
    for u in tqdm(list(grid), desc="tune: uniform configs", disable=not progress, dynamic_ncols=True):
        plan = Plan.uniform(u)
        records.append({"config": u.to_dict(), "short": u.short(), "bytes": session.prober.saved_bytes(plan),
                        "grad_error": session.prober.error(plan)})
    return records


def _one_step_moves(config: QuantConfig) -> List[QuantConfig]:
    """Bits one step up or down, block doubled or halved."""
    options = []
    bi = BITS.index(config.bits)
    for nb in (BITS[bi - 1] if bi > 0 else None, BITS[bi + 1] if bi + 1 < len(BITS) else None):
        if nb is not None:  # 1-bit "optimal" levels are the uniform ones: one name for it
            options.append(config.replace(bits=nb, levels="uniform" if nb == 1 else config.levels))
    if config.block_size != ROW:
        for g in (config.block_size * 2, config.block_size // 2):
            if 16 <= g <= MAX_BLOCK_SIZE:
                options.append(config.replace(block_size=g))
    return options


def refine_plan(session: Session, state: PlanState, limit: int, uniform: List[Dict[str, Any]], *,
                moves: bool) -> Tuple[PlanState, List[str]]:
    """Phase 4: a uniform config within ``limit`` bytes (measured) that beats the plan replaces
    it; then one-step moves per layer are kept when they lower the measured error and the
    measured bytes stay within ``limit``."""
    for rec in uniform:
        if rec["bytes"] <= limit and rec["grad_error"] < state.grad_error:
            u = QuantConfig.from_dict(rec["config"])
            state = PlanState({n: u for n in session.names}, u, f"uniform {u.short()}", rec["bytes"],
                              rec["grad_error"])
    kept: List[str] = []
    if not moves:
        return state, kept
    for l in session.layers:
        for option in _one_step_moves(state.configs[l.name]):
            trial = dict(state.configs, **{l.name: option})
            if session.predicted_bytes(trial) > session.predicted_bytes(state.configs):
                continue
            plan = session.plan(trial, default=state.default)
            err = session.prober.error(plan)
            if err >= state.grad_error:
                continue
            held = session.prober.saved_bytes(plan)
            if held > limit:
                continue
            kept.append(f"{l.name}: {state.configs[l.name].short()} -> {option.short()} "
                        f"(err {state.grad_error:.3e} -> {err:.3e})")
            source = state.source if state.source.endswith("+ refinement") else state.source + " + refinement"
            state = PlanState(trial, state.default, source, held, err)
    return state, kept


# ----------------------------------------------------------------------------- phase 5: report


def report(session: Session, state: PlanState, *, budget_bytes: Optional[int], max_error: Optional[float],
           noise_units: bool, uniform: List[Dict[str, Any]], moves: List[str], num_nodes: Optional[int],
           message: str = "") -> TuneResult:
    """Phase 5: the result, with each layer's chosen candidate (measured alone when it came from
    a uniform config or a refinement move) and the plan's compression noise against dropout's."""
    names = session.names
    for l in session.layers:
        cfg = state.configs.get(l.name)
        if cfg is None:  # full precision
            l.chosen = None
            continue
        match = next((c for c in l.candidates if c.config == cfg), None)
        if match is None:
            match = Candidate(cfg, layer_bytes(l, cfg), sum(t.predicted_error(cfg) for t in l.captured),
                              session.prober.error(_alone(l.name, cfg, names)))
        l.chosen = match
    compressed = bool(state.configs)
    predicted_bytes = session.predicted_bytes(state.configs) if compressed else session.fp32_bytes
    predicted_err = sum(l.chosen.error for l in session.layers) if compressed else 0.0
    plan = session.plan(state.configs, state.source, state.default) if compressed else Plan.uniform(None)
    if compressed:
        plan.info.update({"budget_bytes": budget_bytes, "predicted_bytes": predicted_bytes,
                          "predicted_grad_error": predicted_err, "measured_grad_error": state.grad_error,
                          "measured_bytes": state.held_bytes})
    if compressed and state.held_bytes != predicted_bytes:
        warnings.warn(f"blockquant.tune: the byte model predicted {predicted_bytes:,} B for the plan and "
                      f"track_saved measured {state.held_bytes:,} B (a layer's saved tensors depend on another "
                      f"layer's config); the plan was chosen by the measured bytes", RuntimeWarning, stacklevel=3)
    noise = session.prober.noise_ratio(plan) if compressed else (0.0 if session.prober.has_dropout_noise() else None)
    for layer in session.layers:
        layer.captured = []  # drop the activation samples
    return TuneResult(plan=plan, layers=session.layers, budget_bytes=budget_bytes,
                      max_grad_error=None if noise_units else max_error,
                      max_noise_ratio=max_error if noise_units else None, noise_ratio=noise,
                      error_unit=session.prober.unit,
                      fp32_bytes=session.fp32_bytes, plain_bytes=session.plain_bytes, predicted_bytes=predicted_bytes,
                      measured_bytes=state.held_bytes, predicted_error=predicted_err,
                      measured_error=state.grad_error, min_bytes=session.min_bytes(), uniform=uniform,
                      source=state.source, refine_moves=moves, timings=session.timings, num_nodes=num_nodes,
                      message=message)


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



@dataclasses.dataclass(frozen=True)
class _Request:
    """What :func:`tune` was asked, checked and resolved."""

    budget_bytes: Optional[int]
    budget_config: Optional[QuantConfig]
    max_error: Optional[float]  # max_grad_error or max_noise_ratio, in the prober's units
    noise_units: bool
    noise_draws: int
    grid: List[QuantConfig]
    base: QuantConfig
    probe_steps: Tuple[int, ...]
    seed: int
    max_candidates: int
    prune_tolerance: float
    refine: bool
    uniform_grid: Tuple[QuantConfig, ...]
    progress: bool


def tune(model: torch.nn.Module, data, budget: Union[int, float, str, QuantConfig, None] = None, *,
         max_grad_error: Optional[float] = None, max_noise_ratio: Optional[float] = None,
         candidates: Optional[Sequence[QuantConfig]] = None, probe_steps: Sequence[int] = (0, 10), seed: int = 0,
         max_candidates_per_layer: int = 16, prune_tolerance: float = 0.25, refine: bool = True,
         uniform_grid: Sequence[QuantConfig] = UNIFORM_GRID, noise_draws: int = 8,
         loss_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, progress: bool = True) -> TuneResult:
    """Find a per-layer plan minimising the weight-gradient error within a memory budget.

    Args:
        model: the (unconverted) model; called as ``model(data.x, data.edge_index)``. Not modified.
        data: a PyG ``Data`` (``x``, ``edge_index``, ``y``, ``train_mask``) or a
            ``blockquant.bench`` dataset (``split["train"]``).
        budget: bytes held for backward after the forward, as :func:`track_saved`
            measures them with the data excluded (``exclude=(data.x, data.edge_index)``),
            or a ``QuantConfig``/preset name meaning "the bytes of ``convert(model, config)``";
            the plan converted onto a fresh model holds at most that many bytes.
        max_grad_error: instead of a budget: the fewest bytes whose predicted
            relative squared gradient error is at most this.
        max_noise_ratio: instead of a budget: the fewest bytes whose predicted compression
            noise is at most this fraction of dropout's, i.e. the variance compression adds to
            the weight gradients over the variance dropout's own randomness causes at the same
            weights (see :func:`blockquant.noise_report`; the model must use dropout). The
            errors of the result are then in those units.
        candidates: the per-layer candidate grid (default :func:`candidate_configs`).
        probe_steps: fp32 training steps at which the weights are probed (one
            forward+backward per probe and candidate).
        seed: makes the whole run deterministic.
        max_candidates_per_layer, prune_tolerance: how many candidates per layer
            survive the variance-model pruning to be measured.
        refine: try one-step moves per layer on the verified plan.
        noise_draws: dropout draws per probe for dropout's variance (0: not measured, no
            ``noise_ratio`` in the result).
        loss_fn: ``loss_fn(model_output) -> loss``; default cross-entropy on the training nodes.

    Returns:
        a :class:`TuneResult`; ``result.plan`` goes to :func:`blockquant.convert`.

    Raises:
        TuneError: the budget is below the smallest achievable (the message says
            what that is), or ``max_grad_error`` / ``max_noise_ratio`` cannot be reached.
    """
    given = [n for n, v in (("budget", budget), ("max_grad_error", max_grad_error),
                            ("max_noise_ratio", max_noise_ratio)) if v is not None]
    if len(given) != 1:
        raise TuneError("tune: give exactly one of budget (bytes, or a uniform config whose bytes to match), "
                        f"max_grad_error and max_noise_ratio; got {', '.join(given) or 'none'}")
    limit = max_grad_error if max_grad_error is not None else max_noise_ratio
    if limit is not None and not (limit > 0 and math.isfinite(limit)):
        raise TuneError(f"tune: {given[0]} must be a positive number; got {limit}")
    if max_noise_ratio is not None and noise_draws < 2:
        raise TuneError(f"tune: max_noise_ratio needs noise_draws >= 2 to measure dropout's variance; "
                        f"got {noise_draws}")
    budget_bytes, budget_config = _resolve_budget(budget)
    if not probe_steps:
        raise TuneError("tune: probe_steps must name at least one step, e.g. (0, 10)")
    grid = list(candidates) if candidates is not None else candidate_configs()
    if budget_config is not None and budget_config not in grid:
        grid.append(budget_config)  # the uniform plan at the budget is always one the allocation can reach
    request = _Request(budget_bytes, budget_config, limit, max_noise_ratio is not None,
                       noise_draws if noise_draws >= 2 else 0, grid,
                       budget_config if budget_config is not None else QuantConfig.preset("default"),
                       tuple(int(s) for s in probe_steps), seed, max_candidates_per_layer, prune_tolerance, refine,
                       tuple(uniform_grid), progress)
    try:
        return _run_phases(model, data, loss_fn or default_loss(data), request)
    except ProbeError as e:
        raise TuneError(f"tune: {e}") from None


def _run_phases(model: torch.nn.Module, data, loss_fn, req: _Request) -> TuneResult:
    """The five phases in order."""
    t_start = time.perf_counter()
    nodes = getattr(data, "num_nodes", None)
    nodes = int(nodes) if nodes is not None else None
    budget_bytes = req.budget_bytes
    with caller_rng_kept(model, data) as seed_all:
        prober = Prober(model, data, loss_fn, req.probe_steps, req.seed, seed_all, dropout_draws=req.noise_draws)
        if req.noise_units:
            prober.use_dropout_units()
        if req.budget_config is not None:
            budget_bytes = prober.saved_bytes(Plan.uniform(req.budget_config))
        session = profile_layers(prober, req.base, req.grid, max_candidates=req.max_candidates,
                                 prune_tolerance=req.prune_tolerance, progress=req.progress)
        timings = session.timings
        asked = dict(budget_bytes=budget_bytes, max_error=req.max_error, noise_units=req.noise_units, num_nodes=nodes)

        if budget_bytes is not None and budget_bytes >= session.fp32_bytes:
            none = PlanState({}, req.base, "full precision", session.fp32_bytes, 0.0)
            timings["total_s"] = time.perf_counter() - t_start
            return report(session, none, uniform=[], moves=[], **asked,
                          message=f"budget {budget_bytes:,} B is at or above full precision ({session.fp32_bytes:,} "
                                  f"B held for backward without compression): no compression chosen")
        if budget_bytes is not None and budget_bytes < session.min_bytes():
            smallest = session.min_bytes()
            raise TuneError(f"budget {budget_bytes:,} B ({budget_bytes / 2**20:.3f} MiB) cannot be met: the smallest "
                            f"achievable is {smallest:,} B ({smallest / 2**20:.3f} MiB) for this model and data")

        t0 = time.perf_counter()
        state, limit = allocate_verified(session, budget_bytes, req.max_error, req.budget_config)
        timings["allocate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        uniform = measure_uniform(session, req.uniform_grid, req.progress)
        timings["uniform_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        state, moves = refine_plan(session, state, limit, uniform, moves=req.refine)
        timings["refine_s"] = time.perf_counter() - t0
        result = report(session, state, uniform=uniform, moves=moves, **asked)
        timings["total_s"] = time.perf_counter() - t_start
        return result
