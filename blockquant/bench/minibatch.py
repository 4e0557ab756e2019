"""Mini-batch training for ``blockquant bench --batch-size N [--loader random|neighbor|cluster]``.

A converted model trains on PyG's own loaders without any change: each batch
is a PyG ``Data`` whose ``x`` and ``edge_index`` are handed to the model's
``forward``, where :func:`blockquant.convert`'s pre-hook marks them resident
(the loader holds them for the whole step, so compressed ops save them by
reference instead of storing a compressed copy).

Loaders (the PyG classes, used as PyG documents them):

* ``random``: :class:`torch_geometric.loader.RandomNodeLoader`, the graph
  induced by a random ``batch_size`` nodes; pure PyTorch, runs everywhere.
  The loss covers the batch's training nodes.
* ``neighbor``: :class:`torch_geometric.loader.NeighborLoader`, ``batch_size``
  training nodes and up to :data:`NEIGHBOR_FANOUT` sampled neighbours per node
  and layer. The loss covers the batch's seed nodes. Needs ``pyg-lib`` or
  ``torch-sparse``.
* ``cluster``: :class:`torch_geometric.loader.ClusterLoader` over METIS parts
  of about ``batch_size / CLUSTERS_PER_BATCH`` nodes, ``CLUSTERS_PER_BATCH``
  parts per batch. Needs METIS from ``pyg-lib`` or ``torch-sparse``.

Memory is measured as in full batch (:class:`~blockquant.bench.runner.Trainer`
runs its measurements on one fixed batch, the same for every configuration):
bytes held for backward after the batch's forward and the peak of one
training step. Evaluation runs on the full graph under ``torch.no_grad``.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Callable, Dict, List, Optional


import torch

from .datasets import GraphDataset
from .errors import BenchError
from .rounds import StepClock
from .runner import (BenchConfig, BenchOptions, Trainer, TrainingLog, _is_oom, _mean_std, _rel_error, _run_configs,
                     resolve_device)

LOADERS = ("random", "neighbor", "cluster")
DEFAULT_LOADER = "random"
NEIGHBOR_FANOUT = 10
CLUSTERS_PER_BATCH = 4

INSTALL_HINT = ("install pyg-lib or torch-sparse built for your torch version, e.g. "
                "pip install pyg-lib torch-sparse -f https://data.pyg.org/whl/torch-${TORCH}+${CUDA}.html "
                "(see https://pytorch-geometric.readthedocs.io/en/latest/install/installation.html)")


def loader_unavailable_reason(kind: str) -> Optional[str]:
    """``None`` if loader ``kind`` can run here, else a one-line reason with the fix."""
    import torch_geometric.typing as pyg_typing

    if kind not in LOADERS:
        raise BenchError(f"unknown loader {kind!r}; expected one of {', '.join(LOADERS)}")
    if kind == "neighbor" and not (pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE):
        return ("--loader neighbor (PyG NeighborLoader) needs pyg-lib or torch-sparse, neither is installed; "
                f"{INSTALL_HINT}")
    if kind == "cluster" and not pyg_typing.WITH_METIS:
        return (f"--loader cluster (PyG ClusterLoader) needs METIS from pyg-lib or torch-sparse, which is not "
                f"installed; {INSTALL_HINT}")
    return None


@dataclasses.dataclass(frozen=True)
class MiniBatchOptions:
    loader: str = DEFAULT_LOADER
    batch_size: int = 1024

    def __post_init__(self):
        if self.loader not in LOADERS:
            raise BenchError(f"unknown loader {self.loader!r}; expected one of {', '.join(LOADERS)}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise BenchError(f"--batch-size expects a positive integer; got {self.batch_size!r}")


def to_pyg(data: GraphDataset):
    """The dataset as a PyG ``Data`` with a ``train_mask`` (so every loader carries it into its batches)."""
    from torch_geometric.data import Data

    train_mask = torch.zeros(data.num_nodes, dtype=torch.bool, device=data.x.device)
    train_mask[data.split["train"]] = True
    return Data(x=data.x, edge_index=data.edge_index, y=data.y, train_mask=train_mask, num_nodes=data.num_nodes)


def make_loader(data: GraphDataset, mb: MiniBatchOptions, num_layers: int, seed: int, shuffle: bool = True):
    """The PyG loader for ``mb.loader``; its shuffling is driven by a generator seeded with ``seed``."""
    reason = loader_unavailable_reason(mb.loader)
    if reason is not None:
        raise BenchError(reason)
    pyg_data = to_pyg(data)
    gen = torch.Generator().manual_seed(int(seed))
    n = data.num_nodes
    if mb.loader == "random":
        from torch_geometric.loader import RandomNodeLoader

        return RandomNodeLoader(pyg_data, num_parts=max(1, math.ceil(n / mb.batch_size)), shuffle=shuffle,
                                generator=gen)
    if mb.loader == "neighbor":
        from torch_geometric.loader import NeighborLoader

        return NeighborLoader(pyg_data, num_neighbors=[NEIGHBOR_FANOUT] * num_layers,
                              input_nodes=data.split["train"], batch_size=mb.batch_size, shuffle=shuffle,
                              generator=gen)
    from torch_geometric.loader import ClusterData, ClusterLoader

    parts = max(1, math.ceil(n * CLUSTERS_PER_BATCH / mb.batch_size))
    clusters = ClusterData(pyg_data, num_parts=parts, log=False)
    return ClusterLoader(clusters, batch_size=CLUSTERS_PER_BATCH, shuffle=shuffle, generator=gen)


def loss_nodes(batch) -> torch.Tensor:
    """Indices (into the batch) of the nodes whose loss a step trains on."""
    if hasattr(batch, "batch_size") and hasattr(batch, "n_id"):  # NeighborLoader: the seed nodes come first
        return torch.arange(int(batch.batch_size), device=batch.x.device)
    return batch.train_mask.nonzero().view(-1)


def batch_dataset(batch, parent: GraphDataset) -> GraphDataset:
    """One batch as a :class:`GraphDataset` whose ``train`` split is the batch's loss nodes."""
    idx = loss_nodes(batch)
    return GraphDataset(name=f"{parent.name} batch", x=batch.x, edge_index=batch.edge_index, y=batch.y,
                        split={"train": idx, "valid": idx[:0], "test": idx[:0]}, num_classes=parent.num_classes,
                        task=parent.task, metric=parent.metric, evaluator=parent.evaluator)


def _uncache(model: torch.nn.Module) -> None:
    """Every batch is a different graph: GCN's cached normalisation must be recomputed per batch."""
    for m in model.modules():
        if getattr(m, "cached", False):
            m.cached = False
        for attr in ("_cached_edge_index", "_cached_adj_t"):
            if getattr(m, attr, None) is not None:
                setattr(m, attr, None)


class MiniBatchTrainer:
    """Measures on one fixed batch (through :class:`Trainer`) and trains epochs over a PyG loader."""

    def __init__(self, data: GraphDataset, opts: BenchOptions, mb: MiniBatchOptions, device: torch.device):
        self.data, self.opts, self.mb, self.device = data, opts, mb, device
        self.full = Trainer(data, opts, device)
        # the measurement batch: the first one a seeded loader yields, shared by every configuration
        first = next(iter(make_loader(data, mb, opts.layers, seed=opts.seeds[0])))
        self.batch = batch_dataset(first, data)
        self.on_batch = Trainer(self.batch, opts, device)
        self.criterion = self.full.criterion

    def build(self, cfg: BenchConfig, seed: int):
        model = self.on_batch.build(cfg, seed)
        _uncache(model)
        return model

    def train(self, model, seed: int, epochs: int, bar=None) -> Dict[str, Any]:
        """Train one run alone (``run_minibatch_benchmark`` interleaves the runs of all configurations)."""
        torch.manual_seed(seed)
        run = MiniBatchRun(self, model, seed, bar)
        for epoch in range(epochs):
            run.epoch(epoch)
        return run.result()


class MiniBatchRun:
    """One configuration and seed trained over a PyG loader, an epoch (one pass over the loader) at a time;
    an epoch's time is the sum of its steps' (loading batches is not counted)."""

    def __init__(self, trainer: MiniBatchTrainer, model, seed: int, bar=None):
        self.trainer, self.model, self.seed = trainer, model, seed
        self.opt = torch.optim.Adam(model.parameters(), lr=trainer.opts.lr)
        self.loader = make_loader(trainer.data, trainer.mb, trainer.opts.layers, seed=seed)
        self.clock = StepClock(trainer.device)
        self.epoch_wall: List[float] = []
        self.epoch_cpu: List[float] = []
        self.log = TrainingLog(trainer.data, bar)

    def epoch(self, epoch: int) -> None:
        model, opt, tr = self.model, self.opt, self.trainer
        model.train()
        total, count, first = 0.0, 0, len(self.clock.wall)
        for batch in self.loader:
            batch = batch.to(tr.device)
            idx = loss_nodes(batch)
            if idx.numel() == 0:
                continue
            with self.clock.step():
                opt.zero_grad(set_to_none=True)
                loss = tr.criterion(model(batch.x, batch.edge_index)[idx], batch.y[idx])
                loss.backward()
                opt.step()
            total += float(loss.item()) * idx.numel()
            count += idx.numel()
        self.epoch_wall.append(sum(self.clock.wall[first:]))
        self.epoch_cpu.append(sum(self.clock.cpu[first:]))
        self.log.epoch_end(model, epoch, total / max(count, 1), tr.data.edge_index)

    def result(self) -> Dict[str, Any]:
        return self.log.result(self.seed, epoch_times_s=self.epoch_wall, epoch_cpu_s=self.epoch_cpu,
                               step_times_s=self.clock.wall)


def run_minibatch_benchmark(data: GraphDataset, opts: BenchOptions, mb: MiniBatchOptions,
                            configs: List[BenchConfig], *, done: Optional[Dict[str, Dict[str, Any]]] = None,
                            on_record: Optional[Callable[[List[Dict[str, Any]]], None]] = None
                            ) -> List[Dict[str, Any]]:
    """Like :func:`~blockquant.bench.runner.run_benchmark` (``done`` and ``on_record`` too), trained with
    mini-batches from a PyG loader.

    Each record has the full-batch record's fields (memory measured on the
    measurement batch, ``epoch_time_median_s`` = one pass over the loader) plus
    ``loader``, ``batch_size``, ``batch_nodes``, ``batch_edges``,
    ``steps_per_epoch`` and ``step_time_median_s``.
    """
    device = resolve_device(opts.device)
    data.to(device)
    trainer = MiniBatchTrainer(data, opts, mb, device)
    batch = trainer.batch
    first_seed = opts.seeds[0]
    ref_grads = None

    def measure(cfg: BenchConfig) -> Dict[str, Any]:
        nonlocal ref_grads
        rec: Dict[str, Any] = {"config": cfg.name, **{f"config_{k}": v for k, v in cfg.describe().items()
                                                       if k != "name"}}
        try:
            if ref_grads is None:
                ref_grads = trainer.on_batch.weight_grads(trainer.build(BenchConfig("fp32"), first_seed))
            model = trainer.build(cfg, first_seed)
            rec.update(_rel_error(trainer.on_batch.weight_grads(model), ref_grads))
            rec.update(trainer.on_batch.activation_memory(model))
            rec.update(trainer.on_batch.step_peak(model))
            model = None
        except BenchError:
            raise
        except Exception as e:  # noqa: BLE001 - OOM is a user-facing condition, everything else is a bug
            model = None
            return _oom_row(rec, cfg.name, e, opts, device)
        return rec

    def summarize(rec: Dict[str, Any]) -> None:
        runs = rec["runs"]
        epoch_times = [t for r in runs for t in r["epoch_times_s"]]
        step_times = [t for r in runs for t in r["step_times_s"]]
        val_m, val_s = _mean_std([r["best_val"] for r in runs])
        test_m, test_s = _mean_std([r["test_at_best_val"] for r in runs])
        rec.update(
            loader=mb.loader, batch_size=mb.batch_size, batch_nodes=batch.num_nodes, batch_edges=batch.num_edges,
            steps_per_epoch=len(runs[0]["step_times_s"]) // max(opts.epochs, 1),
            activation_mib=rec["activation_bytes"] / 2 ** 20,
            bytes_per_node=rec["activation_bytes"] / batch.num_nodes,
            peak_step_mib=rec["peak_step_bytes"] / 2 ** 20,
            epoch_time_median_s=statistics.median(epoch_times) if epoch_times else float("nan"),
            step_time_median_s=statistics.median(step_times) if step_times else float("nan"),
            val_mean=val_m, val_std=val_s, test_mean=test_m, test_std=test_s, seeds=list(opts.seeds),
            curve_loss_mean=[statistics.fmean(r["loss"][e] for r in runs) for e in range(opts.epochs)],
            curve_val_mean=[statistics.fmean(r["val"][e] for r in runs) for e in range(opts.epochs)],
        )

    return _run_configs(trainer, configs, opts, device, measure=measure, summarize=summarize, done=done,
                        on_record=on_record,
                        make_run=lambda model, seed, bar: MiniBatchRun(trainer, model, seed, bar))


def _oom_row(rec, name: str, e: BaseException, opts: BenchOptions, device) -> Dict[str, Any]:
    if _is_oom(e) and opts.memory_limit_gib is not None:
        from .memlimit import did_not_fit

        return {**rec, **did_not_fit(name, opts.memory_limit_gib, e, "mini-batch run")}
    if _is_oom(e):
        raise BenchError(f"out of memory on {device} while running config {name!r} "
                         f"({str(e).splitlines()[0][:120]}); try a smaller --batch-size or --hidden") from None
    raise e
