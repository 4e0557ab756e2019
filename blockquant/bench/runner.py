"""Run one benchmark: every configuration on the same data, model shape, seeds and epochs.

For each configuration the runner measures, on the first seed and before any
optimizer step (same initial weights for every configuration):

* activation memory: bytes the autograd graph holds for backward after one
  training-mode forward, excluding the data, the model and the output. Taken
  from :func:`blockquant.track_saved` when available and cross-checked by the
  net allocation during that forward (GPU: ``torch.cuda.memory_allocated``
  delta; CPU: allocations recorded by ``torch.profiler``), minus the output.
  ``checkpoint`` keeps its block inputs outside autograd's saved tensors, so its
  row adds those inputs explicitly (and the allocation delta confirms it);
* peak memory of one forward+backward (GPU: ``torch.cuda.max_memory_allocated``;
  CPU: peak of the profiler's allocation trace), above the memory in use before;
* the relative error of all weight gradients against ``fp32`` (dropout off,
  BatchNorm in training mode, so the only difference is the compression).

Then it trains every seed for ``epochs`` full-batch epochs, scoring validation/test after each
epoch. The configurations train in interleaved rounds (one epoch of each per round, each with its
own random stream, so results equal training them one after another), and each training step's
wall and CPU time is compared with the reference's step of the same round
(:mod:`blockquant.bench.rounds`): a loaded machine slows every configuration of a round alike.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import os.path as osp
import statistics
import tempfile
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


import torch
from torch import nn

import blockquant

from ..memory import storage_bytes, storage_key
from .datasets import GraphDataset
from .errors import BenchError
from .memlimit import peak_rss_bytes, reset_peak_rss
from .models import GNN, build_model
from .rounds import RngStreams, StepClock, add_time_ratios, interleaved

BASELINES = ("fp32", "fp32-sparse", "checkpoint")
DEFAULT_CONFIGS = ("fp32", "fp32-sparse", "checkpoint", "exact", "iexact", "default")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One row of the comparison: a baseline (``quant is None``) or a blockquant QuantConfig."""

    name: str
    quant: Optional[blockquant.QuantConfig] = None
    checkpoint: bool = False
    source: str = "builtin"
    #: give the model a torch.sparse CSR ``adj_t`` (PyG's memory-efficient form) instead of ``edge_index``
    sparse_adj: bool = False
    plan: Optional[Any] = None  # a blockquant.Plan (per-layer configs, e.g. from `blockquant tune`)

    @property
    def converts(self) -> bool:
        return self.quant is not None or self.plan is not None

    def describe(self) -> Dict[str, Any]:
        d = {
            "name": self.name,
            "kind": "checkpoint" if self.checkpoint else ("blockquant" if self.converts else "fp32"),
            "quant": self.quant.to_dict() if self.quant is not None else None,
            "quant_short": self.quant.short() if self.quant is not None else None,
            "source": self.source,
            "adjacency": "torch.sparse CSR adj_t" if self.sparse_adj else "edge_index",
        }
        if self.plan is not None:
            d["quant_short"] = "plan: " + ", ".join(f"{n}={c.short() if c else 'fp32'}"
                                                    for n, c in self.plan.layers.items())
            d["plan"] = self.plan.to_dict()
        return d


def config_names() -> Tuple[str, ...]:
    return BASELINES + tuple(n for n in blockquant.QuantConfig.preset_names() if n not in BASELINES)


def resolve_config(spec: str) -> BenchConfig:
    """``fp32``, ``checkpoint``, a QuantConfig preset name, or a path to a JSON QuantConfig or plan."""
    spec = spec.strip()
    if spec == "fp32":
        return BenchConfig("fp32")
    if spec == "fp32-sparse":
        return BenchConfig("fp32-sparse", sparse_adj=True)
    if spec == "checkpoint":
        return BenchConfig("checkpoint", checkpoint=True)
    if spec in blockquant.QuantConfig.preset_names():
        return BenchConfig(spec, blockquant.QuantConfig.preset(spec), source="preset")
    if spec.endswith(".json") or os.sep in spec or osp.exists(spec):
        if not osp.isfile(spec):
            raise BenchError(f"config file {spec!r} not found; pass an existing JSON file with QuantConfig fields "
                             f"or one of {', '.join(config_names())}")
        from blockquant.plan import Plan, load_config_or_plan

        try:
            q = load_config_or_plan(spec)
        except (ValueError, TypeError, json.JSONDecodeError) as e:
            raise BenchError(f"bad config file {spec!r}: {e}".replace("\n", " ")) from None
        name = osp.splitext(osp.basename(spec))[0]
        if isinstance(q, Plan):
            return BenchConfig(name, source=osp.abspath(spec), plan=q)
        return BenchConfig(name, q, source=osp.abspath(spec))
    raise BenchError(f"unknown config {spec!r}; expected a comma-separated list of {', '.join(config_names())} "
                     f"or paths to JSON QuantConfig files")


def resolve_configs(specs: Sequence[str]) -> List[BenchConfig]:
    specs = [s for s in specs if s.strip()]
    if not specs:
        raise BenchError("--configs is empty; name at least one configuration, e.g. --configs fp32,default")
    out = [resolve_config(s) for s in specs]
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BenchError(f"configuration name(s) {', '.join(dup)} given twice; each row needs a unique name")
    return out


@dataclasses.dataclass
class BenchOptions:
    dataset: str = "synthetic"
    root: Optional[str] = None
    model: str = "sage"
    configs: Tuple[str, ...] = DEFAULT_CONFIGS
    epochs: int = 20
    seeds: Tuple[int, ...] = (0, 1)
    hidden: int = 128
    layers: int = 3
    lr: float = 0.01
    dropout: float = 0.5
    device: str = "cpu"
    scale: float = 1.0
    quiet: bool = False
    memory_limit_gib: Optional[float] = None  # set by --memory-limit-gib: OOM becomes a "did not fit" row


# --------------------------------------------------------------------------- measurement helpers


@contextlib.contextmanager
def _fd2_silenced():
    """The profiler's C++ side prints start/stop lines on fd 2; keep the terminal clean."""
    try:
        fd = os.dup(2)
    except OSError:  # no stderr at all
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(fd, 2)
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class AllocationTrace:
    """CPU allocations of one call, from ``torch.profiler``'s memory trace (bytes)."""

    net: int  #: still allocated when the call returned
    peak: int  #: highest level above the start
    largest: int  #: the largest single allocation


def cpu_allocation_trace(fn) -> Tuple[Any, AllocationTrace]:
    """Run ``fn()`` under the profiler; return (result, :class:`AllocationTrace`)."""
    result, net, peak, largest = _cpu_allocation_trace(fn)
    return result, AllocationTrace(net, peak, largest)


def profiler_net_bytes(fn) -> Tuple[Any, int]:
    """Run ``fn()`` under the profiler; return (result, net CPU bytes allocated and still alive after it).

    Sums every event's *self* memory (allocations inside an op are attributed to it, frees outside ops
    appear as "[memory]" events), so nothing is counted twice. The result's own storage is included.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return result, int(sum(e.self_cpu_memory_usage for e in prof.events()))


def _cpu_allocation_trace(fn) -> Tuple[Any, int, int, int]:
    """Run ``fn()`` under the profiler; return (result, net bytes still allocated, peak bytes above start,
    largest single allocation)."""
    from torch.profiler import ProfilerActivity, profile

    with _fd2_silenced():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        with tempfile.TemporaryDirectory() as tmp:
            path = osp.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f).get("traceEvents", [])
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0),
                 key=lambda e: e["ts"])
    cur = peak = largest = 0
    for e in mem:
        b = int(e["args"].get("Bytes", 0))
        cur += b
        peak = max(peak, cur)
        largest = max(largest, b)
    return result, cur, peak, largest


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(e, oom_type):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                            or "not enough memory" in msg)


class Trainer:
    """Holds the data on the device and runs measurements and training for one configuration."""

    def __init__(self, data: GraphDataset, opts: BenchOptions, device: torch.device):
        self.data = data
        self.opts = opts
        self.device = device
        self.train_idx = data.split["train"]
        self._adj_t: Optional[torch.Tensor] = None
        if data.task == "multilabel":
            self.criterion = nn.BCEWithLogitsLoss()
        else:
            self.criterion = nn.CrossEntropyLoss()

    def sparse_adj_t(self) -> torch.Tensor:
        """The graph as a torch.sparse CSR ``adj_t`` (rows are targets), built once."""
        if self._adj_t is None:
            from torch_geometric.utils import to_torch_csc_tensor

            from ..adjacency import quiet_sparse_warnings

            n = self.data.num_nodes
            with quiet_sparse_warnings():
                self._adj_t = to_torch_csc_tensor(self.data.edge_index, size=(n, n)).t()
        return self._adj_t

    def build(self, cfg: BenchConfig, seed: int) -> GNN:
        torch.manual_seed(seed)
        model = build_model(self.opts.model, self.data.num_features, self.opts.hidden, self.data.out_dim,
                            num_layers=self.opts.layers, dropout=self.opts.dropout).to(self.device)
        if cfg.converts:
            convert = getattr(blockquant, "convert", None)
            if convert is None:
                raise BenchError(f"config {cfg.name!r} needs blockquant.convert, which this build does not have; "
                                 f"run only --configs fp32,checkpoint or update blockquant")
            try:
                model = convert(model, cfg.plan if cfg.plan is not None else cfg.quant)
            except ValueError as e:  # a plan naming modules this model does not have
                raise BenchError(f"config {cfg.name!r}: {e} (was the plan tuned for another --model, --hidden or "
                                 f"--layers?)".replace("\n", " ")) from None
        model.checkpoint_layers = cfg.checkpoint
        model.bench_graph = self.sparse_adj_t() if cfg.sparse_adj else self.data.edge_index
        # a first forward fills caches (GCN normalisation) so later measurements see steady state
        model.eval()
        with torch.no_grad():
            model(self.data.x, model.bench_graph)
        return model

    def loss(self, out: torch.Tensor) -> torch.Tensor:
        return self.criterion(out[self.train_idx], self.data.y[self.train_idx])

    # ------------------------------------------------------------ first-step measurements
    def weight_grads(self, model: GNN) -> Dict[str, torch.Tensor]:
        """Gradients of one forward/backward with dropout off and BatchNorm in training mode."""
        model.train()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        model.zero_grad(set_to_none=True)
        self.loss(model(self.data.x, model.bench_graph)).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        model.train()
        return grads

    def activation_memory(self, model: GNN) -> Dict[str, Any]:
        x, ei = self.data.x, model.bench_graph
        exclude = (x, ei, self.data.y)
        model.train()
        res: Dict[str, Any] = {}

        track_saved = getattr(blockquant, "track_saved", None)
        if track_saved is not None:
            model.record_checkpoint_inputs = True
            with track_saved(model, exclude=exclude) as mem:
                out = model(x, ei)
            total, per_module = int(mem.total_bytes), {k: int(v) for k, v in dict(mem.per_module).items()}
            if model.checkpoint_layers:
                skip = {storage_key(t) for t in exclude}
                skip |= {storage_key(p) for p in model.parameters()}
                skip.add(storage_key(out))
                seen = {}
                for t in model.checkpoint_inputs:
                    k = storage_key(t)
                    if k not in skip:
                        seen[k] = storage_bytes(t)
                extra = sum(seen.values())
                total += extra
                per_module["checkpointed block inputs"] = extra
            model.record_checkpoint_inputs = False
            model.checkpoint_inputs = []
            del out
            res.update(track_saved_bytes=total, per_module=per_module)

        # allocation delta over a forward, minus the output that is kept
        if self.device.type == "cuda":
            _sync(self.device)
            before = torch.cuda.memory_allocated(self.device)
            out = model(x, ei)
            _sync(self.device)
            delta = torch.cuda.memory_allocated(self.device) - before
            method = "torch.cuda.memory_allocated delta"
        else:
            out, delta, _, _ = _cpu_allocation_trace(lambda: model(x, ei))
            method = "torch.profiler CPU allocation delta"
        delta -= storage_bytes(out)
        del out
        res.update(alloc_delta_bytes=int(delta), alloc_delta_method=method)
        if "track_saved_bytes" in res:
            res.update(activation_bytes=res["track_saved_bytes"], activation_source="blockquant.track_saved")
        else:
            res.update(activation_bytes=int(delta), activation_source=method, per_module={})
        return res

    def step_peak(self, model: GNN) -> Dict[str, Any]:
        """Peak memory of forward + loss + backward above what was allocated before it."""
        model.train()
        model.zero_grad(set_to_none=True)

        def step():
            self.loss(model(self.data.x, model.bench_graph)).backward()

        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            step()
            _sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - base
            method = "torch.cuda.max_memory_allocated"
        else:
            _, _, peak, _ = _cpu_allocation_trace(step)
            method = "torch.profiler CPU allocation peak"
        model.zero_grad(set_to_none=True)
        return {"peak_step_bytes": int(peak), "peak_method": method}

    # ------------------------------------------------------------ training
    def train(self, model: GNN, seed: int, epochs: int, bar=None) -> Dict[str, Any]:
        """Train one run alone (``run_benchmark`` interleaves the runs of all configurations instead)."""
        torch.manual_seed(seed)
        run = TrainingRun(self, model, seed, bar)
        for epoch in range(epochs):
            run.epoch(epoch)
        return run.result()


class TrainingRun:
    """One configuration and seed: its optimizer, step clock and training log, advanced an epoch at a time."""

    def __init__(self, trainer: "Trainer", model: GNN, seed: int, bar=None):
        self.trainer, self.model, self.seed = trainer, model, seed
        self.opt = torch.optim.Adam(model.parameters(), lr=trainer.opts.lr)
        self.clock = StepClock(trainer.device)
        self.log = TrainingLog(trainer.data, bar)

    def epoch(self, epoch: int) -> None:
        model, opt, tr = self.model, self.opt, self.trainer
        x, ei = tr.data.x, model.bench_graph
        model.train()
        with self.clock.step():
            opt.zero_grad(set_to_none=True)
            loss = tr.loss(model(x, ei))
            loss.backward()
            opt.step()
        self.log.epoch_end(model, epoch, float(loss.item()), ei)

    def result(self) -> Dict[str, Any]:
        return self.log.result(self.seed, epoch_times_s=self.clock.wall, epoch_cpu_s=self.clock.cpu)


class TrainingLog:
    """Per-epoch loss and validation/test curves of one training run, and the test score at
    the epoch of best validation score (the full graph is evaluated after every epoch)."""

    def __init__(self, data, bar=None):
        self.data, self.bar = data, bar
        self.losses: List[float] = []
        self.val: List[float] = []
        self.test: List[float] = []
        self.best_val, self.test_at_best, self.best_epoch = -math.inf, float("nan"), -1

    def epoch_end(self, model, epoch: int, loss: float, graph) -> None:
        self.losses.append(loss)
        model.eval()
        with torch.no_grad():
            out = model(self.data.x, graph)
        val = self.data.score(out, self.data.split["valid"])
        test = self.data.score(out, self.data.split["test"])
        del out
        self.val.append(val)
        self.test.append(test)
        if val > self.best_val:
            self.best_val, self.test_at_best, self.best_epoch = val, test, epoch
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", val=f"{val:.3f}", refresh=False)
            self.bar.update(1)

    def result(self, seed: int, **timings) -> Dict[str, Any]:
        if not all(math.isfinite(v) for v in self.losses):
            raise BenchError(f"training diverged (non-finite loss) with seed {seed}; try a smaller --lr")
        return {"seed": seed, **timings, "loss": self.losses, "val": self.val, "test": self.test,
                "best_val": self.best_val, "test_at_best_val": self.test_at_best, "best_epoch": self.best_epoch}


def _rel_error(grads: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    num = den = 0.0
    per = {}
    for name, g_ref in ref.items():
        g = grads.get(name)
        if g is None:
            continue
        d = float((g.double() - g_ref.double()).norm() ** 2)
        r = float(g_ref.double().norm() ** 2)
        num, den = num + d, den + r
        per[name] = math.sqrt(d / r) if r > 0 else 0.0
    return {"grad_rel_error": math.sqrt(num / den) if den > 0 else 0.0, "grad_rel_error_per_param": per}


def _mean_std(v: List[float]) -> Tuple[float, float]:
    v = [float(a) for a in v]
    if not v:
        return float("nan"), float("nan")
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def resolve_device(name: str) -> torch.device:
    name = (name or "cpu").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BenchError(f"unknown device {name!r}; expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {name} asked for CUDA but no CUDA GPU is visible; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise BenchError(f"unsupported device {name!r}; expected cpu, cuda, cuda:N or auto")
    return dev


def run_benchmark(data: GraphDataset, opts: BenchOptions, configs: List[BenchConfig], *,
                  done: Optional[Dict[str, Dict[str, Any]]] = None,
                  on_record: Optional[Callable[[List[Dict[str, Any]]], None]] = None) -> List[Dict[str, Any]]:
    """Measure and train every configuration; returns one record per configuration (no I/O).

    The configurations train together, seed by seed, in interleaved rounds, so the unit that finishes is
    one seed of every configuration still training. ``on_record(records)`` is called with the records
    finished so far after each seed's rounds and after each configuration that did not fit its first-step
    measurements: the rows that did not fit, and each trained configuration with its first-step
    measurements, the runs of its finished seeds and ``seeds_done``. ``done``: records an earlier run wrote
    (``--resume``, :func:`blockquant.bench.resume.finished_records`): one with every seed trained, or that did
    not fit, is reused as it is (neither built, measured nor trained); a partly trained one keeps its
    first-step measurements and finished seeds and trains only the missing seeds, interleaved with the other
    configurations that need them. Summaries and time ratios are computed over the final records; per-round
    ratios stay valid across an interruption because each seed's rounds run within one process
    (:mod:`blockquant.bench.rounds`).
    """
    device = resolve_device(opts.device)
    data.to(device)
    trainer = Trainer(data, opts, device)
    ref_grads: Optional[Dict[str, torch.Tensor]] = None
    first_seed = opts.seeds[0]

    ref_unfit = False

    def ref():
        """fp32 reference gradients; ``None`` when they do not fit under --memory-limit-gib."""
        nonlocal ref_grads, ref_unfit
        if ref_grads is None and not ref_unfit:
            try:
                ref_grads = trainer.weight_grads(trainer.build(BenchConfig("fp32"), first_seed))
            except Exception as e:  # noqa: BLE001 - only an allocation failure under a limit is expected
                if not (_is_oom(e) and opts.memory_limit_gib is not None):
                    raise
                ref_unfit = True
        return ref_grads

    def measure(cfg: BenchConfig) -> Dict[str, Any]:
        rss_window = False
        if not cfg.sparse_adj:
            trainer._adj_t = None  # plain PyG's CSR adj_t is not this config's memory
        rec: Dict[str, Any] = {"config": cfg.name, **{f"config_{k}": v for k, v in cfg.describe().items()
                                                       if k != "name"}}
        try:
            reference = ref()
            rss_window = reset_peak_rss()  # this config's peak resident memory (its training epochs too)
            model = trainer.build(cfg, first_seed)
            if reference is None:  # a compressed config may fit where fp32 does not: no gradient pass then
                rec.update(grad_rel_error=None, grad_rel_error_note="fp32 reference gradients did not fit in "
                                                                    f"--memory-limit-gib {opts.memory_limit_gib:g}")
            else:
                rec.update(_rel_error(trainer.weight_grads(model), reference))
            rec.update(trainer.activation_memory(model))
            rec.update(trainer.step_peak(model))
            model = None
        except BenchError:
            raise
        except Exception as e:  # noqa: BLE001 - OOM is a user-facing condition, everything else is a bug
            model = None
            return _failed(rec, cfg.name, e, "first-step measurements", opts, device,
                           peak_rss_bytes() if rss_window else None)
        if rss_window:
            rec["peak_rss_bytes"] = peak_rss_bytes()
        return rec

    def summarize(rec: Dict[str, Any]) -> None:
        cfg_runs = rec["runs"]
        val_m, val_s = _mean_std([r["best_val"] for r in cfg_runs])
        test_m, test_s = _mean_std([r["test_at_best_val"] for r in cfg_runs])
        n_epochs = opts.epochs
        rec.update(
            activation_mib=rec["activation_bytes"] / 2 ** 20,
            bytes_per_node=rec["activation_bytes"] / data.num_nodes,
            peak_step_mib=rec["peak_step_bytes"] / 2 ** 20,
            val_mean=val_m, val_std=val_s, test_mean=test_m, test_std=test_s,
            seeds=list(opts.seeds),
            curve_loss_mean=[statistics.fmean(r["loss"][e] for r in cfg_runs) for e in range(n_epochs)],
            curve_val_mean=[statistics.fmean(r["val"][e] for r in cfg_runs) for e in range(n_epochs)],
        )

    return _run_configs(trainer, configs, opts, device, measure=measure, summarize=summarize, done=done,
                        on_record=on_record)


def _run_configs(trainer, configs: List[BenchConfig], opts: BenchOptions, device, *,
                 measure: Callable[[BenchConfig], Dict[str, Any]], summarize: Callable[[Dict[str, Any]], None],
                 done: Optional[Dict[str, Dict[str, Any]]], on_record, make_run=None) -> List[Dict[str, Any]]:
    """What :func:`run_benchmark` and the mini-batch benchmark share: reuse what ``done`` holds, ``measure(cfg)``
    the others (a record, or a row with ``status`` when it did not fit), train the seeds each configuration
    lacks (:func:`_train_seeds`), ``summarize(record)`` each trained one and add the ratios."""
    from tqdm.auto import tqdm

    from .resume import seeds_left

    rows: Dict[str, Dict[str, Any]] = {}  # every configuration's record so far
    measured: List[Tuple[BenchConfig, Dict[str, Any]]] = []  # the configurations that train

    def report() -> None:
        if on_record is not None:  # a record is finished once it did not fit or has finished a seed
            on_record([r for r in (rows.get(c.name) for c in configs) if r and (r.get("status") or r.get("runs"))])

    cfg_bar = tqdm(configs, desc="configs", disable=opts.quiet, leave=True, dynamic_ncols=True)
    for cfg in cfg_bar:
        cfg_bar.set_postfix_str(cfg.name)
        old = (done or {}).get(cfg.name)
        if old is not None:  # its first-step measurements, and any finished seeds, come from an earlier run
            rows[cfg.name] = rec = dict(old)
            if seeds_left(rec, opts.seeds):
                measured.append((cfg, rec))
            continue
        rows[cfg.name] = rec = measure(cfg)
        if rec.get("status"):
            report()
            continue
        rec.update(runs=[], seeds_done=[])
        measured.append((cfg, rec))
    cfg_bar.close()

    _train_seeds(trainer, measured, rows, opts, device, report, make_run)
    records = [rows[c.name] for c in configs]
    for rec in records:  # reused ones too: a run stopped after its last seed wrote them unsummarized
        if not rec.get("status"):
            summarize(rec)
    add_time_ratios(records)
    add_fp32_ratios(records)
    return records


def _failed(rec: Dict[str, Any], name: str, e: BaseException, stage: str, opts: BenchOptions, device,
            peak_rss: Optional[int]) -> Dict[str, Any]:
    """The "did not fit" row of a configuration that ran out of memory under --memory-limit-gib; any other
    error is raised (an OOM without a limit as a one-line BenchError)."""
    if _is_oom(e) and opts.memory_limit_gib is not None:
        from .memlimit import did_not_fit

        return {**rec, **did_not_fit(name, opts.memory_limit_gib, e, stage),
                **({"peak_rss_bytes": peak_rss} if peak_rss is not None else {})}
    if _is_oom(e):
        raise BenchError(f"out of memory on {device} while running config {name!r} "
                         f"({str(e).splitlines()[0][:120]}); try a smaller --hidden or --scale, fewer "
                         f"--configs, or another --device") from None
    raise e


def _train_seeds(trainer, measured, rows: Dict[str, Dict[str, Any]], opts: BenchOptions, device,
                 report: Callable[[], None], make_run=None) -> None:
    """Train, seed after seed, every measured configuration that lacks that seed, one epoch of each per
    round (:mod:`blockquant.bench.rounds`). Each finished run joins its record's ``runs`` (in seed order,
    with the ``rounds_id`` and ``load_avg_rounds`` of its rounds) and ``seeds_done``; a configuration that
    runs out of memory under a limit becomes its did-not-fit row in ``rows``. ``report()`` is called after
    each seed's rounds. ``make_run(model, seed, bar)`` makes a run with ``epoch(e)`` and ``result()``
    (default: a full-batch :class:`TrainingRun`)."""
    if make_run is None:
        def make_run(model, seed, bar):
            return TrainingRun(trainer, model, seed, bar)
    from tqdm.auto import tqdm

    from .resume import seeds_left

    recs = {cfg.name: rec for cfg, rec in measured}
    if not any(cfg.sparse_adj for cfg, _ in measured):
        trainer._adj_t = None
    for seed in opts.seeds:
        todo = [cfg for cfg, rec in measured if rows[cfg.name] is rec and seed in seeds_left(rec, opts.seeds)]
        if not todo:
            continue
        live: Dict[str, TrainingRun] = {}
        streams = RngStreams(device)
        bar = tqdm(total=opts.epochs * len(todo), desc=f"{', '.join(c.name for c in todo)} seed {seed}",
                   disable=opts.quiet, leave=False, dynamic_ncols=True)

        def fail(name: str, e: BaseException) -> bool:
            measurements = {k: v for k, v in recs[name].items() if k not in ("runs", "seeds_done")}
            try:
                rows[name] = _failed(measurements, name, e, "training", opts, device,
                                     recs[name].get("peak_rss_bytes"))
            except BenchError:
                raise
            except Exception:  # noqa: BLE001 - not an allocation failure: the caller re-raises it
                return False
            live.pop(name, None)
            return True

        for cfg in todo:
            try:
                model = trainer.build(cfg, seed)
            except BenchError:
                raise
            except Exception as e:  # noqa: BLE001 - handled as in a training epoch
                if not fail(cfg.name, e):
                    raise
                continue
            streams.start(cfg.name, seed)
            with streams.use(cfg.name):  # a run may draw from the generator when it starts (a loader's seed)
                live[cfg.name] = make_run(model, seed, bar)
        model = None

        def epoch(name: str, r: int) -> None:
            rss_window = reset_peak_rss()
            with streams.use(name):
                live[name].epoch(r)
            if rss_window:
                rec = recs[name]
                rec["peak_rss_bytes"] = max(rec.get("peak_rss_bytes") or 0, peak_rss_bytes() or 0)

        loads = interleaved(list(live), opts.epochs, epoch, lambda name, r, e: fail(name, e))
        bar.close()
        seen = [x for lo in loads for x in (lo["load_avg_before"], lo["load_avg_after"]) if x is not None]
        rounds = {"rounds_id": uuid.uuid4().hex[:12], "load_avg_rounds": [min(seen), max(seen)] if seen else None}
        for name, run in live.items():
            rec = recs[name]
            rec["runs"] = sorted([*rec["runs"], {**run.result(), **rounds}], key=lambda r: opts.seeds.index(r["seed"]))
            rec["seeds_done"] = [r["seed"] for r in rec["runs"]]
        live.clear()
        report()


def add_fp32_ratios(records: List[Dict[str, Any]]) -> None:
    """Each measured row's activation memory, step peak and epoch time as a ratio to the ``fp32`` row's
    (``None`` without a measured fp32 row)."""
    base = next((r for r in records if r["config"] == "fp32" and "status" not in r), None)
    for r in records:
        if "status" in r:
            continue
        for ratio, key in (("memory_ratio_fp32", "activation_bytes"), ("peak_ratio_fp32", "peak_step_bytes"),
                           ("time_ratio_fp32", "epoch_time_median_s")):
            r[ratio] = r[key] / base[key] if base and base.get(key) and r.get(key) is not None else None
        r.update(convergence_vs_fp32(r, base))


def convergence_vs_fp32(record: Dict[str, Any], base: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """How fast a configuration reaches what fp32 reaches, per seed against fp32's run of the same seed: the
    epochs its validation metric needs to reach fp32's best validation value, as a ratio to the epochs fp32
    needed for it (median over the seeds that reached it), and how many seeds reached it at all within the
    run. Compression's noise shows here before it shows in the final accuracy."""
    reference = {run["seed"]: run for run in (base or {}).get("runs", []) if run.get("val")}
    ratios, paired = [], 0
    for run in record.get("runs", []):
        ref = reference.get(run["seed"])
        if ref is None or not run.get("val"):
            continue
        paired += 1
        hit = next((e for e, v in enumerate(run["val"]) if v >= ref["best_val"]), None)
        if hit is not None:
            ratios.append((hit + 1) / (ref["best_epoch"] + 1))
    return {"epochs_to_fp32_best_ratio": statistics.median(ratios) if ratios else None,
            "reached_fp32_best": (len(ratios), paired) if paired else None}
