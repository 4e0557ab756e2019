"""Step time of plain PyG and converted models, timed in interleaved rounds, across code versions.

A shared, loaded machine makes one timing per configuration meaningless: a config timed while
another job ran looks slow. Here every configuration runs one training step (forward,
cross-entropy, backward, Adam step) per round, round after round, so load hits all of them
alike, and each configuration's time is compared with the reference's *in the same round*:
the ratios' minimum and median over the rounds are the figures to quote, with the load average.

Besides wall time each step records the CPU time of the process that ran it
(``time.process_time``; with ``--threads 1`` every op, the codec included, runs on the calling
thread, so this is the step's own work): other processes steal wall time, far less CPU time.

Code versions: configurations run in worker processes, one per Python interpreter given
(``--python after=.venv/bin/python --python before=/tmp/before/.venv/bin/python``), each
importing the blockquant its environment has installed. Every worker builds the same models (the
model definitions of *this* checkout, ``blockquant/bench/models.py``, loaded by path) on the same
synthetic graph with the same seed; only one worker runs at a time.

Usage::

    python bench/speed.py --models sage,gcn-uncached,gin,graphconv --configs fp32-sparse,iexact,default \
        --rounds 5 --threads 1 --out bench/results/speed_arxiv-like_cpu
    python bench/speed.py --models sage --configs fp32-sparse,iexact,default \
        --python after=.venv/bin/python --python before=/tmp/speed-before/.venv/bin/python \
        --versions-of iexact,default --out bench/results/speed_before_after_cpu

Writes ``speed.json`` (every step's wall and CPU time, the load average around each round, the
machine) and ``speed.md`` (the table) to ``--out``.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import time
from typing import Dict, List

HERE = osp.dirname(osp.abspath(__file__))
MODELS_FILE = osp.join(osp.dirname(HERE), "blockquant", "bench", "models.py")
PLAIN = ("fp32", "fp32-sparse")


# =============================================================================== worker
class Worker:
    """Runs in its own interpreter: holds the data and the models, runs steps on request."""

    def __init__(self, dataset: str, scale: float, threads: int, hidden: int, layers: int):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        from blockquant.bench.datasets import load_dataset

        self.data = load_dataset(dataset, scale=scale)
        self.hidden, self.layers = hidden, layers
        self.models: Dict[str, tuple] = {}
        self._adj_t = None
        spec = importlib.util.spec_from_file_location("blockquant.bench._models_under_test", MODELS_FILE)
        self.model_defs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.model_defs)

    def adj_t(self):
        if self._adj_t is None:
            from torch_geometric.utils import to_torch_csc_tensor

            n = self.data.num_nodes
            self._adj_t = to_torch_csc_tensor(self.data.edge_index, size=(n, n)).t()
        return self._adj_t

    def build(self, key: str, model: str, config: str, seed: int = 0) -> dict:
        torch = self.torch
        import blockquant

        torch.manual_seed(seed)
        d = self.data
        m = self.model_defs.build_model(model, d.num_features, self.hidden, d.out_dim, num_layers=self.layers)
        if config not in PLAIN:
            m = blockquant.convert(m, blockquant.QuantConfig.preset(config))
        graph = self.adj_t() if config == "fp32-sparse" else d.edge_index
        opt = torch.optim.Adam(m.parameters(), lr=0.01)
        self.models[key] = (m, graph, opt)
        return {"built": key}

    def step(self, key: str) -> dict:
        torch = self.torch
        m, graph, opt = self.models[key]
        d = self.data
        m.train()
        opt.zero_grad(set_to_none=True)
        gc.collect()
        t_wall, t_cpu, t_thread = time.perf_counter(), time.process_time(), time.thread_time()
        out = m(d.x, graph)
        loss = torch.nn.functional.cross_entropy(out[d.split["train"]], d.y[d.split["train"]])
        loss.backward()
        opt.step()
        wall = time.perf_counter() - t_wall
        cpu = time.process_time() - t_cpu
        thread = time.thread_time() - t_thread
        return {"wall_s": wall, "cpu_s": cpu, "thread_s": thread, "loss": float(loss)}

    def free(self, key: str) -> dict:
        self.models.pop(key, None)
        gc.collect()
        return {"freed": key}


def worker_main() -> int:
    import warnings

    warnings.simplefilter("ignore")
    w = None
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req.pop("cmd")
        try:
            if cmd == "setup":
                w = Worker(**req)
                import blockquant

                res = {"blockquant": osp.dirname(blockquant.__file__), "nodes": w.data.num_nodes,
                       "edges": w.data.num_edges}
            elif cmd == "quit":
                return 0
            else:
                res = getattr(w, cmd)(**req)
        except Exception as e:  # noqa: BLE001 - reported to the driver, which stops
            import traceback

            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        print(json.dumps(res), flush=True)
    return 0


# =============================================================================== driver
class Remote:
    def __init__(self, name: str, python: str, setup: dict):
        self.name = name
        env = dict(os.environ, OMP_NUM_THREADS=str(setup["threads"]), MKL_NUM_THREADS=str(setup["threads"]))
        self.proc = subprocess.Popen([python, osp.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=HERE)
        self.info = self.call("setup", **setup)

    def call(self, cmd: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.name} died during {cmd} {kw}")
        res = json.loads(line)
        if "error" in res:
            raise SystemExit(f"worker {self.name}: {cmd} {kw} failed: {res['error']}\n{res['traceback']}")
        return res

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        self.proc.wait(timeout=60)


def summarize(times: Dict[str, List[float]], ref: str) -> Dict[str, dict]:
    """Per row: min / median of its times and of its per-round ratio to ``ref``'s time."""
    out = {}
    for row, ts in times.items():
        ratios = [t / r for t, r in zip(ts, times[ref])]
        out[row] = {"min": min(ts), "median": statistics.median(ts),
                    "ratio_min": min(ratios), "ratio_median": statistics.median(ratios)}
    return out


def run_model(remotes: Dict[str, Remote], model: str, rows: List[tuple], args) -> dict:
    """Interleaved rounds of every row ``(version, config)`` of one model."""
    for version, config in rows:
        remotes[version].call("build", key=f"{model}/{config}", model=model, config=config)
    for _ in range(args.warmup):
        for version, config in rows:
            remotes[version].call("step", key=f"{model}/{config}")
    steps: Dict[str, List[dict]] = {f"{v}/{c}": [] for v, c in rows}
    loads = []
    for r in range(args.rounds):
        order = rows[r % len(rows):] + rows[:r % len(rows)]  # rotate: no row always runs first
        load_before = os.getloadavg()[0]
        for version, config in order:
            steps[f"{version}/{config}"].append(remotes[version].call("step", key=f"{model}/{config}"))
        loads.append((round(load_before, 2), round(os.getloadavg()[0], 2)))
        print(f"  {model} round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {v[-1]['wall_s']:.2f}/{v[-1]['cpu_s']:.2f}s" for k, v in steps.items())
            + f" (load {loads[-1][0]:.1f}-{loads[-1][1]:.1f})", flush=True)
    for version, config in rows:
        remotes[version].call("free", key=f"{model}/{config}")
    ref = f"{rows[0][0]}/{rows[0][1]}"
    wall = summarize({k: [s["wall_s"] for s in v] for k, v in steps.items()}, ref)
    cpu = summarize({k: [s["cpu_s"] for s in v] for k, v in steps.items()}, ref)
    return {"model": model, "reference": ref, "steps": steps, "load_avg_1min_per_round": loads,
            "wall": wall, "cpu": cpu}


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"Training step (forward, cross-entropy, backward, Adam) on {s['dataset']} (scale {s['scale']:g}: "
             f"{result['nodes']:,} nodes, {result['edges']:,} edges), {s['layers']} layers x {s['hidden']}, "
             f"{s['threads']} intra-op thread(s); {result['rounds']} interleaved rounds after {result['warmup']} "
             f"warm-up round(s). Ratios are to the first row of each model, taken per round (min / median over "
             f"rounds). CPU = process CPU time of the step. Machine: {result['machine'].get('cpu')}, "
             f"{result['machine'].get('cpu_count')} cores, shared.", "",
             f"`{result['command']}`", "",
             "| model | row | wall min / median (s) | wall ratio min / median | CPU min / median (s) "
             "| CPU ratio min / median | load avg (1 min) over the rounds |",
             "|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        lo = min(a for a, b in m["load_avg_1min_per_round"])
        hi = max(b for a, b in m["load_avg_1min_per_round"])
        for row in m["wall"]:
            w, c = m["wall"][row], m["cpu"][row]
            lines.append(f"| {m['model']} | {row} | {w['min']:.2f} / {w['median']:.2f} | "
                         f"{w['ratio_min']:.2f} / {w['ratio_median']:.2f} | {c['min']:.2f} / {c['median']:.2f} | "
                         f"{c['ratio_min']:.2f} / {c['ratio_median']:.2f} | {lo:.1f}-{hi:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="sage")
    ap.add_argument("--configs", default="fp32-sparse,iexact,default",
                    help="the first is the reference of the ratios")
    ap.add_argument("--dataset", default="synthetic:arxiv-like")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (CSR caches, codec build)")
    ap.add_argument("--python", action="append", default=[],
                    help="NAME=INTERPRETER of a code version (default: after=this interpreter)")
    ap.add_argument("--versions-of", default=None,
                    help="configs run in every version (default: all); the others run in the first only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    versions = dict(p.split("=", 1) for p in args.python) or {"after": sys.executable}
    # a venv's interpreter must keep its path (not resolved through the symlink); workers run in bench/
    versions = {n: osp.abspath(py) if os.sep in py else py for n, py in versions.items()}
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    everywhere = set(configs if args.versions_of is None else args.versions_of.split(","))
    names = list(versions)
    rows = [(names[0], c) for c in configs[:1]]
    rows += [(v, c) for c in configs[1:] for v in names if v == names[0] or c in everywhere]
    setup = {"dataset": args.dataset, "scale": args.scale, "threads": args.threads, "hidden": args.hidden,
             "layers": args.layers}
    remotes = {name: Remote(name, py, setup) for name, py in versions.items()}
    from blockquant.bench.machine import machine_info

    result = {"setup": setup, "rounds": args.rounds, "warmup": args.warmup,
              "versions": {n: {"python": versions[n], **remotes[n].info} for n in names},
              "command": "python bench/speed.py " + " ".join(argv), "machine": machine_info("cpu"), "models": []}
    result["nodes"] = remotes[names[0]].info["nodes"]
    result["edges"] = remotes[names[0]].info["edges"]
    try:
        for model in args.models.split(","):
            result["models"].append(run_model(remotes, model.strip(), rows, args))
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(osp.join(args.out, "speed.json"), "w") as f:
                    json.dump(result, f, indent=1)
                with open(osp.join(args.out, "speed.md"), "w") as f:
                    f.write(markdown(result))
    finally:
        for r in remotes.values():
            r.close()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
