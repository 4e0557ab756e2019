"""A converted model under torch.compile on Cora: accuracy and held memory against eager.

For each seed, trains the same model (``build_model("sage", ...)``: 2 SAGE layers,
hidden 64, BatchNorm, ReLU, dropout 0.5; Adam lr 0.01, weight decay 5e-4, full
batch) three ways: the original model eager, the converted model eager, and the
converted model under ``torch.compile`` (Inductor unless ``--backend``). Reports
the test accuracy at the best validation epoch and the bytes autograd holds
after one training forward pass (``blockquant.memory.graph_saved_bytes``: a walk
of the graph after the fact; ``track_saved``'s module hooks would add graph
breaks to the compiled model and change what it saves), excluding the features,
``edge_index`` and the graph's cached CSR, which the step keeps either way.

    python bench/compile_cora.py --root DIR               # DIR/Cora/raw holds the Planetoid files

The result is written to ``--out`` (JSON) and recorded in
``bench/results/compile_cora_cpu.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch


def _train(model, data, step_fn, epochs: int, lr: float, wd: float):
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    tr, va, te = data.split["train"], data.split["valid"], data.split["test"]
    best_val, best_test, first_step_s = -1.0, 0.0, None
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        opt.zero_grad()
        out = step_fn(data.x, data.edge_index)
        loss = torch.nn.functional.cross_entropy(out[tr], data.y[tr])
        loss.backward()
        opt.step()
        if first_step_s is None:
            first_step_s = time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            pred = model(data.x, data.edge_index).argmax(-1)
        val = float((pred[va] == data.y[va]).float().mean())
        test = float((pred[te] == data.y[te]).float().mean())
        if val > best_val:
            best_val, best_test = val, test
    return best_val, best_test, first_step_s


def _held_after_forward(fn, model, data) -> int:
    from blockquant import as_adjacency
    from blockquant.memory import graph_saved_bytes

    model.train()
    out = fn(data.x, data.edge_index)
    csr = as_adjacency(data.edge_index, num_nodes=data.num_nodes)._structure.tensors()
    held = graph_saved_bytes(out, exclude=(data.x, data.edge_index, csr))
    del out
    return held


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                  "planetoid"),
                   help="folder holding Cora/raw (copied to a temporary folder first)")
    p.add_argument("--config", default="iexact")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import blockquant
    from blockquant.bench.datasets import load_planetoid
    from blockquant.bench.models import build_model

    tmp = tempfile.mkdtemp(prefix="bq_cora_")
    try:
        shutil.copytree(os.path.join(a.root, "Cora"), os.path.join(tmp, "Cora"))
        data = load_planetoid("cora", tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for mode in ("original eager", "converted eager", "converted compiled"):
            torch.manual_seed(seed)
            model = build_model("sage", data.num_features, 64, data.num_classes, num_layers=2, dropout=0.5)
            if mode != "original eager":
                blockquant.convert(model, a.config)
            fn = model
            if mode.endswith("compiled"):
                torch._dynamo.reset()
                fn = torch.compile(model, backend=a.backend)
            t0 = time.perf_counter()
            best_val, best_test, first_s = _train(model, data, fn, a.epochs, 0.01, 5e-4)
            total_s = time.perf_counter() - t0
            held = _held_after_forward(fn, model, data)
            row = {"seed": seed, "mode": mode, "best_val": best_val, "test_at_best_val": best_test,
                   "held_bytes_after_forward": held, "first_step_s": first_s, "train_s": total_s}
            rows.append(row)
            print(f"seed {seed}  {mode:20s} val {best_val:.4f}  test {best_test:.4f}  held {held:>9,d} B  "
                  f"first step {first_s:.1f} s  total {total_s:.1f} s", flush=True)
    result = {"config": a.config, "backend": a.backend, "epochs": a.epochs,
              "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared, loaded)",
              "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
