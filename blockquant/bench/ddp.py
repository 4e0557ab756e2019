"""Data-parallel training of converted models with ``DistributedDataParallel``.

Each process (rank) trains full batch on its shard of the graph: the subgraph
induced by its part of a seeded random partition of the nodes (the same
partition on every rank). Gradients are averaged by
:class:`torch.nn.parallel.DistributedDataParallel` (gloo on CPU, nccl on
CUDA, one GPU per rank). Every rank seeds PyTorch with the same seed, so all
build the same initial weights; blockquant mixes the rank into the rounding
seeds (:mod:`blockquant.distributed`), so the noise differs per rank.

Run it with ``torchrun`` (one process per rank)::

    torchrun --standalone --nproc-per-node 2 -m blockquant.bench.ddp \\
        --dataset synthetic:tiny --configs fp32,iexact --epochs 10 --out results/ddp

or ``blockquant bench --nproc 2 ...``, which launches exactly that. Each rank
writes ``rank<r>.json`` into ``--out``: per configuration its shard size, the
bytes its autograd graph held after the forward of its first step (under DDP)
next to the same model's figure without DDP on the same shard, the global
(all-reduced) training loss per step, whether the parameters were identical on
every rank after each step (all-gathered and compared exactly), step times and
the global validation/test metric, plus the first rounding seeds it drew.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import os.path as osp
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

import blockquant

from .datasets import GraphDataset, load_dataset
from .errors import BenchError
from .models import build_model
from .runner import resolve_config

#: the process group's timeout (``--timeout-s``): rendezvous, and every collective, so a rank that hangs
#: makes the others fail after this long; a rank that dies (killed, out of memory) closes its connections
#: and the others fail at their next collective, at once
INIT_TIMEOUT_S = 60


def _first_sentence(e: BaseException) -> str:
    """A backend error's first sentence, without the source location: ``Read error [...]: Connection reset by
    peer``."""
    msg = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return msg.split(". ")[0][:200]


class RankLost(RuntimeError):
    """Another rank stopped answering (it died or hangs): this one stops instead of waiting."""


def _lost_peer(e: BaseException) -> bool:
    """Whether a collective failed because another rank is gone (gloo and nccl messages)."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistBackendError", ())):
        return True
    msg = str(e)
    return any(s in msg for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                                  "Timed out", "timed out", "NCCL communicator was aborted"))


def shard_nodes(num_nodes: int, rank: int, world_size: int, seed: int = 0) -> torch.Tensor:
    """Sorted node ids of ``rank``'s part of a seeded random partition into ``world_size`` parts."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}); got {rank}")
    perm = torch.randperm(num_nodes, generator=torch.Generator().manual_seed(int(seed)))
    return perm.tensor_split(world_size)[rank].sort().values


def shard_dataset(data: GraphDataset, rank: int, world_size: int, seed: int = 0) -> GraphDataset:
    """The subgraph induced by :func:`shard_nodes`, with the splits restricted to it (relabelled)."""
    from torch_geometric.utils import subgraph

    nodes = shard_nodes(data.num_nodes, rank, world_size, seed).to(data.x.device)
    edge_index, _ = subgraph(nodes, data.edge_index, relabel_nodes=True, num_nodes=data.num_nodes)
    new_id = torch.full((data.num_nodes,), -1, dtype=torch.long, device=nodes.device)
    new_id[nodes] = torch.arange(nodes.numel(), device=nodes.device)
    split = {}
    for k, idx in data.split.items():
        mapped = new_id[idx]
        split[k] = mapped[mapped >= 0]
    return GraphDataset(name=f"{data.name} shard {rank}/{world_size}", x=data.x[nodes], edge_index=edge_index,
                        y=data.y[nodes], split=split, num_classes=data.num_classes, task=data.task,
                        metric=data.metric, evaluator=data.evaluator)


def build(shard: GraphDataset, args, spec: str, device: torch.device) -> nn.Module:
    cfg = resolve_config(spec)
    torch.manual_seed(args.seed)
    model = build_model(args.model, shard.num_features, args.hidden, shard.out_dim, num_layers=args.layers,
                        dropout=args.dropout).to(device)
    for m in model.modules():  # each rank's graph is fixed, but keep GCN from caching across models
        if getattr(m, "cached", False):
            m.cached = False
    if cfg.quant is not None:
        model = blockquant.convert(model, cfg.quant)
    model.checkpoint_layers = cfg.checkpoint
    return model


def held_bytes(model: nn.Module, forward, shard: GraphDataset) -> Dict[str, Any]:
    """Bytes the graph holds after ``forward()`` (excluding the shard's data); returns the figure and output."""
    with blockquant.track_saved(model, exclude=(shard.x, shard.edge_index, shard.y)) as mem:
        out = forward()
    return {"bytes": int(mem.total_bytes), "out": out}


def _criterion(shard: GraphDataset) -> nn.Module:
    return nn.BCEWithLogitsLoss() if shard.task == "multilabel" else nn.CrossEntropyLoss()


def _params_identical(model: nn.Module, world_size: int) -> bool:
    """All-gather the flat parameter vector; True when every rank's equals this one's bit for bit."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, flat) for g in gathered)


def _global_correct(out: torch.Tensor, shard: GraphDataset, device) -> Dict[str, float]:
    import torch.distributed as dist

    counts = []
    for k in ("valid", "test"):
        idx = shard.split[k]
        pred = out[idx].argmax(-1)
        counts += [float((pred == shard.y[idx]).sum()), float(idx.numel())]
    t = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {"val": float(t[0] / t[1].clamp(min=1)), "test": float(t[2] / t[3].clamp(min=1))}


def train_config(spec: str, shard: GraphDataset, args, device, rank: int, world_size: int) -> Dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    crit = _criterion(shard)
    train = shard.split["train"]
    x, ei = shard.x, shard.edge_index

    # the figure a single process would see for this shard: same model, no DDP
    alone = build(shard, args, spec, device)
    alone.train()
    single = held_bytes(alone, lambda alone=alone: alone(x, ei), shard)["bytes"]
    del alone

    model = build(shard, args, spec, device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    identical_at_start = _params_identical(model, world_size)
    losses, identical, times, curve = [], [], [], []
    held = None
    for step in range(args.epochs):
        try:
            ddp.train()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if held is None:
                r = held_bytes(model, lambda: ddp(x, ei), shard)
                held, out = r["bytes"], r["out"]
            else:
                out = ddp(x, ei)
            loss = crit(out[train], shard.y[train])
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            del out
            g = loss.detach().reshape(1).double()
            dist.all_reduce(g)
            losses.append(float(g) / world_size)
            identical.append(_params_identical(model, world_size))
            ddp.eval()
            with torch.no_grad():
                curve.append(_global_correct(ddp(x, ei), shard, device))
        except RuntimeError as e:
            if world_size > 1 and _lost_peer(e):
                raise RankLost(f"rank {rank} lost contact with another rank in step {step + 1} of {args.epochs} "
                               f"of config {spec!r} ({_first_sentence(e)})") from None
            raise
    return {
        "config": spec, "shard_nodes": shard.num_nodes, "shard_edges": shard.num_edges,
        "shard_train_nodes": int(train.numel()),
        "held_bytes_ddp": held, "held_bytes_single_process": single,
        "params_identical_at_start": identical_at_start, "params_identical_after_step": identical,
        "loss": losses, "step_times_s": times,
        "step_time_median_s": statistics.median(times) if times else float("nan"),
        "val": [c["val"] for c in curve], "test": [c["test"] for c in curve],
    }


def worker_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blockquant.bench.ddp",
                                description="One rank of data-parallel training (launch with torchrun).")
    p.add_argument("--dataset", default="synthetic:tiny")
    p.add_argument("--root", default=None)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--model", default="sage")
    p.add_argument("--configs", default="fp32,iexact")
    p.add_argument("--epochs", type=int, default=10, help="full-batch steps on each rank's shard")
    p.add_argument("--seed", type=int, default=0, help="the one user seed (every rank seeds torch with it)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, GPU = LOCAL_RANK)")
    p.add_argument("--timeout-s", type=float, default=INIT_TIMEOUT_S,
                   help="the process group's timeout: a rank that hangs makes the others fail after this long "
                        "(default: %(default)s)")
    p.add_argument("--out", required=True, help="folder for rank<r>.json")
    return p


def worker_main(argv: Optional[Sequence[str]] = None) -> int:
    import torch.distributed as dist

    args = worker_parser().parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        print("blockquant.bench.ddp: error: RANK/WORLD_SIZE not set; launch with torchrun "
              "(e.g. torchrun --standalone --nproc-per-node 2 -m blockquant.bench.ddp --out DIR)", file=sys.stderr)
        return 2
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if args.device.startswith("cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout_s))
    try:
        torch.manual_seed(args.seed)
        from blockquant.packed import draw_seed

        seed_draws = [draw_seed() for _ in range(3)]
        data = load_dataset(args.dataset, args.root, scale=args.scale)
        data.to(device)
        shard = shard_dataset(data, rank, world_size, seed=args.seed)
        del data
        try:
            results = [train_config(spec.strip(), shard, args, device, rank, world_size)
                       for spec in args.configs.split(",") if spec.strip()]
        except RankLost as e:  # one clear line, not a traceback from inside the collective
            print(f"blockquant.bench.ddp: error: {e}; that rank probably died (killed, out of memory) or hangs, "
                  f"and its own output says why; this rank stops instead of waiting", file=sys.stderr)
            return 1
        os.makedirs(args.out, exist_ok=True)
        with open(osp.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "world_size": world_size, "backend": backend, "device": str(device),
                       "seed": args.seed, "seed_draws": seed_draws, "args": vars(args), "configs": results},
                      f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


# --------------------------------------------------------------------------- launcher (blockquant bench --nproc)


def torchrun_command(nproc: int, worker_args: Sequence[str]) -> List[str]:
    """``torchrun --standalone --nproc-per-node N -m blockquant.bench.ddp ...`` through this Python."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "blockquant.bench.ddp", *worker_args]


def launch(nproc: int, worker_args: Sequence[str], out: str, timeout_s: float = 600.0) -> List[Dict[str, Any]]:
    """Run ``nproc`` ranks with torchrun on this machine (loopback only); return each rank's record."""
    if nproc < 1:
        raise BenchError(f"--nproc expects a positive integer; got {nproc}")
    os.makedirs(out, exist_ok=True)
    for r in range(nproc):
        stale = osp.join(out, f"rank{r}.json")
        if osp.exists(stale):
            os.remove(stale)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = torchrun_command(nproc, [*worker_args, "--out", out])
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise BenchError(f"data-parallel run did not finish within {timeout_s:.0f} s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        raise BenchError(f"data-parallel run failed (exit {proc.returncode}): "
                         f"{failure_summary(proc.stderr or proc.stdout or '')}")
    records = []
    for r in range(nproc):
        with open(osp.join(out, f"rank{r}.json")) as f:
            records.append(json.load(f))
    return records


def failure_summary(output: str) -> str:
    """What went wrong in a failed torchrun: the rank torchrun saw fail first and how (its "Root Cause"
    block: exit code, signal), then the ranks' own one-line errors; else the output's last lines."""
    parts = []
    root = output.split("Root Cause", 1)
    if len(root) == 2:
        rank = re.search(r"^\s*rank\s*:\s*(\d+)", root[1], re.M)
        code = re.search(r"^\s*exitcode\s*:\s*(-?\d+)[^\n]*?(?:\((SIG[A-Z]+)\))?\s*$", root[1], re.M)
        if rank and code:
            how = f"killed by {code.group(2)}" if code.group(2) else f"exit code {code.group(1)}"
            parts.append(f"rank {rank.group(1)} failed first ({how})")
    parts += [line.strip() for line in output.splitlines() if "blockquant.bench.ddp: error:" in line]
    if not parts:
        parts = [" | ".join(output.strip().splitlines()[-6:])]
    return "; ".join(parts)


def format_ddp_table(records: List[Dict[str, Any]]) -> str:
    head = ["config", "rank", "shard nodes", "held MiB (DDP)", "held MiB (1 proc)", "loss first", "loss last",
            "params equal", "step ms"]
    rows = []
    for rec in records:
        for c in rec["configs"]:
            rows.append([c["config"], str(rec["rank"]), str(c["shard_nodes"]), f"{c['held_bytes_ddp'] / 2**20:.3f}",
                         f"{c['held_bytes_single_process'] / 2**20:.3f}", f"{c['loss'][0]:.4f}",
                         f"{c['loss'][-1]:.4f}",
                         "all steps" if all(c["params_identical_after_step"]) else "NO",
                         f"{c['step_time_median_s'] * 1e3:.1f}"])
    rows.sort(key=lambda r: (r[0], int(r[1])))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    first = records[0]
    out = [f"DistributedDataParallel: {first['world_size']} ranks, backend {first['backend']}, one shard each",
           line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append("held = bytes the autograd graph holds after the first step's forward on the rank's shard, under DDP "
               "and for the same model alone; loss = global (mean over ranks) training loss; params equal = "
               "all-gathered parameters identical on every rank after every step.")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover - run by torchrun
    sys.exit(worker_main())
