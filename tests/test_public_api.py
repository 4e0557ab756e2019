"""The public surface: one ``__all__``, preset names wherever a config goes, the conversion module's name."""
import importlib
import pathlib
import re
import types
import warnings

import pytest
import torch

import blockquant
import blockquant.functional as BF
from blockquant import QuantConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_all_names_exist_once():
    names = blockquant.__all__
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    missing = [n for n in names if not hasattr(blockquant, n)]
    assert not missing
    for name in ("ConversionWarning", "SavedMemory", "convert", "compress_saved_tensors", "track_saved", "tune"):
        assert name in names


def test_star_import_gives_the_public_names():
    ns = {}
    exec("from blockquant import *", ns)
    assert {n for n in ns if not n.startswith("__") or n == "__version__"} >= set(blockquant.__all__)
    assert issubclass(ns["ConversionWarning"], UserWarning)


def test_track_saved_returns_the_exported_report_type():
    x = torch.randn(8, 8, requires_grad=True) + 1.0
    with blockquant.track_saved() as mem:
        y = torch.sin(x)  # saves x: 64 float32 values
    assert isinstance(mem, blockquant.SavedMemory)
    assert mem.total_bytes == 8 * 8 * 4
    del y


def test_convert_is_the_function_and_conversion_the_module():
    assert isinstance(blockquant.convert, types.FunctionType)
    mod = importlib.import_module("blockquant.conversion")
    assert mod.convert is blockquant.convert
    assert mod.ConversionWarning is blockquant.ConversionWarning
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("blockquant.convert")


def test_conversion_warning_is_the_one_convert_raises():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blockquant.convert(model)
    assert any(issubclass(w.category, blockquant.ConversionWarning) and "Tanh" in str(w.message) for w in caught)


def _linear_saved_bytes(config):
    torch.manual_seed(0)
    x = torch.randn(64, 256, requires_grad=True) * 1.0  # not resident: a non-leaf
    w = torch.randn(32, 256, requires_grad=True)
    (packed,) = BF.linear(x, w, None, config=config).grad_fn.bq_state
    return packed.nbytes


def test_functional_ops_take_preset_names():
    assert _linear_saved_bytes("int2") == _linear_saved_bytes(QuantConfig.preset("int2"))
    assert _linear_saved_bytes("int2") < _linear_saved_bytes("int8")
    x = torch.randn(16, 32, requires_grad=True)
    for op in (lambda: BF.elu(x * 1.0, config="int4"), lambda: BF.gelu(x * 1.0, config="int4"),
               lambda: BF.layer_norm(x * 1.0, 32, config="int4")):
        assert op().shape == x.shape
    with pytest.raises(ValueError, match="unknown QuantConfig preset 'int3'"):
        BF.linear(x, torch.randn(4, 32), None, config="int3")


def test_compress_saved_tensors_takes_preset_names():
    seen = []
    h = torch.randn(64, 64, requires_grad=True) * 1.0
    with blockquant.compress_saved_tensors("int2", record=seen.append):
        h.exp().sum().backward()
    assert seen and seen[-1].config == QuantConfig.preset("int2")


def test_version_is_in_one_place_and_in_the_changelog():
    setup_py = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert not re.search(r'version\s*=\s*"', setup_py), "setup.py must read the version from blockquant/__init__.py"
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {blockquant.__version__}\n" in changelog
