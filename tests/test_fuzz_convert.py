"""`blockquant.convert` fuzzed: random models from PyG's model zoo and torch.nn pieces, converted with
random configs, checked against the unconverted model by the documented contract.

The examples that found defects are pinned below as plain tests.
"""
import warnings

import torch
from torch_geometric.nn.models import GIN, GraphSAGE

import blockquant
from blockquant.nn import CompressedModule


def _quiet_convert(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blockquant.ConversionWarning)
        return blockquant.convert(model, config)


def _wrappers(model):
    return {n: m.bq_config.short() for n, m in model.named_modules() if isinstance(m, CompressedModule)}


def test_converting_again_leaves_no_wrapper_of_the_previous_config_below_a_rebuilt_or_excluded_one():
    """Found by the fuzz test (a model converted twice with different configs): a wrapper that runs
    its own children (PyG's BatchNorm wraps a BatchNorm1d; GIN its MLP) was unwrapped or rebuilt
    without them, so they kept the previous config: converting to int8 left PyG BatchNorm's inner
    module at int2, and ``{"convs.0": None}`` left GIN's MLP compressed."""
    sage = GraphSAGE(8, 8, num_layers=2, out_channels=3, norm="batch_norm")
    _quiet_convert(sage, "int2")
    _quiet_convert(sage, "int8")
    assert set(_wrappers(sage).values()) == {"int8/G1024"}, _wrappers(sage)
    _quiet_convert(sage, {"norms.0": None})  # a name applies to the subtree: exact, inner module included
    assert not any(n.startswith("norms.0") for n in _wrappers(sage)), _wrappers(sage)
    assert type(sage.norms[0].module) is torch.nn.BatchNorm1d

    gin = GIN(8, 8, num_layers=2, out_channels=3)
    _quiet_convert(gin, "int2")
    assert any(n.startswith("convs.0.nn.") for n in _wrappers(gin))
    _quiet_convert(gin, {"convs.0": None})
    assert not any(n.startswith("convs.0") for n in _wrappers(gin)), _wrappers(gin)
    _quiet_convert(gin, "int4")
    assert set(_wrappers(gin).values()) == {"int4/G1024"}, _wrappers(gin)
