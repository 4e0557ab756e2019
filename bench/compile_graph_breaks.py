"""Count torch.compile graph breaks of converted modules in training mode.

For each module of the table (the original, then converted with ``--config``)
runs ``torch._dynamo.explain(module)(x[, edge_index])`` on ``synthetic:tiny``
(600 nodes, 32 features) in training mode, with ``x`` an intermediate (it has a
``grad_fn``, as inside a model), and prints graphs / breaks and every distinct
break reason with its place in the code. ``--json PATH`` also writes them.

    python bench/compile_graph_breaks.py                   # PyTorch codec backend
    python bench/compile_graph_breaks.py --backend native  # the compiled CPU codec

The result is recorded in ``bench/results/compile_graph_breaks_cpu.md``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Callable, Dict, List, Tuple

import torch


def modules() -> List[Tuple[str, Callable[[], torch.nn.Module], bool]]:
    """(name, factory, takes edge_index) for every row of the table."""
    from torch_geometric.nn import GATConv, GCNConv, SAGEConv

    return [
        ("SAGEConv(32, 64)", lambda: SAGEConv(32, 64), True),
        ("GCNConv(32, 64)", lambda: GCNConv(32, 64), True),
        ("GATConv(32, 16, heads=4)", lambda: GATConv(32, 16, heads=4), True),
        ("Linear(32, 64)", lambda: torch.nn.Linear(32, 64), False),
        ("BatchNorm1d(32)", lambda: torch.nn.BatchNorm1d(32), False),
        ("ReLU", lambda: torch.nn.ReLU(), False),
        ("Dropout(0.5)", lambda: torch.nn.Dropout(0.5), False),
    ]


def _where(reason) -> str:
    frames = getattr(reason, "user_stack", None) or []
    for fs in reversed(frames):
        path = fs.filename
        if "blockquant" in path or "torch_geometric" in path:
            parts = path.replace(os.sep, "/").split("/")
            for anchor in ("blockquant", "kernels", "torch_geometric"):
                if anchor in parts:
                    path = "/".join(parts[len(parts) - parts[::-1].index(anchor) - 1:])
                    break
            return f"{path}:{fs.lineno} {fs.name}"
    return "(outside blockquant)"


def eager_functions(module: torch.nn.Module, args) -> List[str]:
    """blockquant autograd Functions that ran outside the compiled graphs (``aot_eager``): explain
    does not count a Function whose forward dynamo could not trace (it runs it as one eager call)."""
    torch._dynamo.reset()
    try:
        out = torch.compile(module, backend="aot_eager")(*args)
    except Exception as e:  # noqa: BLE001 -- recorded: a failed compile is a result here
        return [f"compile failed: {type(e).__name__}: {str(e).splitlines()[-1][:120]}"]
    seen, names, todo = set(), [], [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__.startswith("_") and type(node).__name__.endswith("Backward"):
            names.append(type(node).__name__)  # blockquant's Functions are private classes (_Linear, ...)
        todo.extend(n for n, _ in node.next_functions)
    return sorted(names)


def count(module: torch.nn.Module, args) -> Dict[str, object]:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(module)(*args)
    reasons = collections.Counter()
    for r in explanation.break_reasons:
        first_line = str(r.reason).strip().splitlines()[0][:160]
        reasons[(first_line, _where(r))] += 1
    return {"graphs": explanation.graph_count, "breaks": explanation.graph_break_count,
            "reasons": [{"count": c, "reason": why, "where": where} for (why, where), c in reasons.most_common()]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="iexact", help="preset or QuantConfig name for the converted modules")
    p.add_argument("--backend", default=None, help="codec backend (BLOCKQUANT_BACKEND); default: by device")
    p.add_argument("--only", default=None, help="substring of the module names to run")
    p.add_argument("--json", default=None, help="also write the counts here")
    a = p.parse_args(argv)
    if a.backend:
        os.environ["BLOCKQUANT_BACKEND"] = a.backend
    import blockquant
    from blockquant.bench.datasets import load_dataset

    data = load_dataset("synthetic:tiny")
    torch.manual_seed(0)
    results = {}
    for name, make, graph in modules():
        if a.only and a.only not in name:
            continue
        row = {}
        for kind in ("original", "converted"):
            torch.manual_seed(0)
            m = make().train()
            if kind == "converted":
                m = blockquant.convert(m, a.config)
            w = torch.ones(data.num_features, requires_grad=True)
            x = data.x * w  # an intermediate, as inside a model
            args = (x, data.edge_index) if graph else (x,)
            row[kind] = count(m, args)
            row[kind]["eager_functions"] = eager_functions(m, args)
        results[name] = row
        o, c = row["original"], row["converted"]
        print(f"{name}: original {o['graphs']} / {o['breaks']}, converted {c['graphs']} / {c['breaks']}; "
              f"Functions outside the compiled graphs: {', '.join(c['eager_functions']) or 'none'}", flush=True)
        for r in c["reasons"]:
            print(f"    {r['count']} x {r['reason']}  @ {r['where']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "config": a.config, "backend": a.backend, "modules": results},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
