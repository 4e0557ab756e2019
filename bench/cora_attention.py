"""Cora test accuracy of GAT and GATv2, full precision against blockquant presets.

Settings of tests/test_cora_accuracy.py: 2 layers, 64 hidden = 8 heads x 8, ELU,
dropout 0.6 (features and attention), Adam lr 0.01, weight decay 5e-4, 60 epochs,
test accuracy at the best validation accuracy (checked every 5 epochs in the
second half), seeds 0-4. Reads the raw Planetoid files from the shared data folder.

    python bench/cora_attention.py [--seeds 5] [--out bench/results/cora_attention.md]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

os.environ.setdefault("BLOCKQUANT_BACKEND", "torch")

import torch  # noqa: E402

from blockquant import QuantConfig  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from shared_data import require_cora  # noqa: E402
from test_cora_accuracy import train_eval  # noqa: E402  (the CI test's settings and loop, one home)

CONFIGS = ("fp32", "iexact", "int2", "default")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from torch_geometric.datasets import Planetoid

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(require_cora(), os.path.join(tmp, "Cora", "raw"))
        data = Planetoid(tmp, "Cora")[0]
    lines = ["| model | " + " | ".join(CONFIGS) + " |", "|---|" + "---|" * len(CONFIGS)]
    for v2 in (False, True):
        cells = []
        for name in CONFIGS:
            config = None if name == "fp32" else QuantConfig.preset(name)
            accs = torch.tensor([train_eval(data, "gatv2" if v2 else "gat", s, config) for s in range(args.seeds)])
            cells.append(f"{accs.mean():.1f} ± {accs.std():.1f}")
            print("GATv2" if v2 else "GAT", name, [round(a, 1) for a in accs.tolist()], flush=True)
        lines.append(f"| {'GATv2' if v2 else 'GAT'} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Cora test accuracy (%), {args.seeds} seeds, mean ± std; CPU, 2 shared cores.\n"
                    "`python bench/cora_attention.py`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
