"""One-off cost of turning a graph into the CSR pair blockquant aggregates with.

``as_adjacency`` builds ``A``'s CSR (rows are targets) on first use of a graph
and ``A^T``'s on the first backward; both are cached on the graph object for
its lifetime. This script times both builds and reports their bytes on the
synthetic arxiv-like graph of ``blockquant bench`` (169,343 nodes, ~2.33M
directed edges), and the time of one cached lookup.

Usage::

    python bench/csr_conversion.py [--preset arxiv-like]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from blockquant import as_adjacency
from blockquant.bench.datasets import SYNTHETIC_PRESETS, generate_synthetic


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="arxiv-like")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    data = generate_synthetic(SYNTHETIC_PRESETS[args.preset], 0)
    ei, n = data.edge_index, data.num_nodes
    t0 = time.perf_counter()
    adj = as_adjacency(ei, n)
    t1 = time.perf_counter()
    adj.csr_t()
    t2 = time.perf_counter()
    as_adjacency(ei, n)
    t3 = time.perf_counter()
    res = {
        "graph": f"synthetic:{args.preset}", "nodes": n, "edges": int(ei.size(1)),
        "csr_build_s": round(t1 - t0, 3), "csr_t_build_s": round(t2 - t1, 3), "cached_lookup_s": round(t3 - t2, 6),
        "cache_mib": round(adj.cache_nbytes() / 2 ** 20, 1),
        "edge_index_mib": round(ei.numel() * ei.element_size() / 2 ** 20, 1),
        "index_dtype": str(adj.csr()[1].dtype),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
    }
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
