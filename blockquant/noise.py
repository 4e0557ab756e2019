"""How much noise compression adds to the weight gradients, against the noise dropout already adds:
:func:`noise_report`.

Full-batch training with dropout already follows a noisy gradient: each step draws new masks.
Compression adds noise of its own (unbiased: zero mean). Both are measured per layer at the same
weights, on private copies of the model (the caller's model and random state are untouched):

* **dropout's variance** ``D``: the variance of the fp32 weight gradient over ``draws`` dropout
  draws (every dropout on, attention dropout included), summed over the layer's parameters;
* **compression's variance** ``C``: ``E ||g - g_fp32||^2`` over ``compression_draws`` draws, each
  with new dropout masks that the converted model and the fp32 model share (dropout called as
  ``F.dropout`` or ``torch.nn.Dropout``; attention dropout off in this comparison) and new rounding,
  so that compression is the only difference (unbiased compression: this is the variance it adds
  where training meets it, on the tensors training compresses);
* their **ratio** ``C / D``: 0.1 means compression adds a tenth of the noise dropout adds.

The weights are those of the unconverted model after each of ``probe_steps`` fp32 Adam steps (lr
0.01), as :func:`blockquant.tune` probes them; the variances are means over those probes, and the
ratio is the ratio of those means. The same
ratio, for the whole model, is what ``blockquant.tune(..., max_noise_ratio=x)`` keeps below ``x``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .probes import Prober, caller_rng_kept, default_loss

__all__ = ["noise_report", "NoiseReport", "LayerNoise"]


@dataclasses.dataclass
class LayerNoise:
    """One layer's gradient noise (sums over its parameters, means over the probes)."""

    layer: str
    num_params: int
    grad_norm2: float
    """``||g_fp32||^2`` (one draw of the dropout masks)."""
    dropout_var: float
    compression_var: float
    ratio: Optional[float]
    """``compression_var / dropout_var`` (``None`` where dropout adds no variance)."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class NoiseReport:
    """What :func:`noise_report` measured: per layer and for the whole model."""

    config: str
    layers: List[LayerNoise]
    total: LayerNoise
    probe_steps: Sequence[int]
    draws: int
    compression_draws: int

    @property
    def ratio(self) -> Optional[float]:
        """The whole model's compression variance over dropout's."""
        return self.total.ratio

    def table(self) -> str:
        head = (f"{'layer':<24} {'params':>9} {'|g|^2':>10} {'dropout var':>12} {'compression var':>15} "
                f"{'compr/dropout':>13}")
        lines = [f"gradient noise of {self.config} vs dropout (probes at steps {tuple(self.probe_steps)}, "
                 f"{self.draws} dropout draws, {self.compression_draws} compression draws)", head, "-" * len(head)]

        def row(r: LayerNoise) -> str:
            ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
            return (f"{r.layer:<24} {r.num_params:>9,} {r.grad_norm2:>10.3e} {r.dropout_var:>12.3e} "
                    f"{r.compression_var:>15.3e} {ratio:>13}")

        lines += [row(r) for r in self.layers]
        lines += ["-" * len(head), row(self.total)]
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {"config": self.config, "layers": [r.to_dict() for r in self.layers], "total": self.total.to_dict(),
                "probe_steps": list(self.probe_steps), "draws": self.draws,
                "compression_draws": self.compression_draws}


def _layer_of(param_names: Sequence[str], converted: torch.nn.Module) -> List[str]:
    """Each parameter's layer: the outermost compressed wrapper holding it, else the module owning it."""
    from .nn.registry import CompressedModule

    wrappers = [n for n, m in converted.named_modules() if isinstance(m, CompressedModule) and n]
    outer = [n for n in wrappers if not any(n.startswith(o + ".") for o in wrappers)]
    out = []
    for p in param_names:
        owner = next((w for w in outer if p.startswith(w + ".")), None)
        out.append(owner if owner is not None else (p.rsplit(".", 1)[0] if "." in p else "<root>"))
    return out


def noise_report(model: torch.nn.Module, data, config: Any = "iexact", *, probe_steps: Sequence[int] = (0, 10),
                 draws: int = 16, compression_draws: int = 8, seed: int = 0,
                 loss_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> NoiseReport:
    """Per layer, the variance compression with ``config`` adds to the weight gradients against the
    variance dropout's own randomness causes at the same weights (see the module docstring).

    Args:
        model: the unconverted model, called as ``model(data.x, data.edge_index)``; not modified.
        data: a PyG ``Data`` with ``y`` and ``train_mask`` (or a ``blockquant.bench`` dataset).
        config: what :func:`blockquant.convert` takes: a preset name, a ``QuantConfig`` or a plan.
        probe_steps: fp32 training steps after which the weights are probed.
        draws: dropout draws per probe (fp32, dropout on).
        compression_draws: draws per probe of the compressed gradient (dropout masks paired with fp32's).
        seed: makes the measurement deterministic.
        loss_fn: ``loss_fn(model_output) -> loss``; default cross-entropy on the training nodes.

    Returns:
        a :class:`NoiseReport` (``.table()``, ``.ratio``, ``.layers``).
    """
    if draws < 2:
        raise ValueError(f"noise_report: draws must be at least 2 to measure a variance; got {draws}")
    if compression_draws < 1:
        raise ValueError(f"noise_report: compression_draws must be at least 1; got {compression_draws}")
    if not probe_steps:
        raise ValueError("noise_report: probe_steps must name at least one step, e.g. (0, 10)")
    with caller_rng_kept(model, data) as seed_all:
        prober = Prober(model, data, loss_fn or default_loss(data), probe_steps, seed, seed_all, dropout_draws=draws)
        compression = prober.squared_errors(config, compression_draws)
        layer_names = _layer_of(prober.names, prober.converted(config))
    order = list(dict.fromkeys(layer_names))
    # coordinate ranges of each parameter in the flat gradient
    bounds, start = [], 0
    for size in prober.sizes:
        bounds.append((start, start + size))
        start += size

    def summed(vec: torch.Tensor, layer: Optional[str]) -> float:
        if layer is None:
            return float(vec.sum())
        return sum(float(vec[a:b].sum()) for (a, b), n in zip(bounds, layer_names) if n == layer)

    def row(layer: Optional[str]) -> LayerNoise:
        probes = range(len(prober.states))
        d = [summed(prober.dropout_var[i], layer) for i in probes]
        c = [summed(compression[i], layer) for i in probes]
        g = [summed(prober.ref[i].pow(2), layer) for i in probes]
        params = (sum(b - a for (a, b), n in zip(bounds, layer_names) if n == layer) if layer is not None
                  else sum(prober.sizes))
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return LayerNoise(layer or "total", params, mean(g), mean(d), mean(c),
                          mean(c) / mean(d) if mean(d) > 0 else None)

    name = config if isinstance(config, str) else getattr(config, "short", lambda: type(config).__name__)()
    return NoiseReport(str(name), [row(n) for n in order], row(None), tuple(probe_steps), draws, compression_draws)
