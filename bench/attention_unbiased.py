"""Is the compressed attention gradient unbiased? Relative error of the mean of K
independently compressed gradients against the exact one, for K = 1, 4, 16, 64.

An unbiased estimator's error falls like 1/sqrt(K) (8x from K=1 to K=64); a bias
makes it level off. Graph: 300 random nodes, 2,000 random edges, 16 features,
loss sum(out**2); one fixed input, the compressed model differs only in the
rounding draws. Prints the worst parameter (largest relative error) per K.

    python bench/attention_unbiased.py [--draws 64] [--out bench/results/attention_unbiased.md]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("BLOCKQUANT_BACKEND", "torch")

import torch  # noqa: E402
from torch_geometric.nn import GATConv, GATv2Conv  # noqa: E402

from blockquant import QuantConfig  # noqa: E402
from blockquant.nn import WRAPPERS  # noqa: E402

N, E, F = 300, 2000, 16
KS = (1, 4, 16, 64)
CONFIGS = {"int2": QuantConfig(bits=2, block_size=256), "int4": QuantConfig(bits=4, block_size=256)}
CONVS = {"GATConv": lambda: GATConv(F, 8, heads=2), "GATv2Conv": lambda: GATv2Conv(F, 8, heads=2)}


def grads(module, x, ei):
    out = module(x * 1.0, ei)
    return torch.autograd.grad(out.square().sum(), list(module.parameters()))


def mean_errors(name: str, config: QuantConfig, draws: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, F, generator=g)
    ei = torch.randint(0, N, (2, E), generator=g)
    torch.manual_seed(0)
    orig = CONVS[name]()
    wrapped = WRAPPERS[type(orig)].from_module(orig, config)
    ref = [r.detach() for r in grads(orig, x, ei)]
    total = [torch.zeros_like(r) for r in ref]
    errs = {}
    for k in range(1, draws + 1):
        torch.manual_seed(1000 + k)
        for t, gk in zip(total, grads(wrapped, x, ei)):
            t += gk
        if k in KS:
            errs[k] = max(((t / k - r).norm() / r.norm()).item() for t, r in zip(total, ref) if r.norm() > 0)
    return errs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = ["| conv | config | " + " | ".join(f"K={k}" for k in KS if k <= args.draws) + " | K=1 / K=64 |",
             "|---|---|" + "---|" * (sum(k <= args.draws for k in KS) + 1)]
    for name in CONVS:
        for cname, cfg in CONFIGS.items():
            e = mean_errors(name, cfg, args.draws)
            ratio = e[1] / e[max(e)]
            lines.append(f"| {name} | {cname} | " + " | ".join(f"{e[k]:.3f}" for k in sorted(e)) + f" | {ratio:.1f} |")
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
