"""No warnings that the library causes and its user cannot act on.

PyTorch warns once per process (so only a fresh process shows it) whenever a sparse CSR/CSC tensor is built:
the layout is beta, invariant checks are off. blockquant builds them for its aggregation and attention, and
``blockquant bench`` for plain PyG's ``adj_t`` (fp32-sparse); these printed between the benchmark's progress
bars. ``blockquant.adjacency.quiet_sparse_warnings`` silences exactly those two where the tensors are built.
"""
import os
import subprocess
import sys

SCRIPT = """
import warnings
with warnings.catch_warnings():  # torch_geometric's import-time torch.jit.script deprecations (see conftest.py)
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch_geometric
import torch, blockquant
from torch_geometric.nn import GATConv
from torch_geometric.nn.models import GraphSAGE
from blockquant.bench.datasets import load_dataset
from blockquant.bench.runner import BenchOptions, Trainer

warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    data = load_dataset("synthetic:tiny")
    adj_t = Trainer(data, BenchOptions(), torch.device("cpu")).sparse_adj_t()   # the fp32-sparse config's
    sage = blockquant.convert(GraphSAGE(data.num_features, 16, num_layers=2, out_channels=4))
    gat = blockquant.convert(torch.nn.ModuleList([GATConv(data.num_features, 8, heads=2)]))
    (sage(data.x, data.edge_index).sum() + gat[0](data.x, data.edge_index).sum()).backward()
print("warnings:", [f"{w.category.__name__}: {w.message}" for w in caught])
"""


def test_building_sparse_graphs_prints_no_warnings():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600,
                         env={**env, "OMP_NUM_THREADS": "1", "BLOCKQUANT_BACKEND": "torch"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("warnings: []"), run.stdout[-2000:]
    assert "Warning" not in run.stderr, run.stderr[-2000:]
