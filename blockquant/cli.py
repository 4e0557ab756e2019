"""The ``blockquant`` command line (also ``python -m blockquant``).

Subcommands:
    bench   compare activation-memory savers (fp32, checkpoint, blockquant
            presets or JSON configs) on one dataset and model; see
            ``blockquant bench --help``.
    tune    choose bits, block size, projection and levels per layer under a
            memory budget (:func:`blockquant.tune`); see ``blockquant tune --help``.

User errors (unknown names, missing data, out of memory) print one line on
stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from typing import List, Optional, Sequence

from ._optional import MissingExtra, require
from .bench.errors import BenchError

_EPILOG = """\
datasets (--dataset):
  synthetic                 built-in generator, 'small' preset (3,000 nodes, 8 classes): the quick default
  synthetic:tiny            600 nodes (tests)
  synthetic:arxiv-like      169,343 nodes, ~1.17M undirected edges, 128 features, 40 classes
  synthetic:products-like   2,449,029 nodes, ~61.9M undirected edges, 100 features, 47 classes
                            (--scale multiplies the node and edge counts of any synthetic preset)
  cora, citeseer, pubmed    PyG Planetoid, read from ROOT/<Cora|CiteSeer|PubMed>/raw (public split)
  ogbn-arxiv, ogbn-products OGB, read from ROOT/ogbn_<name>/ prepared beforehand (RELEASE_v1.txt, raw/,
  ogbn-proteins             split/); ogbn-proteins uses the mean of incoming edge features as node
                            features and reports ROC-AUC over its 112 binary tasks.
  Nothing is ever downloaded. Default ROOT: $BLOCKQUANT_DATA, else ./data.

configs (--configs, comma-separated):
  fp32        no compression, edge_index        checkpoint  torch.utils.checkpoint (non-reentrant) per layer
  fp32-sparse no compression, the graph as a torch.sparse CSR adj_t (PyG's memory-efficient form)
  int1 int2 int4 int8 exact iexact default      blockquant.QuantConfig presets, applied with
                                                blockquant.convert(model, config)
  PATH.json   a QuantConfig as JSON, e.g. {"bits": 2, "block_size": 256, "rp_ratio": 8}
              or a per-layer plan written by 'blockquant tune' (same --model/--hidden/--layers)

Each row: peak memory of one training step (forward+loss+backward, above the memory in use at its
start; ratio to fp32), activation memory held for backward after forward (MiB, bytes/node, ratio to
fp32), median training-step time and its ratio to plain PyG's best form (fp32-sparse when it ran, else fp32;
wall and process CPU time, min / median over rounds: the configurations train in interleaved rounds, one
epoch of each per round, and each step is compared with the reference's step of the same round),
validation/test metric (test at best validation, mean ± std over seeds), and the relative error
of the first step's weight gradients against fp32 (same initial weights, dropout off).

mini-batch (--batch-size N): the same configurations trained with PyG's loaders (--loader random, the
default, runs everywhere; neighbor and cluster need pyg-lib or torch-sparse). Memory columns are per step;
an epoch (one pass over the loader, interleaved as in full batch) takes the sum of its steps' times.

examples:
  blockquant bench
  blockquant bench --dataset synthetic:arxiv-like --batch-size 16384 --loader random --epochs 5
  blockquant bench --dataset synthetic:tiny --nproc 2 --configs fp32,iexact --epochs 10
  blockquant bench --dataset cora --root data/planetoid --epochs 200 --seeds 5 --out bench/results/bench_cora
  blockquant bench --dataset synthetic:arxiv-like --epochs 100 --device cuda --out results/arxiv_like
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a one-line BenchError (exit 2) instead of usage + message."""

    def error(self, message: str):  # type: ignore[override]
        raise BenchError(f"{message} (see '{self.prog} --help')")


def _positive_int(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects a positive integer; got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} expects a positive integer; got {v}")
        return v

    return parse


def _positive_float(name: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects a positive number; got {s!r}") from None
        if not v > 0 or v != v or v == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} expects a positive number; got {s}")
        return v

    return parse


def _seeds(s: str) -> tuple:
    """``N`` -> seeds 0..N-1; ``a,b,c`` -> exactly those seeds."""
    try:
        if "," in s:
            seeds = tuple(int(p) for p in s.split(",") if p.strip())
        else:
            n = int(s)
            if n < 1:
                raise ValueError
            seeds = tuple(range(n))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds expects a count N >= 1 or a list like 0,1,2; got {s!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds expects distinct seeds; got {s!r}")
    return seeds


def _dropout(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"--dropout expects a probability in [0, 1); got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .bench.datasets import default_root
    from .bench.models import MODEL_NAMES
    from .bench.runner import DEFAULT_CONFIGS, BenchOptions

    d = BenchOptions()
    parser = _Parser(prog="blockquant", description="blockquant: block-wise low-bit activation compression "
                                                    "for GNN training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    b = sub.add_parser(
        "bench", help="compare activation memory, speed and accuracy of configurations",
        description="Train one GNN on one dataset under several activation-memory configurations "
                    "(same data, initial weights, seeds, epochs and device) and report memory, time, "
                    "accuracy and gradient error.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--dataset", default=d.dataset, metavar="NAME",
                   help="synthetic[:tiny|small|arxiv-like|products-like], cora, citeseer, pubmed, ogbn-arxiv, "
                        "ogbn-products or ogbn-proteins (default: %(default)s = synthetic:small)")
    b.add_argument("--root", default=None, metavar="DIR",
                   help=f"folder holding prepared datasets (default: $BLOCKQUANT_DATA or ./data, now {default_root()})")
    b.add_argument("--scale", type=_positive_float("--scale"), default=d.scale, metavar="F",
                   help="multiply the node and edge counts of a synthetic preset (default: %(default)s)")
    b.add_argument("--model", default=d.model, metavar="NAME",
                   help=f"one of {', '.join(MODEL_NAMES)} (default: %(default)s)")
    b.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), metavar="LIST",
                   help="comma-separated configurations: fp32, checkpoint, blockquant preset names or JSON "
                        "files (default: %(default)s)")
    b.add_argument("--epochs", type=_positive_int("--epochs"), default=d.epochs, metavar="N",
                   help="full-batch training epochs per seed (default: %(default)s)")
    b.add_argument("--seeds", type=_seeds, default=d.seeds, metavar="N|LIST",
                   help="number of seeds (0..N-1) or an explicit list like 0,3,7 (default: 2)")
    _add_model_shape_arguments(b, d)
    b.add_argument("--lr", type=_positive_float("--lr"), default=d.lr, metavar="LR",
                   help="Adam learning rate (default: %(default)s)")
    b.add_argument("--device", default=d.device, metavar="DEV",
                   help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    b.add_argument("--out", default=None, metavar="DIR",
                   help="write results.json, results.csv and PNG plots here (default: print the table only)")
    b.add_argument("--resume", action="store_true",
                   help="reuse what an interrupted run with the same settings finished in --out DIR (results.json "
                        "is rewritten after each seed: every configuration's first-step measurements and finished "
                        "seeds) and train only the missing seeds")
    b.add_argument("--quiet", action="store_true", help="no progress bars (the final table is still printed)")
    b.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None, metavar="N",
                   help="train with mini-batches of about N nodes from a PyG loader instead of full batch; "
                        "memory is then measured per step, on one fixed batch (default: full batch)")
    b.add_argument("--loader", default=None, choices=("random", "neighbor", "cluster"),
                   help="PyG loader for --batch-size: random (RandomNodeLoader, runs everywhere; the default), "
                        "neighbor (NeighborLoader) or cluster (ClusterLoader); the last two need pyg-lib or "
                        "torch-sparse")
    b.add_argument("--memory-limit-gib", type=_positive_float("--memory-limit-gib"), default=None, metavar="X",
                   help="cap this process's address space at X GiB (RLIMIT_AS): a configuration that needs more "
                        "is stopped cleanly and reported as 'did not fit' instead of exhausting the machine")
    b.add_argument("--nproc", type=_positive_int("--nproc"), default=None, metavar="N",
                   help="data-parallel training on N processes of this machine (DistributedDataParallel via "
                        "torchrun; gloo on CPU, nccl on CUDA with one GPU per process), each on its shard of the "
                        "graph; reports each rank's held memory, global loss and parameter agreement")
    _add_tune_parser(sub, d)
    return parser


_TUNE_EPILOG = """\
The budget is the bytes the autograd graph holds after one training forward (blockquant.track_saved,
data excluded), as in 'blockquant bench'; the plan holds at most that, measured the same way.
--budget-config NAME|PATH.json uses the bytes of that config applied to every layer (e.g. iexact), so
the tuned plan can be compared with it at equal memory. --max-noise-ratio R asks for the fewest bytes
whose compression noise is at most R times the gradient noise dropout already adds.

Writes (with --out): plan.json (blockquant.convert(model, "plan.json"), blockquant.Plan.from_json,
'blockquant bench --configs plan.json' with the same --model/--hidden/--layers), tune_table.txt,
tune.json (every measured candidate) and pareto.png.

examples:
  blockquant tune --dataset cora --root data/planetoid --model sage --budget-config iexact --out results/tune_cora
  blockquant tune --dataset synthetic:tiny --model gcn --budget-bytes-per-node 100 --out /tmp/tune
  blockquant bench --dataset cora --root data/planetoid --model sage --configs fp32,iexact,results/tune_cora/plan.json
"""


def _add_model_shape_arguments(parser, d) -> None:
    """``--hidden``, ``--layers`` and ``--dropout``: the model's shape, the same for ``bench`` and ``tune``."""
    parser.add_argument("--hidden", type=_positive_int("--hidden"), default=d.hidden, metavar="H",
                        help="hidden channels (default: %(default)s)")
    parser.add_argument("--layers", type=_positive_int("--layers"), default=d.layers, metavar="L",
                        help="message-passing layers (default: %(default)s)")
    parser.add_argument("--dropout", type=_dropout, default=d.dropout, metavar="P",
                        help="dropout probability (default: %(default)s)")


def _add_tune_parser(sub, d) -> None:
    t = sub.add_parser(
        "tune", help="choose bits, block size, projection and levels per layer under a memory budget",
        description="Profile every compressible layer of one GNN on one dataset, allocate a per-layer plan that "
                    "minimises the weight-gradient error within a memory budget, verify it, and write it as JSON.",
        epilog=_TUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--dataset", default=d.dataset, metavar="NAME",
                   help="as for 'blockquant bench' (default: %(default)s)")
    t.add_argument("--root", default=None, metavar="DIR", help="folder holding prepared datasets")
    t.add_argument("--scale", type=_positive_float("--scale"), default=d.scale, metavar="F",
                   help="multiply the node and edge counts of a synthetic preset (default: %(default)s)")
    t.add_argument("--model", default=d.model, metavar="NAME", help="as for 'blockquant bench' (default: %(default)s)")
    _add_model_shape_arguments(t, d)
    g = t.add_mutually_exclusive_group()
    g.add_argument("--budget-mib", type=_positive_float("--budget-mib"), metavar="X",
                   help="memory budget in MiB held for backward")
    g.add_argument("--budget-bytes-per-node", type=_positive_float("--budget-bytes-per-node"), metavar="B",
                   help="memory budget in bytes per node of the graph")
    g.add_argument("--budget-config", metavar="NAME|PATH",
                   help="the bytes of this preset or JSON QuantConfig applied to every layer")
    g.add_argument("--max-grad-error", type=_positive_float("--max-grad-error"), metavar="E",
                   help="fewest bytes whose predicted relative squared gradient error is at most E")
    g.add_argument("--max-noise-ratio", type=_positive_float("--max-noise-ratio"), metavar="R",
                   help="fewest bytes whose predicted compression noise is at most R times the gradient variance "
                        "dropout causes (blockquant.noise_report)")
    t.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the model and of every probe "
                                                                     "(default: %(default)s)")
    t.add_argument("--probe-steps", default="0,10", metavar="LIST",
                   help="fp32 training steps at which gradients are probed (default: %(default)s)")
    t.add_argument("--max-candidates", type=_positive_int("--max-candidates"), default=16, metavar="K",
                   help="candidates per layer measured after the variance-model pruning (default: %(default)s)")
    t.add_argument("--no-refine", action="store_true", help="skip the one-step refinement")
    t.add_argument("--uniform-configs", default="grid", metavar="LIST",
                   help="uniform configs measured for the Pareto plot and as fallbacks: 'grid' (27 configs: bits "
                        "1/2/4/8 x block 64/1024/row x projection 1/8, plus the presets), 'none', or a comma-separated "
                        "list of 'grid', presets, JSON QuantConfig files and configs written like "
                        "int2/G256/rp8/optimal (default: %(default)s)")
    t.add_argument("--out", default=None, metavar="DIR",
                   help="write plan.json, tune.json, tune_table.txt and pareto.png here")
    t.add_argument("--quiet", action="store_true", help="no progress bars")


def _versions() -> dict:
    import torch

    from . import __version__

    v = {"blockquant": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torch_geometric", "ogb", "numpy", "triton"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional: record that it is absent
            v[mod] = None
    return v


def _peak_rss_bytes():
    """This process's peak resident set size so far (Linux/macOS), else ``None``."""
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def _minibatch_options(args: argparse.Namespace):
    """``None`` for full batch, else the checked mini-batch options (fails before any data is loaded)."""
    if args.batch_size is None:
        if args.loader is not None:
            raise BenchError(f"--loader {args.loader} needs --batch-size N (mini-batch training)")
        return None
    from .bench.minibatch import DEFAULT_LOADER, MiniBatchOptions, loader_unavailable_reason

    mb = MiniBatchOptions(loader=args.loader or DEFAULT_LOADER, batch_size=args.batch_size)
    reason = loader_unavailable_reason(mb.loader)
    if reason is not None:
        raise BenchError(reason)
    return mb


def _run_ddp(args: argparse.Namespace, configs) -> int:
    """``--nproc N``: launch :mod:`blockquant.bench.ddp` with torchrun and print each rank's figures."""
    import tempfile

    from .bench.ddp import format_ddp_table, launch, torchrun_command

    worker = ["--dataset", args.dataset, "--scale", str(args.scale), "--model", args.model.strip().lower(),
              "--configs", ",".join(c.source if c.source not in ("builtin", "preset") else c.name for c in configs),
              "--epochs", str(args.epochs), "--seed", str(args.seeds[0]), "--hidden", str(args.hidden),
              "--layers", str(args.layers), "--lr", str(args.lr), "--dropout", str(args.dropout),
              "--device", args.device]
    if args.root is not None:
        worker += ["--root", args.root]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        records = launch(args.nproc, worker, out)
    print(format_ddp_table(records))
    print("command: " + " ".join(shlex.quote(a) for a in torchrun_command(args.nproc, [*worker, "--out", out])))
    return 0


def run_bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import time

    from .bench.datasets import load_dataset
    from .bench.machine import machine_info
    from .bench.models import MODEL_NAMES
    from .bench.report import format_table, write_results
    from .bench.runner import BenchOptions, resolve_configs, resolve_device, run_benchmark

    # validate everything cheap before loading data or training anything
    if args.model.strip().lower() not in MODEL_NAMES:
        raise BenchError(f"unknown model {args.model!r}; expected one of {', '.join(MODEL_NAMES)}")
    configs = resolve_configs(args.configs.split(","))
    device = resolve_device(args.device)
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise BenchError(f"--out {args.out!r} exists and is not a folder; pass a folder path")
    if args.out is not None:  # before the runs, not after them
        require("matplotlib", f"blockquant {args.command} --out (its plots)")
    minibatch = _minibatch_options(args)
    if args.resume and args.out is None:
        raise BenchError("--resume needs --out DIR: the folder of the run to resume")
    if args.nproc is not None:
        if args.resume:
            raise BenchError("--resume is not supported with --nproc; rerun the data-parallel benchmark whole")
        if minibatch is not None:
            raise BenchError("--nproc and --batch-size cannot be combined yet; "
                             "each rank trains full batch on its shard")
        return _run_ddp(args, configs)

    opts = BenchOptions(dataset=args.dataset, root=args.root, model=args.model.strip().lower(),
                        configs=tuple(c.name for c in configs), epochs=args.epochs, seeds=tuple(args.seeds),
                        hidden=args.hidden, layers=args.layers, lr=args.lr, dropout=args.dropout,
                        device=str(device), scale=args.scale, quiet=args.quiet)
    if args.memory_limit_gib is not None:
        from .bench.memlimit import apply_memory_limit

        apply_memory_limit(args.memory_limit_gib)
        opts.memory_limit_gib = args.memory_limit_gib
    t0 = time.time()
    try:
        data = load_dataset(args.dataset, args.root, scale=args.scale)
    except (MemoryError, RuntimeError) as e:
        if args.memory_limit_gib is None or not (isinstance(e, MemoryError) or "can't allocate memory" in str(e)):
            raise
        raise BenchError(f"the dataset alone does not fit in --memory-limit-gib {args.memory_limit_gib:g}; "
                         f"raise the limit or pass a smaller --scale") from None
    load_s = time.time() - t0
    meta = {
        "dataset": data.describe(), "model": opts.model, "hidden": opts.hidden, "layers": opts.layers,
        "lr": opts.lr, "dropout": opts.dropout, "epochs": opts.epochs, "seeds": list(opts.seeds),
        "device": str(device), "metric": data.metric, "versions": _versions(), "machine": machine_info(device),
        "command": "blockquant " + " ".join(shlex.quote(a) for a in argv),
        "dataset_load_s": load_s, "backend_env": os.environ.get("BLOCKQUANT_BACKEND"),
        "memory_limit_gib": args.memory_limit_gib,
    }
    if minibatch is not None:
        meta.update(loader=minibatch.loader, batch_size=minibatch.batch_size)
    done, on_record = {}, None
    if args.out is not None:
        from .bench.resume import finished_records, progress_meta, seeds_left

        if args.resume:
            done = finished_records(args.out, meta, configs)
            reused = [name if not seeds_left(rec, opts.seeds) else
                      f"{name} (seeds {', '.join(str(r['seed']) for r in rec['runs'])} of {len(opts.seeds)})"
                      for name, rec in done.items()]
            print(f"resuming {os.path.join(args.out, 'results.json')}: reusing "
                  f"{', '.join(reused) if reused else 'nothing (no finished seed with these settings)'}")

        def on_record(records_so_far):  # an interrupted run keeps what it finished (see --resume)
            write_results(args.out, records_so_far, progress_meta(meta, records_so_far, configs), plots=False)

    try:
        if minibatch is None:
            records = run_benchmark(data, opts, configs, done=done, on_record=on_record)
        else:
            from .bench.minibatch import run_minibatch_benchmark

            records = run_minibatch_benchmark(data, opts, minibatch, configs, done=done, on_record=on_record)
    except KeyboardInterrupt:
        if args.out is None:
            raise
        raise KeyboardInterrupt(f"the seeds and configurations finished so far are in "
                                f"{os.path.join(args.out, 'results.json')}; the same command with --resume runs "
                                f"only what is left") from None
    meta.update(total_s=time.time() - t0, process_peak_rss_bytes=_peak_rss_bytes(), complete=True, pending=[])
    for r in records:
        r.update(dataset=data.name, model=opts.model, device=str(device), metric=data.metric,
                 epochs=opts.epochs)
    print(format_table(records, meta))
    fitted = [r for r in records if not r.get("status")]
    if minibatch is not None and fitted:
        r = fitted[0]
        print(f"mini-batch: {minibatch.loader} loader, --batch-size {minibatch.batch_size}, "
              f"{r['steps_per_epoch']} steps per epoch; act and peak are per step, measured on one batch of "
              f"{r['batch_nodes']} nodes and {r['batch_edges']} directed edges; epoch = one pass over the loader")
    if args.out is not None:
        paths = write_results(args.out, records, meta)
        print(f"wrote {', '.join(os.path.basename(p) for p in paths)} to {args.out}")
    return 0


def _parse_short(s: str):
    """``int2/G256/rp8/optimal`` (the form QuantConfig.short() prints) -> QuantConfig."""
    from . import QuantConfig

    fields = {}
    try:
        head, *rest = s.split("/")
        fields["bits"] = int(head[3:])
        for part in rest:
            if part == "row":
                fields["block_size"] = "row"
            elif part.startswith("G"):
                fields["block_size"] = int(part[1:])
            elif part.startswith("rp"):
                fields["rp_ratio"] = int(part[2:])
            elif part in ("uniform", "optimal"):
                fields["levels"] = part
            elif part in ("stochastic", "nearest"):
                fields["rounding"] = part
            else:
                raise ValueError(part)
        return QuantConfig(**fields)
    except ValueError as e:
        raise BenchError(f"cannot read config {s!r} ({e}); expected the form int2/G256/rp8/optimal") from None


def _uniform_configs(spec: str) -> tuple:
    from .bench.runner import resolve_config
    from .tune import UNIFORM_GRID

    spec = spec.strip()
    if spec == "grid":
        return UNIFORM_GRID
    if spec == "none":
        return ()
    out = []
    for part in (p for p in spec.split(",") if p.strip()):
        if part.strip() == "grid":
            out.extend(UNIFORM_GRID)
            continue
        if part.strip().startswith("int") and "/" in part:
            out.append(_parse_short(part.strip()))
            continue
        cfg = resolve_config(part)
        if cfg.quant is None:
            raise BenchError(f"--uniform-configs expects presets or JSON QuantConfig files; got {part!r}")
        out.append(cfg.quant)
    return tuple(dict.fromkeys(out))  # each config once


def run_tune(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import time

    import torch

    from . import QuantConfig
    from .bench.datasets import load_dataset
    from .bench.models import MODEL_NAMES, build_model
    from .plan import load_config_or_plan
    from .tune import TuneError, tune

    model_name = args.model.strip().lower()
    if model_name not in MODEL_NAMES:
        raise BenchError(f"unknown model {args.model!r}; expected one of {', '.join(MODEL_NAMES)}")
    budget = max_err = max_noise = None
    if args.budget_config is not None:
        spec = args.budget_config.strip()
        if spec in QuantConfig.preset_names():
            budget = spec
        elif os.path.isfile(spec):
            try:
                budget = load_config_or_plan(spec)
            except (ValueError, TypeError) as e:
                raise BenchError(f"bad --budget-config file {spec!r}: {e}") from None
            if not isinstance(budget, QuantConfig):
                raise BenchError(f"--budget-config {spec!r} holds a plan; pass one QuantConfig or a preset name")
        else:
            raise BenchError(f"--budget-config expects a preset ({', '.join(QuantConfig.preset_names())}) or a JSON "
                             f"QuantConfig file; got {spec!r}")
    elif args.max_grad_error is not None:
        max_err = args.max_grad_error
    elif args.max_noise_ratio is not None:
        max_noise = args.max_noise_ratio
    elif args.budget_mib is None and args.budget_bytes_per_node is None:
        raise BenchError("give a budget: --budget-mib X, --budget-bytes-per-node B, --budget-config NAME, "
                         "--max-grad-error E or --max-noise-ratio R")
    try:
        probes = tuple(int(p) for p in args.probe_steps.split(",") if p.strip())
    except ValueError:
        probes = ()
    if not probes or min(probes) < 0:
        raise BenchError(f"--probe-steps expects step numbers like 0,10; got {args.probe_steps!r}")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise BenchError(f"--out {args.out!r} exists and is not a folder; pass a folder path")
    if args.out is not None:  # before the runs, not after them
        require("matplotlib", f"blockquant {args.command} --out (its plots)")

    uniform = _uniform_configs(args.uniform_configs)
    data = load_dataset(args.dataset, args.root, scale=args.scale)
    if args.budget_mib is not None:
        budget = int(args.budget_mib * 2 ** 20)
    elif args.budget_bytes_per_node is not None:
        budget = int(args.budget_bytes_per_node * data.num_nodes)
    torch.manual_seed(args.seed)
    model = build_model(model_name, data.num_features, args.hidden, data.out_dim, num_layers=args.layers,
                        dropout=args.dropout)
    t0 = time.perf_counter()
    try:
        result = tune(model, data, budget, max_grad_error=max_err, max_noise_ratio=max_noise, probe_steps=probes,
                      seed=args.seed,
                      max_candidates_per_layer=args.max_candidates, refine=not args.no_refine,
                      uniform_grid=uniform, progress=not args.quiet)
    except TuneError as e:
        raise BenchError(str(e)) from None
    elapsed = time.perf_counter() - t0
    result.plan.info.update(dataset=data.name, model=model_name, hidden=args.hidden, layers=args.layers,
                            seed=args.seed, command="blockquant " + " ".join(shlex.quote(a) for a in argv))
    result.timings["tune_wall_s"] = elapsed
    print(f"blockquant tune: {data.name}, {model_name} (hidden {args.hidden}, {args.layers} layers), "
          f"{data.num_nodes:,} nodes; {elapsed:.1f} s")
    print(result.table())
    if args.out is not None:
        paths = result.write(args.out, title=f"{data.name} / {model_name}: memory vs gradient error")
        print(f"wrote {', '.join(os.path.basename(p) for p in paths)} to {args.out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "bench":
            return run_bench(args, argv)
        if args.command == "tune":
            return run_tune(args, argv)
        raise BenchError(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    except (BenchError, MissingExtra) as e:
        msg = " ".join(str(e).split())
        print(f"blockquant: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("blockquant: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
