"""Peak memory and time of one training step of the OGB-arxiv GAT shape, converted.

3-layer GAT (hidden 128 = 8 heads x 16, BatchNorm, ReLU, dropout 0.5, last layer
1 head) on ``synthetic:arxiv-like`` (169,343 nodes, ~2.33M directed edges, 128
features, 40 classes), converted with a blockquant preset. One step = forward,
cross-entropy on the training nodes, backward. Peak = the maximum of
torch.profiler's CPU allocation trace above the memory in use when the step
began (as ``blockquant bench``). The first training step also builds the cached
attention graph (self loops, CSR sort); later steps reuse it, so both are reported.
The plain-PyG baseline is not run here (about 7.4 GiB with edge_index).

    python bench/gat_arxiv_peak.py [--scale 1.0] [--config iexact] [--steps 3] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("BLOCKQUANT_BACKEND", "torch")

import torch  # noqa: E402

import blockquant  # noqa: E402
from blockquant import QuantConfig  # noqa: E402
from blockquant.bench.datasets import load_dataset  # noqa: E402
from blockquant.bench.models import build_model  # noqa: E402
from blockquant.bench.runner import _cpu_allocation_trace  # noqa: E402

MIB = 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--config", default="iexact")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    data = load_dataset("synthetic:arxiv-like", scale=args.scale)
    torch.manual_seed(0)
    model = build_model("gat", data.num_features, 128, data.out_dim, num_layers=3, dropout=0.5, heads=8)
    model = blockquant.convert(model, QuantConfig.preset(args.config))
    model.train()
    train_idx = data.split["train"]
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        loss_fn(model(data.x, data.edge_index)[train_idx], data.y[train_idx]).backward()

    with blockquant.track_saved(model, exclude=(data.x, data.edge_index)) as mem:
        out = model(data.x, data.edge_index)
    del out
    model.zero_grad(set_to_none=True)
    rows = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        _, _, peak = _cpu_allocation_trace(step)
        model.zero_grad(set_to_none=True)
        rows.append({"step": i, "seconds": round(seconds, 2), "peak_mib": round(peak / MIB, 1)})
        print(rows[-1], flush=True)
    # everything cached with the graph: its structure, the self-looped graph attention uses and its pieces
    from blockquant.adjacency import cached_graph_tensors
    graph_bytes = sum(t.numel() * t.element_size() for t in cached_graph_tensors(data.edge_index))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   "2-core shared CPU under load from other jobs",
        "dataset": data.name, "nodes": data.num_nodes, "edges": int(data.edge_index.size(1)),
        "model": "GAT 3 layers, hidden 128 = 8 heads x 16, BatchNorm, ReLU, dropout 0.5",
        "config": args.config, "saved_for_backward_mib": round(mem.total_bytes / MIB, 1),
        "saved_per_kind_mib": {k: round(v / MIB, 1) for k, v in mem.per_kind.items()},
        "attention_graph_cache_mib": round(graph_bytes / MIB, 1),
        "note": "peak of a step measured after one unprofiled step (the graph cache exists); step seconds "
                "are the unprofiled step",
        "steps": rows,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
