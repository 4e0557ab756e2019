"""Where the time of one training step goes, by phase: compressed against plain PyG.

One step (forward, cross-entropy, backward, Adam step) of each configuration runs under
``torch.profiler`` with one intra-op thread, so that every op runs on the calling thread and
the profiled self times add up to the step. Each op's self time is given to one phase, chosen by
the ranges it runs inside (the highest-priority range wins):

====================  =====================================================================
phase                 what it holds
====================  =====================================================================
norm estimator        the normalisation's independent estimate of ``xn ** 2`` (forward and
                      backward: ``_square_estimator``, ``_add_diagonal_term_``)
graph structure       building a graph's CSR (``as_adjacency``), GCN's normalisation (``gcn_norm``)
projection            the random projection (``blockquant::projection`` and the product
                      inside ``blockquant::quantize``; the back-projection in weight gradients)
encode                ``blockquant::quantize`` (the codec), batch norm's fused encode of ``xn``, ReLU's
                      1-bit mask packing (the compiled ReLU packs inside the activation: forward)
decode                ``blockquant::dequantize``, unpacking the ReLU mask
aggregation           the sparse products (``blockquant::csr_spmm``, PyG's ``spmm``), and
                      scatter / gather of PyG's message path
normalisation         BatchNorm forward / backward arithmetic (less the above; the compiled backward
                      decodes ``xn`` block by block inside it)
optimizer             ``Optimizer.step``
forward / backward    everything else: the dense products, elementwise ops, dropout, loss
====================  =====================================================================

The wrappers that name the phases are installed by this script (``record_function`` around a
few library functions); the library itself carries no profiling code.

Usage::

    python bench/step_profile.py --model sage --configs fp32-sparse,iexact,default \
        --out bench/results/step_profile_sage_cpu [--scale 0.25] [--steps 2]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import os.path as osp
import sys
import time
import warnings
from collections import defaultdict

import torch

PHASES = ("forward", "backward", "aggregation", "normalisation", "norm estimator", "encode", "decode", "projection",
          "graph structure", "optimizer")

# range name -> (phase, priority); the highest priority among an op's enclosing ranges wins
_RANGES = {
    "bq::norm_estimator": ("norm estimator", 9),
    "bq::graph_structure": ("graph structure", 8),
    "blockquant::projection": ("projection", 7),
    "bq::projection": ("projection", 7),
    "blockquant::quantize": ("encode", 6),
    "bq::encode": ("encode", 6),
    "bq::mask_pack": ("encode", 6),
    "blockquant::dequantize": ("decode", 6),
    "bq::mask_unpack": ("decode", 6),
    "blockquant::csr_spmm": ("aggregation", 5),
    "bq::aggregation": ("aggregation", 5),
    "bq::normalisation": ("normalisation", 4),
    "bq::optimizer": ("optimizer", 3),
    "bq::forward": ("forward", 1),
    "bq::backward": ("backward", 1),
}
# aten ops that are phases of their own when no blockquant range encloses them (plain PyG's step)
_ATEN = {
    "aggregation": ("sparse", "scatter", "index_add", "segment", "spmm"),
    "normalisation": ("batch_norm",),
}
_MATMUL = ("aten::mm", "aten::matmul", "aten::addmm", "aten::bmm")


def _wrap(owner, name: str, label: str) -> None:
    fn = getattr(owner, name, None)
    if fn is None:  # an older checkout (profiled for comparison) may lack it
        return

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    setattr(owner, name, wrapped)


def install_ranges() -> None:
    """Name the phases the library's own op names do not: wrap a few functions in ``record_function``."""
    import torch_geometric.nn.conv.gcn_conv as gcn_conv
    from torch_geometric.utils import spmm as pyg_spmm_module  # noqa: F401

    import blockquant.adjacency as adjacency
    import blockquant.attention as attention
    import blockquant.functional.normalization as norm
    import blockquant.kernels.bitmask as bitmask
    import blockquant.nn.conv as conv
    import blockquant.packed as packed

    _wrap(norm, "_square_estimator", "bq::norm_estimator")
    _wrap(norm, "_add_diagonal_term_", "bq::norm_estimator")
    if hasattr(norm.SquareSample, "of_affine"):
        norm.SquareSample.of_affine = classmethod(_labelled(norm.SquareSample.of_affine.__func__,
                                                            "bq::norm_estimator"))
    try:
        import blockquant.kernels.native_ops as native_ops
    except ImportError:
        native_ops = None
    if native_ops is not None:
        _wrap(native_ops, "quantize_affine", "bq::encode")  # batch norm's xn, encoded from x
    _wrap(adjacency, "_as_adjacency", "bq::graph_structure")
    _wrap(attention, "_attention_graph", "bq::graph_structure")
    _wrap(conv, "gcn_norm", "bq::graph_structure")
    _wrap(gcn_conv, "gcn_norm", "bq::graph_structure")
    _wrap(bitmask.BitMask, "pack", "bq::mask_pack")
    _wrap(bitmask.BitMask, "unpack", "bq::mask_unpack")
    for cls in (norm._BatchNorm, norm._LayerNorm):
        for meth in ("forward", "backward"):
            raw = cls.__dict__[meth].__func__
            setattr(cls, meth, staticmethod(_labelled(raw, "bq::normalisation")))
    # the back-projection of a weight gradient: (g^T x_p) P^T
    orig = packed.PackedTensor.projection

    def projection(self, dtype=None):
        with torch.profiler.record_function("bq::projection"):
            return orig(self, dtype)

    packed.PackedTensor.projection = projection


def _labelled(fn, label):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)
    return wrapped


def phase_of(event) -> str:
    """The phase an op's self time belongs to (see the module docstring)."""
    best, best_prio = None, -1
    chain = []
    e = event
    while e is not None:
        chain.append(e.name)
        hit = _RANGES.get(e.name)
        if hit is not None and hit[1] > best_prio:
            best, best_prio = hit[0], hit[1]
        e = e.cpu_parent
    if best == "encode" and event.name in _MATMUL:
        return "projection"  # the product x @ P inside blockquant::quantize
    if best in (None, "forward", "backward"):
        for phase, keys in _ATEN.items():
            if any(k in n for n in chain[:-1] for k in keys if n.startswith("aten::")):
                return phase
        if any(n.startswith("autograd::engine::evaluate_function: NativeBatchNormBackward") for n in chain):
            return "normalisation"
    return best or "other"


def profile_step(step) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    per = defaultdict(float)
    ops = defaultdict(float)
    for e in prof.events():
        if e.name.startswith("bq::") or e.name.startswith("ProfilerStep"):
            self_us = e.self_cpu_time_total
        else:
            self_us = e.self_cpu_time_total
        ph = phase_of(e)
        per[ph] += self_us / 1e6
        ops[(ph, e.name)] += self_us / 1e6
    top = sorted(((v, ph, n) for (ph, n), v in ops.items()), reverse=True)[:25]
    return {"wall_s": wall, "phases_s": dict(per),
            "top_ops": [{"phase": ph, "op": n, "self_s": round(v, 4)} for v, ph, n in top]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sage")
    ap.add_argument("--configs", default="fp32-sparse,iexact,default")
    ap.add_argument("--dataset", default="synthetic:arxiv-like")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps per config (the median phase times)")
    ap.add_argument("--out", default=None, help="folder for profile.json and profile.md")
    args = ap.parse_args(argv)

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from blockquant.bench.datasets import load_dataset
    from blockquant.bench.machine import machine_info
    from blockquant.bench.runner import BenchOptions, Trainer, resolve_configs

    install_ranges()
    data = load_dataset(args.dataset, scale=args.scale)
    opts = BenchOptions(dataset=args.dataset, model=args.model, hidden=args.hidden, layers=args.layers, quiet=True,
                        scale=args.scale)
    tr = Trainer(data, opts, torch.device("cpu"))
    rows = []
    for cfg in resolve_configs(args.configs.split(",")):
        model = tr.build(cfg, 0)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            with torch.profiler.record_function("bq::forward"):
                loss = tr.loss(model(data.x, model.bench_graph))
            with torch.profiler.record_function("bq::backward"):
                loss.backward()
            with torch.profiler.record_function("bq::optimizer"):
                opt.step()

        step()  # warm-up: CSR caches, levels, the codec's build
        runs = [profile_step(step) for _ in range(args.steps)]
        best = min(runs, key=lambda r: r["wall_s"])
        row = {"config": cfg.name, "wall_s": [round(r["wall_s"], 3) for r in runs],
               "phases_s": {p: round(best["phases_s"].get(p, 0.0), 4) for p in PHASES + ("other",)
                            if best["phases_s"].get(p, 0.0) > 0},
               "top_ops": best["top_ops"], "load_avg": os.getloadavg()}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("config", "wall_s", "phases_s", "load_avg")}), flush=True)
        del model, opt
    result = {"dataset": args.dataset, "scale": args.scale, "nodes": data.num_nodes, "edges": data.num_edges,
              "model": args.model, "hidden": args.hidden, "layers": args.layers, "threads": 1,
              "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
              "machine": machine_info("cpu"), "rows": rows}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(osp.join(args.out, "profile.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(osp.join(args.out, "profile.md"), "w") as f:
            f.write(markdown(result))
    print(markdown(result))
    return 0


def markdown(result) -> str:
    rows = result["rows"]
    ref = rows[0]
    cols = [p for p in PHASES + ("other",) if any(p in r["phases_s"] for r in rows)]
    lines = [f"Profile of one training step: {result['model']} {result['layers']}x{result['hidden']} on "
             f"{result['dataset']} (scale {result['scale']}: {result['nodes']:,} nodes, {result['edges']:,} edges), "
             f"one intra-op thread, fastest of the profiled steps; seconds of op self time by phase "
             f"(load average {rows[0]['load_avg'][0]:.1f} at the first row). `{result['command']}`", "",
             "| config | step (profiled) | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['config']} | {min(r['wall_s']):.3f} | "
                     + " | ".join(f"{r['phases_s'].get(c, 0.0):.3f}" for c in cols) + " |")
    lines += ["", f"Difference to {ref['config']} by phase (s):", "",
              "| config | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows[1:]:
        lines.append(f"| {r['config']} | " + " | ".join(
            f"{r['phases_s'].get(c, 0.0) - ref['phases_s'].get(c, 0.0):+.3f}" for c in cols) + " |")
    for r in rows:
        lines += ["", f"Top ops of {r['config']} (self s, phase):", ""]
        lines += [f"- {o['op']}: {o['self_s']:.3f} ({o['phase']})" for o in r["top_ops"][:15]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
