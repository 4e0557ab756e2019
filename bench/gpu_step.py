"""One training step of the arxiv-like SAGE and GAT on a GPU: peak memory, step time and host syncs.

For each model and configuration (``blockquant bench``'s models, data, loss and configurations;
``fp32-sparse`` is plain PyG given a sparse ``adj_t``, its best form): one warm-up step (builds the
graph's caches and compiles the Triton kernels), then

* host syncs of one forward + backward, counted twice: by ``blockquant.host_syncs.count_host_syncs``
  (the CPU counter the tests use) and by ``torch.cuda.set_sync_debug_mode("warn")`` (CUDA's own
  detector); the optimizer step is left out of both (Adam reads its host-side step counters);
* peak of one step (forward, loss, backward, Adam step) above what was allocated before it:
  ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` (reset before the step);
* step time: the median of ``--steps`` steps, synchronised, and its ratio to ``fp32-sparse``
  (goal: ``iexact`` <= 1.10x).

    python bench/gpu_step.py [--models sage,gat] [--configs fp32,fp32-sparse,iexact,default] [--steps 10]
                             [--out bench/results/gpu_step_<device>.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
import warnings

import torch

from blockquant.bench.datasets import load_dataset
from blockquant.bench.runner import BenchOptions, Trainer, resolve_configs
from blockquant.host_syncs import count_host_syncs

MIB = 2 ** 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sage,gat")
    ap.add_argument("--configs", default="fp32,fp32-sparse,iexact,default")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of this script (no GPU figures)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_step.py needs a CUDA device (or --device cpu for a smoke run)")
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"gpu_step_{slug}.json")
    data = load_dataset("synthetic:arxiv-like", scale=args.scale).to(device)
    rows = []
    for model_name in args.models.split(","):
        opts = BenchOptions(dataset="synthetic:arxiv-like", model=model_name, hidden=128, layers=3, quiet=True)
        trainer = Trainer(data, opts, device)
        for cfg in resolve_configs(args.configs.split(",")):
            model = trainer.build(cfg, 0)
            model.train()
            opt = torch.optim.Adam(model.parameters(), lr=0.01)

            def forward_backward(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                trainer.loss(model(data.x, model.bench_graph)).backward()

            def step(opt=opt, forward_backward=forward_backward):
                forward_backward()
                opt.step()

            step()  # warm-up: caches, kernel compilation, optimizer state
            sync(device)
            # syncs of forward + backward (Adam's step counters are host tensors it reads by design)
            with count_host_syncs() as report:
                forward_backward()
            sync(device)
            detected, peak_alloc, peak_reserved, base_reserved = [], 0, 0, 0
            if cuda:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        forward_backward()
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                detected = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base_alloc = torch.cuda.memory_allocated(device)
                base_reserved = torch.cuda.memory_reserved(device)
                step()
                torch.cuda.synchronize(device)
                peak_alloc = torch.cuda.max_memory_allocated(device) - base_alloc
                peak_reserved = torch.cuda.max_memory_reserved(device)
            times = []
            for _ in range(args.steps):
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                times.append(time.perf_counter() - t0)
            row = {"model": model_name, "config": cfg.name,
                   "peak_step_allocated_mib": round(peak_alloc / MIB, 1),
                   "max_reserved_mib": round(peak_reserved / MIB, 1),
                   "reserved_before_step_mib": round(base_reserved / MIB, 1),
                   "step_ms_median": round(1e3 * statistics.median(times), 2),
                   "step_ms_min": round(1e3 * min(times), 2),
                   "syncs_cpu_counter": report.total, "syncs_cpu_counter_sites": report.table(),
                   "syncs_cuda_detector": len(detected) if cuda else None,
                   "syncs_cuda_detector_messages": sorted(set(detected))[:5]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith(("sites", "messages"))}), flush=True)
            del model, opt, step, forward_backward
            if cuda:
                torch.cuda.empty_cache()
    for model_name in args.models.split(","):
        base = [r for r in rows if r["model"] == model_name and r["config"] == "fp32-sparse"]
        for r in rows:
            if r["model"] == model_name and base:
                r["time_ratio_fp32_sparse"] = round(r["step_ms_median"] / base[0]["step_ms_median"], 3)
                peak0 = base[0]["peak_step_allocated_mib"]
                r["peak_ratio_fp32_sparse"] = round(r["peak_step_allocated_mib"] / peak0, 3) if peak0 else None
    result = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "host": platform.node(), "dataset": data.name, "nodes": data.num_nodes,
              "edges": int(data.edge_index.size(1)), "steps": args.steps, "rows": rows}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# One training step on {name} (synthetic:arxiv-like, {data.num_nodes} nodes)", "",
             "| model | config | peak allocated MiB | max reserved MiB | step ms (median) | x fp32-sparse time "
             "| syncs (CPU counter) | syncs (CUDA detector) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['config']} | {r['peak_step_allocated_mib']} | {r['max_reserved_mib']} | "
                     f"{r['step_ms_median']} | {r.get('time_ratio_fp32_sparse', '')} | {r['syncs_cpu_counter']} | "
                     f"{r['syncs_cuda_detector']} |")
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
