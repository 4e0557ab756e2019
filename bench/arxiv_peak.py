"""Peak step memory on the arxiv-like graph, without training.

A lean form of ``blockquant bench`` for a loaded CPU: the same data
(``synthetic:arxiv-like``), models, configurations and loss, and the same
peak definition (``torch.profiler``'s CPU allocation trace over one step of
forward, cross-entropy and backward, above the memory in use when it starts);
per configuration one warm-up step (fills the CSR and GCN caches) and one
profiled step. Rows are written as they finish. Step times are not measured
here: configurations run one after another, so their times would compare
different loads; ``bench/speed.py`` times them in interleaved rounds.

Usage::

    python bench/arxiv_peak.py MODEL CONFIGS OUT.json
    python bench/arxiv_peak.py sage iexact,fp32-sparse,exact,default,checkpoint,fp32 \
        bench/results/arxiv_peak_sage_cpu.json
"""
import json
import os
import platform
import sys
import warnings

import torch
from blockquant.bench.datasets import load_dataset
from blockquant.bench.runner import BenchOptions, Trainer, cpu_allocation_trace, resolve_configs

warnings.simplefilter("ignore")
model_name, configs, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
data = load_dataset("synthetic:arxiv-like")
opts = BenchOptions(dataset="synthetic:arxiv-like", model=model_name, hidden=128, layers=3, quiet=True)
tr = Trainer(data, opts, torch.device("cpu"))
rows = []
for cfg in resolve_configs(configs):
    model = tr.build(cfg, 0)
    model.train()
    def step(model=model):  # bound now: `del model` below frees it before the next config is built
        tr.loss(model(data.x, model.bench_graph)).backward()
    step()
    model.zero_grad(set_to_none=True)
    _, trace = cpu_allocation_trace(step)
    peak, largest = trace.peak, trace.largest
    model.zero_grad(set_to_none=True)
    row = {"config": cfg.name, "quant": cfg.quant.short() if cfg.quant else None,
           "adjacency": cfg.describe()["adjacency"],
           "peak_step_mib": round(peak / 2**20, 1), "largest_alloc_mib": round(largest / 2**20, 1)}
    rows.append(row)
    print(json.dumps(row), flush=True)
    del model
    with open(out, "w") as f:
        json.dump({"graph": {"nodes": data.num_nodes, "edges": int(data.edge_index.size(1)), "features": 128},
                   "model": model_name, "command": "python " + " ".join(sys.argv),
                   "machine": f"{platform.machine()} {os.cpu_count()} cores (shared with other jobs), "
                              f"torch {torch.__version__}",
                   "rows": rows}, f, indent=1)
