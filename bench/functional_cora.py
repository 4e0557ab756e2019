"""PyG's own example models on Cora, written in the functional style, converted with blockquant:
bytes held after forward and test accuracy, with the functional calls compressed (the default) and
without (``convert(..., functional=False)``, what a converted model did before).

Models, as in pyg-team/pytorch_geometric's examples (NormalizeFeatures, 200 epochs, test accuracy at
the epoch of best validation accuracy, evaluated every epoch):

* ``gcn``: examples/gcn.py. ``F.dropout(0.5)``, GCNConv 1433-16, ``.relu()``, ``F.dropout(0.5)``,
  GCNConv 16-7; Adam lr 0.01, weight decay 5e-4 on conv1 only. ``gcn_cached``: the same with
  ``cached=True`` (the normalised adjacency is module state, not held per step; older gcn.py).
* ``gat``: examples/gat.py. ``F.dropout(0.6)``, GATConv 1433 -> 8 x 8 heads (attention dropout 0.6),
  ``F.elu``, ``F.dropout(0.6)``, GATConv 64 -> 7 (1 head, concat=False, attention dropout 0.6);
  Adam lr 0.005, weight decay 5e-4.

Memory: ``blockquant.track_saved(model, exclude=(data.x, data.edge_index))`` after one training
forward (seed 0): the total, the bytes held at full precision (plain) overall and at the top level
(the functional calls), and the plain bytes by module and graph node. Accuracy: the same seeds for
every config (paired), the difference to fp32 with its standard error over seeds.

    python bench/functional_cora.py --seeds 20 --out bench/results/functional_cora_cpu
    python bench/functional_cora.py --memory-only
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import blockquant
from blockquant.conversion import ConversionWarning

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from shared_data import require_cora  # noqa: E402


class GCN(torch.nn.Module):
    def __init__(self, cin, hidden, cout, cached=False):
        super().__init__()
        self.conv1 = _gcn(cin, hidden, cached)
        self.conv2 = _gcn(hidden, cout, cached)

    def forward(self, x, edge_index):
        x = F.dropout(x, p=0.5, training=self.training)
        x = self.conv1(x, edge_index).relu()
        x = F.dropout(x, p=0.5, training=self.training)
        return self.conv2(x, edge_index)


class GAT(torch.nn.Module):
    def __init__(self, cin, hidden, cout, heads):
        super().__init__()
        from torch_geometric.nn import GATConv

        self.conv1 = GATConv(cin, hidden, heads, dropout=0.6)
        self.conv2 = GATConv(hidden * heads, cout, heads=1, concat=False, dropout=0.6)

    def forward(self, x, edge_index):
        x = F.dropout(x, p=0.6, training=self.training)
        x = F.elu(self.conv1(x, edge_index))
        x = F.dropout(x, p=0.6, training=self.training)
        return self.conv2(x, edge_index)


def _gcn(cin, cout, cached):
    from torch_geometric.nn import GCNConv

    return GCNConv(cin, cout, cached=cached)


@dataclasses.dataclass(frozen=True)
class Case:
    model: str  # gcn, gcn_cached, gat
    config: Optional[str]  # None: fp32 (unconverted)
    functional: bool = True

    @property
    def name(self) -> str:
        if self.config is None:
            return f"{self.model} fp32"
        return f"{self.model} {self.config} functional={'on' if self.functional else 'off'}"


def build(case: Case, data):
    num_classes = int(data.y.max()) + 1
    if case.model.startswith("gcn"):
        model = GCN(data.num_features, 16, num_classes, cached=case.model == "gcn_cached")
        groups = [dict(params=model.conv1.parameters(), weight_decay=5e-4),
                  dict(params=model.conv2.parameters(), weight_decay=0)]
        lr = 0.01
    else:
        model = GAT(data.num_features, 8, num_classes, 8)
        groups = [dict(params=model.parameters(), weight_decay=5e-4)]
        lr = 0.005
    if case.config is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConversionWarning)  # every module covered
            model = blockquant.convert(model, case.config, functional=case.functional)
    return model, torch.optim.Adam(groups, lr=lr)


def memory(case: Case, data) -> Dict[str, object]:
    torch.manual_seed(0)
    model, _ = build(case, data)
    model.train()
    if case.model == "gcn_cached":  # fill the cache (module state) first, as training does
        model(data.x, data.edge_index)
    torch.manual_seed(0)
    with blockquant.track_saved(model, exclude=(data.x, data.edge_index)) as mem:
        out = model(data.x, data.edge_index)
    del out
    top_plain = sum(mem.plain_by_call.get("", {}).values())
    return {"total_bytes": mem.total_bytes, "plain_bytes": mem.per_kind["plain"],
            "top_level_bytes": mem.per_module.get("", 0), "top_level_plain_bytes": top_plain,
            "plain_by_call": {m or "<top level>": dict(v) for m, v in mem.plain_by_call.items()},
            "report": mem.report()}


def train(case: Case, data, seed: int, epochs: int) -> Dict[str, float]:
    torch.manual_seed(seed)
    model, opt = build(case, data)
    best_val = test_at_best = -1.0
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        opt.zero_grad()
        out = model(data.x, data.edge_index)
        F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        opt.step()
        times.append(time.perf_counter() - start)
        model.eval()
        with torch.no_grad():
            pred = model(data.x, data.edge_index).argmax(-1)
        val = float((pred[data.val_mask] == data.y[data.val_mask]).float().mean())
        if val > best_val:
            best_val = val
            test_at_best = float((pred[data.test_mask] == data.y[data.test_mask]).float().mean())
    times.sort()
    return {"test": 100 * test_at_best, "val": 100 * best_val, "median_step_s": times[len(times) // 2]}


def cases(models) -> List[Case]:
    out = []
    for m in models:
        out.append(Case(m, None))
        for cfg in ("iexact", "default"):
            out += [Case(m, cfg, False), Case(m, cfg, True)]
    return out


def load_cora():
    from torch_geometric.datasets import Planetoid
    import torch_geometric.transforms as T

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(require_cora(), os.path.join(tmp, "Cora", "raw"))
        return Planetoid(tmp, "Cora", transform=T.NormalizeFeatures())[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=0, help="train seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="combine the accuracy runs of these result .json files (same memory part) into --out")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--models", default="gcn,gcn_cached,gat")
    ap.add_argument("--accuracy-models", default="gcn,gat", help="models trained for accuracy")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--out", default=None, help="writes <out>.json and <out>.md")
    args = ap.parse_args()
    if args.merge:
        print(write(merge(args.merge), args))
        return
    torch.set_num_threads(1)
    data = load_cora()
    result: Dict[str, object] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "load_avg_1min_start": os.getloadavg()[0],
                    "torch": torch.__version__, "threads": 1},
        "command": "python " + " ".join(sys.argv), "memory": {}, "accuracy": {}}
    for case in cases(args.models.split(",")):
        result["memory"][case.name] = row = memory(case, data)
        print(f"{case.name}: total {row['total_bytes']:,} B, plain {row['plain_bytes']:,} B, top level "
              f"{row['top_level_bytes']:,} B ({row['top_level_plain_bytes']:,} B plain)", flush=True)
    if not args.memory_only:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for model in args.accuracy_models.split(","):
                for case in cases([model]):  # interleaved: every config of a seed, then the next seed
                    r = train(case, data, seed, args.epochs)
                    result["accuracy"].setdefault(case.name, []).append(r)
                    print(f"{case.name} seed {seed}: test {r['test']:.1f}, step {1000 * r['median_step_s']:.1f} ms",
                          flush=True)
                write(result, args)  # after every seed: an interrupted run keeps what it measured
    print(write(result, args))


def merge(paths) -> Dict[str, object]:
    """The first file's memory part and machine, with every file's accuracy runs appended in order."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    result = parts[0]
    result["command"] = " + ".join(p["command"] for p in parts)
    for p in parts[1:]:
        for name, runs in p["accuracy"].items():
            result["accuracy"].setdefault(name, []).extend(runs)
    return result


def write(result, args) -> str:
    if not args.merge:
        result["machine"]["load_avg_1min_end"] = os.getloadavg()[0]
    text = markdown(result, args)
    if args.out:
        for suffix, body in ((".json", json.dumps(result, indent=1)), (".md", text)):
            with open(args.out + suffix + ".tmp", "w") as f:
                f.write(body)
            os.replace(args.out + suffix + ".tmp", args.out + suffix)
    return text


def markdown(result, args) -> str:
    m = result["machine"]
    lines = ["# PyG example models on Cora, functional calls compressed or not",
             "", f"`{result['command']}`; CPU ({m['cpu']}), 1 thread, torch {m['torch']}, load average "
             f"{m['load_avg_1min_start']:.1f} at start, {m.get('load_avg_1min_end', float('nan')):.1f} at end.", "",
             "## Bytes held after one training forward (track_saved, data.x and edge_index excluded)", "",
             "| case | total B | plain B (share) | top level B | top-level plain B (share of total) |",
             "|---|---|---|---|---|"]
    for name, r in result["memory"].items():
        t = max(r["total_bytes"], 1)
        lines.append(f"| {name} | {r['total_bytes']:,} | {r['plain_bytes']:,} ({100 * r['plain_bytes'] / t:.1f}%) | "
                     f"{r['top_level_bytes']:,} | {r['top_level_plain_bytes']:,} "
                     f"({100 * r['top_level_plain_bytes'] / t:.1f}%) |")
    if result["accuracy"]:
        done_by_model: Dict[str, int] = {}
        for name, runs in result["accuracy"].items():
            model = name.split()[0]
            done_by_model[model] = min(done_by_model.get(model, len(runs)), len(runs))
        lines += ["", f"## Test accuracy (%), n paired seeds, {args.epochs} epochs", "",
                  "| case | n | mean ± std | minus fp32: mean ± s.e. | median step ms |", "|---|---|---|---|---|"]
        for name, runs in result["accuracy"].items():
            done = done_by_model[name.split()[0]]
            acc = [r["test"] for r in runs][:done]
            ref = [r["test"] for r in result["accuracy"][name.split()[0] + " fp32"]][:done]
            diff = [a - b for a, b in zip(acc, ref)]
            mean, sd = _mean_sd(acc)
            dmean, dsd = _mean_sd(diff)
            steps = sorted(r["median_step_s"] for r in runs[:done])
            se = dsd / math.sqrt(len(diff))
            lines.append(f"| {name} | {done} | {mean:.2f} ± {sd:.2f} | {dmean:+.2f} ± {se:.2f} | "
                         f"{1000 * steps[len(steps) // 2]:.1f} |")
    return "\n".join(lines) + "\n"


def _mean_sd(xs):
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1))
    return mean, sd


if __name__ == "__main__":
    main()
