"""Optional dependencies: the core works without them, and each missing one fails in one line naming its extra."""
import os
import subprocess
import sys

import pytest

import blockquant
from blockquant._optional import EXTRA_OF, MissingExtra, require
from blockquant.cli import main

# what [bench] and [gpu] install (setup.py); the core must import and train without any of them
OPTIONAL = ("matplotlib", "ogb", "pandas", "triton")


def _block(monkeypatch, *names):
    for name in names:  # a None entry in sys.modules makes `import name` raise ImportError
        monkeypatch.setitem(sys.modules, name, None)


def test_every_optional_package_names_its_extra():
    assert set(EXTRA_OF) == set(OPTIONAL)
    assert EXTRA_OF["triton"] == "gpu" and EXTRA_OF["matplotlib"] == EXTRA_OF["ogb"] == "bench"


def test_require_raises_one_line_naming_the_extra(monkeypatch):
    # both names: an earlier test may have imported matplotlib.pyplot, which then imports from sys.modules
    _block(monkeypatch, "matplotlib", "matplotlib.pyplot")
    with pytest.raises(MissingExtra) as e:
        require("matplotlib.pyplot", "the plots")
    assert str(e.value) == 'the plots needs matplotlib, which is not installed: pip install "blockquant[bench]"'
    assert isinstance(e.value, ImportError)


def test_bench_out_without_matplotlib_fails_before_training(monkeypatch, tmp_path, capsys):
    _block(monkeypatch, "matplotlib", "matplotlib.pyplot")
    code = main(["bench", "--dataset", "synthetic:tiny", "--configs", "fp32", "--epochs", "1", "--seeds", "1",
                 "--quiet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and 'pip install "blockquant[bench]"' in err and "--out" in err, err
    assert not (tmp_path / "out" / "results.json").exists()


def test_ogb_dataset_without_ogb_names_the_extra(monkeypatch, tmp_path, capsys):
    _block(monkeypatch, "ogb", "ogb.nodeproppred")
    code = main(["bench", "--dataset", "ogbn-arxiv", "--root", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and 'pip install "blockquant[bench]"' in err, err


def test_triton_backend_without_triton_names_the_extra(monkeypatch):
    import torch

    from blockquant.kernels import registry

    monkeypatch.delitem(registry._BACKENDS, "triton", raising=False)
    with pytest.raises(ValueError, match=r'needs triton, which is not installed: pip install "blockquant\[gpu\]"'):
        blockquant.quantize(torch.randn(64), backend="triton")


def test_core_trains_without_any_optional_package():
    """convert, a training step, the codec and tune's import in a process where the optional packages fail to
    import (as on a machine that installed only `pip install blockquant`)."""
    code = f"""
import sys
sys.modules.update({{name: None for name in {OPTIONAL!r}}})
import torch, blockquant
from torch_geometric.nn import GCNConv
from blockquant.bench.datasets import load_dataset
ds = load_dataset("synthetic:tiny")
model = blockquant.convert(torch.nn.ModuleList([GCNConv(ds.num_features, 8)]))
model[0](ds.x, ds.edge_index).square().mean().backward()
assert model[0].lin.weight.grad is not None
assert blockquant.quantize(torch.randn(256)).dequantize().shape == (256,)
assert not any(sys.modules.get(name) for name in {OPTIONAL!r})
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
