"""Paired accuracy runs: every config trained from the same seeds and the same initial weights, to convergence.

For each model and seed, the model is built once from ``torch.manual_seed(seed)``
(its initial weights are recorded as a checksum: identical for every config) and
trained with each config in turn, full batch, evaluating after every epoch, until
validation accuracy has not improved for ``--patience`` epochs (or
``--max-epochs``). A run reports the test accuracy at its best validation epoch.
The summary gives, per config, the mean paired difference to fp32 with its
standard error (over seeds), and the convergence columns: the epochs each run
needs to reach fp32's best validation accuracy of the same seed (as a ratio of
fp32's own epochs to its best), or, when it never does, its best validation
accuracy up to fp32's best epoch minus fp32's best.

Two model suites:

* ``ogb``: the OGB full-batch reference shape of ``blockquant bench`` (conv ->
  BatchNorm1d -> ReLU -> Dropout(0.5), 3 layers, hidden 128, GAT 8 heads x 16),
  Adam lr 0.01, no weight decay;
* ``examples``: the models of PyG's example scripts on Cora (``examples/gcn.py``,
  ``gat.py``, ``gcn2_cora.py``, the teacher and student of ``glnn.py``), written
  here in the same shape (widths, dropout, functional activations, optimiser
  settings, epochs), features row-normalised as there.

Results go to ``<out>/runs.jsonl`` (one line per run, appended as each finishes,
so an interrupted run resumes where it stopped) and ``<out>/bytes.jsonl``;
``--summarize`` prints the Markdown tables. Examples::

    python bench/paired_accuracy.py --dataset cora --root DATA --suite ogb --models sage,gcn,gat \\
        --configs fp32,iexact,default,tuned:iexact --seeds 10 --out bench/results/paired_cora
    python bench/paired_accuracy.py --out bench/results/paired_cora --summarize
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import blockquant
from blockquant import QuantConfig
from blockquant.bench.datasets import GraphDataset, load_dataset

# Configs beside the presets, named here so that results files stay readable.
NAMED_CONFIGS = {
    "iexact-rp1": QuantConfig(bits=2, block_size=1024, rp_ratio=1, levels="optimal"),
    "iexact-rp4": QuantConfig(bits=2, block_size=1024, rp_ratio=4, levels="optimal"),
}


# ----------------------------------------------------------------------------- data


def load_graph(name: str, root: Optional[str], scale: float, normalize_features: bool) -> GraphDataset:
    """A ``blockquant bench`` dataset (``x``, ``edge_index``, ``y``, ``split``), features row-normalised
    on request (PyG's ``T.NormalizeFeatures``: rows summing to one)."""
    ds = load_dataset(name, root, scale=scale)
    ds.x = ds.x.float()
    if normalize_features:
        ds.x = ds.x / ds.x.sum(-1, keepdim=True).clamp(min=1.0)
        ds.name += "+normfeat"
    return ds


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class ModelSpec:
    """How one model is built and trained (the schedule of the script or reference it mirrors)."""

    build: Callable[[GraphDataset], torch.nn.Module]
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
    max_epochs: int
    patience: Optional[int]  # None: the script's fixed number of epochs
    loss: str = "ce"  # "ce" on logits, "nll" on log-probabilities
    teacher: Optional[str] = None  # distillation: soft labels from this model's fp32 run of the same seed


def _adam(lr: float, wd: float = 0.0):
    return lambda m: torch.optim.Adam(m.parameters(), lr=lr, weight_decay=wd)


def _ogb(kind: str, hidden: int = 128, layers: int = 3):
    def build(g: GraphDataset) -> torch.nn.Module:
        from blockquant.bench.models import build_model

        return build_model(kind, g.num_features, hidden, g.out_dim, num_layers=layers, dropout=0.5)

    return build


class ExampleGCN(torch.nn.Module):
    """examples/gcn.py: dropout 0.5 -> GCNConv(F, 16) -> relu -> dropout 0.5 -> GCNConv(16, C)."""

    def __init__(self, f: int, c: int, hidden: int = 16):
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.conv1 = GCNConv(f, hidden)
        self.conv2 = GCNConv(hidden, c)

    def forward(self, x, edge_index):
        x = F.dropout(x, p=0.5, training=self.training)
        x = self.conv1(x, edge_index).relu()
        x = F.dropout(x, p=0.5, training=self.training)
        return self.conv2(x, edge_index)


class ExampleGAT(torch.nn.Module):
    """examples/gat.py: dropout 0.6 -> GATConv(F, 8, heads 8, attention dropout 0.6) -> elu -> dropout 0.6
    -> GATConv(64, C, heads 1, concat False, attention dropout 0.6)."""

    def __init__(self, f: int, c: int, hidden: int = 8, heads: int = 8):
        super().__init__()
        from torch_geometric.nn import GATConv

        self.conv1 = GATConv(f, hidden, heads, dropout=0.6)
        self.conv2 = GATConv(hidden * heads, c, heads=1, concat=False, dropout=0.6)

    def forward(self, x, edge_index):
        x = F.dropout(x, p=0.6, training=self.training)
        x = F.elu(self.conv1(x, edge_index))
        x = F.dropout(x, p=0.6, training=self.training)
        return self.conv2(x, edge_index)


class ExampleGCN2(torch.nn.Module):
    """examples/gcn2_cora.py: dropout -> Linear(F, 64) -> relu = x0; 64 x (dropout -> GCN2Conv(64,
    alpha 0.1, theta 0.5, shared weights) -> relu); dropout -> Linear(64, C) -> log_softmax. The script
    normalises the graph once (GCNNorm + SparseTensor); here GCN2Conv normalises it (same operator)."""

    def __init__(self, f: int, c: int, hidden: int = 64, layers: int = 64, dropout: float = 0.6):
        super().__init__()
        from torch_geometric.nn import GCN2Conv

        self.lins = torch.nn.ModuleList([torch.nn.Linear(f, hidden), torch.nn.Linear(hidden, c)])
        self.convs = torch.nn.ModuleList([GCN2Conv(hidden, 0.1, 0.5, i + 1, shared_weights=True, cached=True)
                                          for i in range(layers)])
        self.dropout = dropout

    def forward(self, x, edge_index):
        x = F.dropout(x, self.dropout, training=self.training)
        x = x0 = self.lins[0](x).relu()
        for conv in self.convs:
            x = F.dropout(x, self.dropout, training=self.training)
            x = conv(x, x0, edge_index).relu()
        x = F.dropout(x, self.dropout, training=self.training)
        return self.lins[1](x).log_softmax(dim=-1)


def _gcn2_optimizer(m: ExampleGCN2) -> torch.optim.Optimizer:
    return torch.optim.Adam([dict(params=m.convs.parameters(), weight_decay=0.01),
                             dict(params=m.lins.parameters(), weight_decay=5e-4)], lr=0.01)


def _gcn_optimizer(m: ExampleGCN) -> torch.optim.Optimizer:  # weight decay on the first layer only
    return torch.optim.Adam([dict(params=m.conv1.parameters(), weight_decay=5e-4),
                             dict(params=m.conv2.parameters(), weight_decay=0.0)], lr=0.01)


class StudentMLP(torch.nn.Module):
    """examples/glnn.py's student: PyG ``MLP([F, 64, C], dropout=0.5, norm=None)``, called on ``x`` alone."""

    def __init__(self, f: int, c: int):
        super().__init__()
        from torch_geometric.nn import MLP

        self.mlp = MLP([f, 64, c], dropout=0.5, norm=None)

    def forward(self, x, edge_index):
        return self.mlp(x)


def _zoo_gcn(g: GraphDataset) -> torch.nn.Module:  # examples/glnn.py's teacher: GCN(F, 16, 2 layers), no dropout
    from torch_geometric.nn.models import GCN

    return GCN(g.num_features, hidden_channels=16, out_channels=g.out_dim, num_layers=2)


MODELS: Dict[str, ModelSpec] = {
    "sage": ModelSpec(_ogb("sage"), _adam(0.01), max_epochs=500, patience=100),
    "gcn": ModelSpec(_ogb("gcn"), _adam(0.01), max_epochs=500, patience=100),
    "gat": ModelSpec(_ogb("gat"), _adam(0.01), max_epochs=500, patience=100),
    "ex-gcn": ModelSpec(lambda g: ExampleGCN(g.num_features, g.out_dim), _gcn_optimizer, 200, None),
    "ex-gcn-128": ModelSpec(lambda g: ExampleGCN(g.num_features, g.out_dim, hidden=128), _gcn_optimizer, 200,
                            None),
    "ex-gat": ModelSpec(lambda g: ExampleGAT(g.num_features, g.out_dim), _adam(0.005, 5e-4), 200, None),
    "ex-gcn2": ModelSpec(lambda g: ExampleGCN2(g.num_features, g.out_dim), _gcn2_optimizer, 1000, 200,
                         loss="nll"),
    "ex-glnn-teacher": ModelSpec(_zoo_gcn, _adam(0.01, 5e-4), 200, None),
    "ex-glnn-student": ModelSpec(lambda g: StudentMLP(g.num_features, g.out_dim), _adam(0.01, 5e-4), 500,
                                 None, teacher="ex-glnn-teacher"),
}
SUITES = {"ogb": ("sage", "gcn", "gat"),
          "examples": ("ex-gcn", "ex-gat", "ex-glnn-teacher", "ex-glnn-student", "ex-gcn2")}


# ----------------------------------------------------------------------------- configs


def resolve_config(name: str, model_name: str, g: GraphDataset, out_dir: str, label: str):
    """``fp32`` -> None; a preset or :data:`NAMED_CONFIGS` name; ``tuned:<preset>`` -> the plan
    ``blockquant.tune`` finds at that preset's bytes on the seed-0 model (cached in ``<out>/plans``)."""
    if name == "fp32":
        return None
    if name in NAMED_CONFIGS:
        return NAMED_CONFIGS[name]
    if name.startswith("tuned:"):
        budget = name.split(":", 1)[1]
        path = os.path.join(out_dir, "plans", f"{label}_{g.name}_{model_name}_{budget}.json")
        if os.path.exists(path):
            return blockquant.Plan.from_json(path)
        torch.manual_seed(0)
        model = MODELS[model_name].build(g)
        t0 = time.perf_counter()
        res = blockquant.tune(model, g, budget=budget, progress=False)
        res.plan.info["tune_s"] = time.perf_counter() - t0
        os.makedirs(os.path.dirname(path), exist_ok=True)
        res.plan.to_json(path)
        with open(path.replace(".json", "_table.txt"), "w") as f:
            f.write(res.table() + f"\ntune took {res.plan.info['tune_s']:.0f} s\n")
        return res.plan
    return QuantConfig.preset(name)


def convert(model: torch.nn.Module, config) -> torch.nn.Module:
    if config is None:
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return blockquant.convert(model, config)


def held_bytes(model_name: str, g: GraphDataset, config) -> int:
    """Bytes held for backward after one training forward of the seed-0 model (data excluded)."""
    torch.manual_seed(0)
    model = convert(MODELS[model_name].build(g), config).train()
    with blockquant.track_saved(model, exclude=(g.x, g.edge_index, g.y)) as mem:
        out = model(g.x, g.edge_index)  # noqa: F841 - the graph must be alive when the block ends
    return int(mem.total_bytes)


# ----------------------------------------------------------------------------- training


def checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def train_run(model_name: str, g: GraphDataset, config, seed: int, soft_labels: Optional[torch.Tensor] = None,
              max_epochs: Optional[int] = None, patience: Optional[int] = None) -> Dict[str, Any]:
    """Train one seed; per-epoch training loss and validation/test accuracy, and the test
    accuracy at the best validation epoch. ``max_epochs``/``patience`` override the model's schedule."""
    spec = MODELS[model_name]
    spec = dataclasses.replace(spec, max_epochs=max_epochs or spec.max_epochs,
                               patience=patience if patience is not None else spec.patience)
    torch.manual_seed(seed)
    model = spec.build(g)
    init = checksum(model)
    model = convert(model, config)
    opt = spec.optimizer(model)
    val_curve: List[float] = []
    test_curve: List[float] = []
    losses: List[float] = []
    best_val, best_epoch, step_s = -1.0, -1, 0.0
    for epoch in range(spec.max_epochs):
        t0 = time.perf_counter()
        model.train()
        opt.zero_grad()
        out = model(g.x, g.edge_index)
        if soft_labels is not None:  # GLNN: distil the teacher's log-probabilities (lambda = 0)
            loss = F.kl_div(out.log_softmax(-1), soft_labels, reduction="batchmean", log_target=True)
        elif spec.loss == "nll":
            loss = F.nll_loss(out[g.split['train']], g.y[g.split['train']])
        else:
            loss = F.cross_entropy(out[g.split['train']], g.y[g.split['train']])
        loss.backward()
        opt.step()
        step_s += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            pred = model(g.x, g.edge_index).argmax(-1)
        val = float((pred[g.split["valid"]] == g.y[g.split["valid"]]).float().mean())
        test = float((pred[g.split["test"]] == g.y[g.split["test"]]).float().mean())
        val_curve.append(val)
        test_curve.append(test)
        if val > best_val:
            best_val, best_epoch = val, epoch
        if spec.patience is not None and epoch - best_epoch >= spec.patience:
            break
    return {"init_checksum": init, "epochs": len(val_curve), "best_epoch": best_epoch, "best_val": 100 * best_val,
            "test_at_best": 100 * test_curve[best_epoch], "final_loss": losses[-1], "step_s": step_s / len(losses),
            "max_epochs": spec.max_epochs, "patience": spec.patience,
            "val": [round(100 * v, 2) for v in val_curve], "test": [round(100 * v, 2) for v in test_curve],
            "loss": [round(v, 5) for v in losses]}


def teacher_soft_labels(spec_name: str, g: GraphDataset, seed: int) -> torch.Tensor:
    """The fp32 teacher's log-probabilities for this seed (the student's target in every config)."""
    teacher = MODELS[spec_name]
    torch.manual_seed(seed)
    model = teacher.build(g)
    opt = teacher.optimizer(model)
    for _ in range(teacher.max_epochs):
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(g.x, g.edge_index)[g.split['train']], g.y[g.split['train']]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model(g.x, g.edge_index).log_softmax(-1)


# ----------------------------------------------------------------------------- summary


def _mean_se(xs: List[float]):
    if not xs:
        return float("nan"), float("nan")
    if len(xs) == 1:
        return xs[0], float("nan")
    return statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs))


def convergence(run: Dict[str, Any], ref: Dict[str, Any]):
    """(epochs to reach ref's best validation accuracy or None, best val up to ref's best epoch - ref's best)."""
    target = round(ref["best_val"], 2)  # the curves are stored rounded to 0.01 point
    reached = next((i + 1 for i, v in enumerate(run["val"]) if v >= target - 0.005), None)
    upto = run["val"][:ref["best_epoch"] + 1]
    gap = (max(upto) if upto else float("nan")) - target
    return reached, gap


def _noise_cell(report: Dict[str, Any]) -> str:
    """Total compression variance / dropout variance, and the largest layer's, from a noise report."""
    def ratio(r):
        return r["compression_var"] / r["dropout_var"] if r["dropout_var"] > 0 else float("nan")

    return f"{ratio(report['total']):.3g} ({max(ratio(r) for r in report['layers']):.3g})"


def summarize(out_dir: str) -> str:
    runs = [json.loads(line) for line in open(os.path.join(out_dir, "runs.jsonl"))]
    sizes = {}
    bpath = os.path.join(out_dir, "bytes.jsonl")
    if os.path.exists(bpath):
        for line in open(bpath):
            r = json.loads(line)
            sizes[(r["label"], r["dataset"], r["model"], r["config"])] = (r["bytes"], r.get("num_nodes"))
    noise = {}
    npath = os.path.join(out_dir, "noise.jsonl")
    if os.path.exists(npath):
        for line in open(npath):
            r = json.loads(line)
            noise[(r["label"], r["dataset"], r["model"], r["config"])] = r
    groups: Dict[tuple, Dict[tuple, Dict[int, Dict[str, Any]]]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["model"]), {}).setdefault((r["label"], r["config"]), {})[r["seed"]] = r
    text = []
    for (dataset, model), by_cfg in groups.items():
        fp32 = next((v for (lab, c), v in by_cfg.items() if c == "fp32"), None)
        text.append(f"\n### {dataset}, {model}\n")
        text.append("| code | config | bytes held | B/node | noise / dropout (max layer) | seeds | test acc % | "
                    "vs fp32 (paired) | best val % | epochs to fp32's best val (ratio to fp32's, median) | reached | "
                    "gap at fp32's best epoch | final train loss |")
        text.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (label, cfg), seeds in by_cfg.items():
            acc = [r["test_at_best"] for r in seeds.values()]
            m, se = _mean_se(acc)
            sd = statistics.stdev(acc) if len(acc) > 1 else float("nan")
            diff = [seeds[s]["test_at_best"] - fp32[s]["test_at_best"] for s in seeds if fp32 and s in fp32]
            dm, dse = _mean_se(diff)
            ratios, gaps, reached = [], [], 0
            for s, r in seeds.items():
                if not fp32 or s not in fp32:
                    continue
                ep, gap = convergence(r, fp32[s])
                gaps.append(gap)
                if ep is not None:
                    reached += 1
                    ratios.append(ep / (fp32[s]["best_epoch"] + 1))
            b, nodes = sizes.get((label, dataset, model, cfg), (None, None))
            bcol = f"{b:,}" if b is not None else "-"
            ncol = f"{b / nodes:.1f}" if b is not None and nodes else "-"
            gm, gse = _mean_se(gaps)
            nz = noise.get((label, dataset, model, cfg))
            ncol += " | 0" if cfg == "fp32" else " | -" if nz is None else f" | {_noise_cell(nz['report'])}"
            text.append(
                f"| {label} | {cfg} | {bcol} | {ncol} | {len(acc)} | {m:.2f} ± {sd:.2f} | "
                f"{'-' if cfg == 'fp32' else f'{dm:+.2f} ± {dse:.2f}'} | "
                f"{statistics.fmean(r['best_val'] for r in seeds.values()):.2f} | "
                f"{statistics.median(ratios):.2f}x" if ratios else
                f"| {label} | {cfg} | {bcol} | {ncol} | {len(acc)} | {m:.2f} ± {sd:.2f} | "
                f"{'-' if cfg == 'fp32' else f'{dm:+.2f} ± {dse:.2f}'} | "
                f"{statistics.fmean(r['best_val'] for r in seeds.values()):.2f} | -")
            text[-1] += (f" | {reached}/{len(gaps)} | {gm:+.2f} ± {gse:.2f} | "
                         f"{statistics.fmean(r['final_loss'] for r in seeds.values()):.3f} |")
    return "\n".join(text)


def _load(out_dir: str, name: str) -> List[Dict[str, Any]]:
    path = os.path.join(out_dir, name)
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def compact_tables(out_dirs: List[str], configs: List[str]) -> str:
    """The README's condensed tables: per model, fp32's accuracy and each config's paired difference
    (with its noise ratio); then every (model, config) sorted by noise ratio."""
    rows, points = [], []
    noise: Dict[tuple, Dict[str, Any]] = {}
    by: Dict[tuple, Dict[str, Dict[int, Dict[str, Any]]]] = {}
    for out_dir in out_dirs:  # merged: one model's runs may lie in several folders (e.g. configs added later)
        noise.update({(r["dataset"], r["model"], r["config"], r["label"]): r["report"]
                      for r in _load(out_dir, "noise.jsonl")})
        for r in _load(out_dir, "runs.jsonl"):
            key = r["config"] if r["config"] == "fp32" else f"{r['config']} ({r['label']})"
            seeds = by.setdefault((r["dataset"], r["model"]), {}).setdefault(key, {})
            if r["seed"] in seeds and seeds[r["seed"]]["val"] != r["val"]:
                raise ValueError(f"{out_dir}: {r['model']} {key} seed {r['seed']} differs from the run of the same "
                                 "seed in an earlier folder; a pairing needs one run per seed")
            seeds[r["seed"]] = r
    for (dataset, model), cfgs in by.items():
        fp32 = cfgs.get("fp32", {})
        m, _ = _mean_se([r["test_at_best"] for r in fp32.values()])
        cells = [f"{m:.2f} ({len(fp32)})"]
        for c in configs:
            match = [k for k in cfgs if k == c or k.startswith(c + " (")]
            if not match:
                cells.append("-")
                continue
            part = []
            for k in sorted(match):
                seeds = cfgs[k]
                diff = [seeds[s]["test_at_best"] - fp32[s]["test_at_best"] for s in seeds if s in fp32]
                dm, dse = _mean_se(diff)
                label = k.split(" (")[1].rstrip(")") if " (" in k else ""
                rep = noise.get((dataset, model, c, label))
                if rep is None and not c.startswith("tuned:"):  # a fixed config: any label's measurement
                    rep = next((v for key, v in sorted(noise.items()) if key[:3] == (dataset, model, c)), None)
                ratio = rep["total"]["compression_var"] / rep["total"]["dropout_var"] if rep else None
                nz = f", noise {ratio:.2g}" if ratio is not None else ""
                tag = f"{label}: " if len(match) > 1 else ""
                seeds_note = f" ({len(diff)})" if len(diff) != len(fp32) else ""
                part.append(f"{tag}{dm:+.2f} ± {dse:.2f}{nz}{seeds_note}")
                if ratio is not None:
                    points.append((ratio, dataset, model, k, dm, dse, len(diff)))
            cells.append("; ".join(part))
        rows.append(f"| {model} ({dataset}) | " + " | ".join(cells) + " |")
    head = "| model (data) | fp32 test acc % (seeds) | " + " | ".join(f"{c}: vs fp32" for c in configs) + " |"
    out = [head, "|" + "---|" * (len(configs) + 2)] + rows
    out += ["", "| noise / dropout | model (data) | config | vs fp32 (paired) |", "|---|---|---|---|"]
    out += [f"| {r:.3g} | {m} ({d}) | {k} | {dm:+.2f} ± {dse:.2f} ({n} seeds) |"
            for r, d, m, k, dm, dse, n in sorted(points)]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cora")
    p.add_argument("--root", default=None, help="folder holding Cora/raw (blockquant bench's --root)")
    p.add_argument("--scale", type=float, default=1.0, help="synthetic graphs: scale the preset's size")
    p.add_argument("--normalize-features", action="store_true", help="row-normalise x (PyG's NormalizeFeatures)")
    p.add_argument("--suite", choices=sorted(SUITES), default=None)
    p.add_argument("--models", default=None, help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--configs", default="fp32,iexact,default,tuned:iexact")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=None, help="override the model's epoch limit")
    p.add_argument("--patience", type=int, default=None, help="override the model's early-stopping patience")
    p.add_argument("--label", default="current", help="names the code version in the results (e.g. before, after)")
    p.add_argument("--out", required=True)
    p.add_argument("--summarize", action="store_true")
    p.add_argument("--tables", default=None, metavar="CONFIGS",
                   help="print the README's condensed tables for these configs, over --out (comma-separated dirs)")
    p.add_argument("--noise", action="store_true",
                   help="instead of training: blockquant.noise_report of every model and config (seed-0 weights, "
                        "probes at steps 0 and 10) into <out>/noise.jsonl; plans are those --label made")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.out))
        return
    if args.tables:
        print(compact_tables(args.out.split(","), args.tables.split(",")))
        return
    torch.set_num_threads(1)
    models = args.models.split(",") if args.models else list(SUITES[args.suite or "ogb"])
    normalize = args.normalize_features or (args.suite == "examples")
    g = load_graph(args.dataset, args.root, args.scale, normalize)
    os.makedirs(args.out, exist_ok=True)
    runs_path = os.path.join(args.out, "runs.jsonl")
    done = set()
    if os.path.exists(runs_path):
        for line in open(runs_path):
            r = json.loads(line)
            done.add((r["label"], r["dataset"], r["model"], r["config"], r["seed"]))
    load = os.getloadavg()[0]
    if args.noise:
        for model_name in models:
            for c in args.configs.split(","):
                if c == "fp32":
                    continue
                cfg = resolve_config(c, model_name, g, args.out, args.label)
                torch.manual_seed(0)
                rep = blockquant.noise_report(MODELS[model_name].build(g), g, cfg, draws=16, compression_draws=4)
                with open(os.path.join(args.out, "noise.jsonl"), "a") as f:
                    f.write(json.dumps({"label": args.label, "dataset": g.name, "model": model_name, "config": c,
                                        "ratio": rep.ratio, "layers": {r.layer: r.ratio for r in rep.layers},
                                        "report": rep.to_dict()}) + "\n")
                print(rep.table(), flush=True)
        return
    for model_name in models:
        configs = {c: resolve_config(c, model_name, g, args.out, args.label) for c in args.configs.split(",")}
        for c, cfg in configs.items():
            with open(os.path.join(args.out, "bytes.jsonl"), "a") as f:
                f.write(json.dumps({"label": args.label, "dataset": g.name, "model": model_name, "config": c,
                                    "bytes": held_bytes(model_name, g, cfg), "num_nodes": g.num_nodes}) + "\n")
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            teacher = MODELS[model_name].teacher
            soft = teacher_soft_labels(teacher, g, seed) if teacher else None
            for c, cfg in configs.items():
                if (args.label, g.name, model_name, c, seed) in done:
                    continue
                t0 = time.perf_counter()
                rec = train_run(model_name, g, cfg, seed, soft, args.max_epochs, args.patience)
                rec.update(label=args.label, dataset=g.name, model=model_name, config=c, seed=seed,
                           wall_s=time.perf_counter() - t0, load_start=load, load_end=os.getloadavg()[0],
                           torch=torch.__version__, blockquant=os.path.dirname(blockquant.__file__))
                load = rec["load_end"]
                with open(runs_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{model_name} {c} seed {seed}: test {rec['test_at_best']:.2f} (best val {rec['best_val']:.2f} "
                      f"at epoch {rec['best_epoch'] + 1}/{rec['epochs']}) {rec['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
