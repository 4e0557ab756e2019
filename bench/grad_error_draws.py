"""What `blockquant bench`'s "grad err" column means, as a figure a reader can judge.

The column is the relative L2 error ||g - g_fp32|| / ||g_fp32|| of ONE draw of the first step's weight gradients
(dropout off, same weights). A compressed gradient is unbiased: its error is zero-mean noise, so the mean of K
independent draws (K rounding/projection seeds) must approach the fp32 gradient like 1/sqrt(K): the error of
the mean falls 2x for every 4x more draws. Training sums many steps' gradients, so it averages the noise the
same way. A biased method would level off instead.

    python bench/grad_error_draws.py --dataset synthetic:small --draws 1,4,16,64 \
        --out bench/results/grad_error_draws_cpu.md

Writes a markdown table (and the same figures as JSON beside it).
"""
import argparse
import json
import math
import os
import platform
import sys
import time

import torch

from blockquant.bench.datasets import load_dataset
from blockquant.bench.runner import BenchOptions, Trainer, _rel_error, resolve_config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic:small")
    p.add_argument("--root", default=None)
    p.add_argument("--model", default="sage")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--configs", default="exact,iexact,int2,default")
    p.add_argument("--draws", default="1,4,16,64", help="K values: the error of the mean of K draws")
    p.add_argument("--out", default=None, help="markdown file (JSON beside it); default: print only")
    args = p.parse_args(argv)
    draws = sorted({int(k) for k in args.draws.split(",")})
    torch.set_num_threads(1)

    data = load_dataset(args.dataset, args.root)
    opts = BenchOptions(dataset=args.dataset, root=args.root, model=args.model, hidden=args.hidden,
                        layers=args.layers, quiet=True)
    trainer = Trainer(data, opts, torch.device("cpu"))
    reference = trainer.weight_grads(trainer.build(resolve_config("fp32"), 0))
    rows = []
    for name in args.configs.split(","):
        model = trainer.build(resolve_config(name), 0)  # the same weights as the reference
        start = time.perf_counter()
        total, errors, single = None, {}, []
        for k in range(1, max(draws) + 1):
            torch.manual_seed(1000 + k)  # a fresh rounding / projection seed per draw
            g = trainer.weight_grads(model)
            single.append(_rel_error(g, reference)["grad_rel_error"])
            total = g if total is None else {n: total[n] + g[n] for n in g}
            if k in draws:
                errors[k] = _rel_error({n: t / k for n, t in total.items()}, reference)["grad_rel_error"]
        rows.append({"config": name, "errors": errors, "single_draw_mean": sum(single) / len(single),
                     "seconds": time.perf_counter() - start})
        print(name, {k: round(v, 4) for k, v in errors.items()}, file=sys.stderr)

    kmax = max(draws)
    lines = [f"# Gradient error of one draw vs the mean of K draws ({data.name}, {args.model} "
             f"{args.layers}x{args.hidden})", "",
             f"`python {' '.join(sys.argv)}`; {platform.node() or 'cpu'}, torch {torch.__version__}, "
             f"load average {os.getloadavg()[0]:.1f}.", "",
             "Relative L2 error of the first step's weight gradients against fp32 (dropout off, same weights), "
             "for the mean of K independently compressed gradients. Unbiased noise falls like 1/sqrt(K): "
             f"the last column is the error at K={kmax} times sqrt({kmax}), which stays near the K=1 error when "
             "the estimate is unbiased.", "",
             "| config | " + " | ".join(f"K={k}" for k in draws) + f" | K={kmax} x sqrt({kmax}) |",
             "|---|" + "---|" * (len(draws) + 1)]
    for r in rows:
        e = r["errors"]
        lines.append(f"| {r['config']} | " + " | ".join(f"{e[k]:.3g}" for k in draws)
                     + f" | {e[kmax] * math.sqrt(kmax):.3g} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump({"command": sys.argv, "dataset": data.name, "draws": draws, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
