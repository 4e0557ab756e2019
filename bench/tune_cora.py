"""Accuracy at a memory budget on real Cora: the tuned plan vs fp32 vs the uniform config at the same bytes.

For each model (the settings of tests/test_cora_accuracy.py: PyG's GCN, GraphSAGE, GAT,
public split, 5 seeds, test accuracy at the best validation epoch) and each budget
(the bytes of uniform ``iexact`` and of uniform ``int2`` on that model), this runs
``blockquant.tune`` once on the seed-0 model, then trains every seed with fp32, the
uniform config and the tuned plan. Writes ``<out>/tune_cora.json`` and the plans.

    python bench/tune_cora.py --raw ../shared/data/planetoid/Cora/raw --models gcn,sage \\
        --out bench/results/tune_cora
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import blockquant  # noqa: E402
from blockquant import QuantConfig, track_saved  # noqa: E402
from blockquant.tune import tune  # noqa: E402
from test_cora_accuracy import SEEDS, make_model, train_eval  # noqa: E402  (the CI accuracy settings)


def load_cora(raw: str):
    from torch_geometric.datasets import Planetoid

    tmp = tempfile.mkdtemp(prefix="bq_cora_")
    shutil.copytree(raw, os.path.join(tmp, "Cora", "raw"))
    return Planetoid(tmp, "Cora")[0]


def saved_bytes(name: str, data, config) -> int:
    torch.manual_seed(0)
    model = make_model(name, data.num_features, int(data.y.max()) + 1)[0]
    if config is not None:
        model = blockquant.convert(model, config)
    model.train()
    with track_saved(model, exclude=(data.x, data.edge_index, data.y)) as mem:
        out = model(data.x, data.edge_index)  # noqa: F841 - keep the graph alive for the measurement
    return mem.total_bytes


def accuracy(name: str, data, config, seeds):
    t0 = time.perf_counter()
    accs = [train_eval(data, name, s, config) for s in seeds]
    return {"acc": accs, "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "train_s_per_run": (time.perf_counter() - t0) / len(seeds)}


def summarize(doc) -> str:
    """Markdown table of a tune_cora.json document."""
    lines = ["| model | config | bytes | grad error (rel. sq.) | test acc % (5 seeds) | train s/run | tune s | plan |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rec in doc.items():
        if not isinstance(rec, dict) or "fp32" not in rec:
            continue
        for key, r in rec.items():
            err = r.get("grad_error")
            lines.append(f"| {name} | {key} | {r['bytes']:,} | {'-' if err is None else f'{err:.3g}'} | "
                         f"{r['mean']:.2f} ± {r['std']:.2f} | {r['train_s_per_run']:.1f} | "
                         f"{r['tune_s']:.0f} | " if "tune_s" in r else
                         f"| {name} | {key} | {r['bytes']:,} | {'-' if err is None else f'{err:.3g}'} | "
                         f"{r['mean']:.2f} ± {r['std']:.2f} | {r['train_s_per_run']:.1f} | | ")
            lines[-1] += (", ".join(f"{n}={c}" for n, c in r["plan"].items()) + f" ({r['source']})"
                          if "plan" in r else "") + " |"
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raw", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data",
                                                 "planetoid", "Cora", "raw"))
    p.add_argument("--models", default="gcn,sage,gat")
    p.add_argument("--budgets", default="iexact,int2")
    p.add_argument("--seeds", type=int, default=len(SEEDS))
    p.add_argument("--out", default=os.path.join(HERE, "results", "tune_cora"))
    p.add_argument("--summarize", action="store_true", help="only print the markdown table of <out>/tune_cora.json")
    args = p.parse_args()
    if args.summarize:
        with open(os.path.join(args.out, "tune_cora.json")) as f:
            print(summarize(json.load(f)))
        return
    os.environ.setdefault("BLOCKQUANT_BACKEND", "torch")
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tune_cora.json")
    doc = json.load(open(path)) if os.path.exists(path) else {}
    doc.setdefault("machine", "2-core CPU VM shared with 5-6 other jobs (timings noisy); torch backend, 1 thread")
    data = load_cora(args.raw)
    seeds = SEEDS[:args.seeds]
    for name in args.models.split(","):
        rec = doc.setdefault(name, {})
        rec["fp32"] = {"bytes": saved_bytes(name, data, None), **accuracy(name, data, None, seeds)}
        print(name, "fp32", rec["fp32"]["mean"], flush=True)
        for budget in args.budgets.split(","):
            cfg = QuantConfig.preset(budget)
            torch.manual_seed(0)
            model = make_model(name, data.num_features, int(data.y.max()) + 1)[0]
            t0 = time.perf_counter()
            res = tune(model, data, budget=budget, progress=False)
            tune_s = time.perf_counter() - t0
            res.write(os.path.join(args.out, f"{name}_{budget}"), title=f"Cora / {name}: budget = uniform {budget}")
            uni_err = next((u["grad_error"] for u in res.uniform if u["short"] == cfg.short()), None)
            rec[f"uniform_{budget}"] = {"bytes": saved_bytes(name, data, cfg), "grad_error": uni_err,
                                        **accuracy(name, data, cfg, seeds)}
            rec[f"tuned_{budget}"] = {
                "bytes": res.measured_bytes, "predicted_bytes": res.predicted_bytes,
                "grad_error": res.measured_error, "predicted_grad_error": res.predicted_error,
                "source": res.source, "tune_s": tune_s, "timings": res.timings,
                "plan": {n: c.short() for n, c in res.plan.layers.items()},
                **accuracy(name, data, res.plan, seeds)}
            print(name, budget, rec[f"uniform_{budget}"]["mean"], rec[f"tuned_{budget}"]["mean"],
                  rec[f"tuned_{budget}"]["plan"], flush=True)
            print(res.table(), flush=True)
            with open(path, "w") as f:
                json.dump(doc, f, indent=1)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
