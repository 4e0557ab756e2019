"""Host syncs per steady-state training step of converted models, counted on the CPU.

For each model: convert it (default preset), run one warm-up training step (forward,
cross-entropy on the training nodes, backward, SGD step: the first step builds the per-graph
caches), then count one step with :func:`blockquant.host_syncs.count_host_syncs`, and count the
first step of a fresh model on a fresh copy of the graph (the cache builds, once per graph).
Syncs are device values read on the host, copies are tensors built from Python data on the
data's device, dynamic are data-dependent-shape ops; each listed with its site.

    python bench/host_syncs.py [--scale 0.118] [--backend triton|native|torch] [--models sage,gat,...]
                               [--out bench/results/host_syncs_cpu.json]
    python bench/host_syncs.py --compare BEFORE.json AFTER.json     # a Markdown table of two runs

``--scale 0.118`` gives ``synthetic:arxiv-like`` at about 20,000 nodes. The Triton backend runs
through the interpreter on a CPU (set TRITON_INTERPRET=1 before running; this script sets it
when the backend is triton and no GPU is present), slowly: use a smaller ``--scale`` there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time

if "--backend" in sys.argv and sys.argv[sys.argv.index("--backend") + 1] == "triton":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import blockquant  # noqa: E402
from blockquant.bench.datasets import load_dataset  # noqa: E402
from blockquant.bench.models import MODEL_NAMES, ZOO_MODEL_NAMES, build_model, build_zoo_model  # noqa: E402
from blockquant.host_syncs import count_host_syncs  # noqa: E402

def make_model(name: str, in_dim: int, out_dim: int) -> torch.nn.Module:
    """A bench model (``blockquant bench``'s shapes) or a PyG model-zoo model with its defaults."""
    if name in MODEL_NAMES:
        heads = 8 if name == "gat" else 1
        return build_model(name, in_dim, 64, out_dim, num_layers=3, dropout=0.5, heads=heads)
    return build_zoo_model(name, in_dim, 64, out_dim, num_layers=3 if name == "pyg-gcn" else 2)


def training_step(model, opt, x, edge_index, y, idx) -> None:
    opt.zero_grad(set_to_none=True)
    out = model(x, edge_index)
    torch.nn.functional.cross_entropy(out.index_select(0, idx), y.index_select(0, idx)).backward()
    opt.step()


def count_model(name: str, data, backend: str) -> dict:
    torch.manual_seed(0)
    model = blockquant.convert(make_model(name, data.num_features, data.out_dim))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    idx = data.split["train"]
    x, y = data.x, data.y
    # the first step on a graph object nobody used yet: it builds the caches
    edge_index = data.edge_index.clone()
    with count_host_syncs() as first:
        training_step(model, opt, x, edge_index, y, idx)
    with count_host_syncs() as steady:
        training_step(model, opt, x, edge_index, y, idx)
    t0 = time.perf_counter()
    training_step(model, opt, x, edge_index, y, idx)
    seconds = time.perf_counter() - t0
    return {"model": name, "backend": backend, "steady": _summary(steady), "first": _summary(first),
            "step_seconds": round(seconds, 3)}


def _summary(report) -> dict:
    return {**report.by_kind(), "total": report.total,
            "sites": {kind: dict(getattr(report, kind).most_common())
                      for kind in ("syncs", "copies", "dynamic", "host_reads", "opaque_ops")
                      if getattr(report, kind)}}


# Before packed.seed_value existed, the counter could not tell seed reads (host scalars by design) from
# device reads: in such a run, these sites are the seed reads.
_OLD_SEED_READS = re.compile(r"__int__ at blockquant/(packed\.py:\d+ in (_quantize_op|_projection_op|_rank_seed_op)"
                             r"|functional\.py:\d+ in (_seeded_positions|_dropout_noise_op))")


def _device_reads(row, step: str = "steady") -> int:
    sites = row[step]["sites"].get("syncs", {})
    return sum(n for site, n in sites.items() if not _OLD_SEED_READS.search(site))


def _first_total(row) -> int:
    return _device_reads(row, "first") + row["first"]["copies"] + row["first"]["dynamic"]


def compare(before_path: str, after_path: str) -> str:
    """A Markdown table of two runs' steady-state and first-step counts, per model."""
    before, after = (json.load(open(p)) for p in (before_path, after_path))
    lines = [f"{after['dataset']} ({after['nodes']} nodes, {after['edges']} edges), codec backend "
             f"`{after['backend']}`. Steady: one training step after a warm-up step; reads = device values read on "
             "the host (before: seed reads, host scalars by design, left out), copies = tensors built from Python "
             "data on the device, dynamic = data-dependent-shape ops. First step: all three, on a graph object "
             "nobody used before (the per-graph builds).", "",
             "| model | reads before | copies before | dynamic before | reads after | copies after | dynamic after "
             "| first step before | first step after |", "|---|---|---|---|---|---|---|---|---|"]
    rows_before = {r["model"]: r for r in before["rows"]}
    for r in after["rows"]:
        b = rows_before.get(r["model"])
        cells = [r["model"]]
        cells += [_device_reads(b), b["steady"]["copies"], b["steady"]["dynamic"]] if b else ["-"] * 3
        cells += [_device_reads(r), r["steady"]["copies"], r["steady"]["dynamic"]]
        cells += [_first_total(b) if b else "-", _first_total(r)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        print(compare(sys.argv[2], sys.argv[3]), end="")
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.118)
    ap.add_argument("--backend", default=None, help="BLOCKQUANT_BACKEND for the run (default: the default choice)")
    ap.add_argument("--models", default=",".join(MODEL_NAMES + ZOO_MODEL_NAMES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.backend:
        os.environ["BLOCKQUANT_BACKEND"] = args.backend
    torch.set_num_threads(1)
    data = load_dataset("synthetic:arxiv-like", scale=args.scale)
    from blockquant.kernels import get_backend

    backend = get_backend(data.x.device).name
    rows = []
    for name in args.models.split(","):
        row = count_model(name, data, backend)
        rows.append(row)
        s, f = row["steady"], row["first"]
        print(f"{name:<14} steady: syncs {s['syncs']:>4} copies {s['copies']:>4} dynamic {s['dynamic']:>4} "
              f"(host reads {s['host_reads']}) | first step: total {f['total']}", flush=True)
        for kind, sites in s["sites"].items():
            for site, n in sites.items():
                print(f"    {kind:<10} {n:>5}  {site}")
    result = {"dataset": data.name, "nodes": data.num_nodes, "edges": int(data.edge_index.size(1)),
              "backend": backend, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
