"""QuantConfig validation and presets; optimal levels against ALGORITHM.md."""
import math

import pytest
import torch

import blockquant
from blockquant import ROW, QuantConfig, optimal_levels
from blockquant.levels import variance_reduction

# ALGORITHM.md section 3: optimal alpha and variance change vs uniform levels, INT2
ALPHA_TABLE = {4: 1.011, 16: 1.050, 64: 1.086, 128: 1.102, 256: 1.116, 1024: 1.139, 4096: 1.159}
REDUCTION_TABLE = {4: -0.001, 16: -0.018, 64: -0.063, 128: -0.093, 256: -0.127, 1024: -0.197, 4096: -0.266}


@pytest.mark.parametrize("field,value,allowed", [
    ("bits", 3, "(1, 2, 4, 8)"),
    ("bits", True, "(1, 2, 4, 8)"),
    ("block_size", 3, "[4, 65536]"),
    ("block_size", 65537, "[4, 65536]"),
    ("block_size", "col", "'row'"),
    ("block_size", 16.0, "[4, 65536]"),
    ("rp_ratio", 0, ">= 1"),
    ("levels", "lloyd", "('uniform', 'optimal')"),
    ("rounding", "up", "('stochastic', 'nearest')"),
    ("meta_dtype", torch.float64, "float16"),
    ("meta_dtype", "int8", "float16"),
])
def test_invalid_config_names_field_allowed_and_received(field, value, allowed):
    with pytest.raises(ValueError) as err:
        QuantConfig(**{field: value})
    msg = str(err.value)
    assert f"QuantConfig.{field}" in msg
    assert allowed in msg
    assert repr(value) in msg


def test_config_is_frozen_and_accepts_dtype_names():
    cfg = QuantConfig(meta_dtype="float16")
    assert cfg.meta_dtype is torch.float16
    with pytest.raises(Exception):
        cfg.bits = 4  # frozen
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown QuantConfig field"):
        QuantConfig.from_dict({"bitz": 2})


def test_block_size_bounds_accepted():
    assert QuantConfig(block_size=4).block_size == 4
    assert QuantConfig(block_size=65536).block_size == 65536
    assert QuantConfig(block_size=1000).block_size_for(7) == 1000
    assert QuantConfig(block_size=ROW).block_size_for(16) == 16


def test_presets():
    assert QuantConfig.preset("int1").bits == 1
    assert QuantConfig.preset("int8").bits == 8
    ex = QuantConfig.preset("exact")
    assert (ex.bits, ex.block_size, ex.levels, ex.rp_ratio, ex.meta_dtype) == (2, ROW, "uniform", 8, torch.bfloat16)
    ie = QuantConfig.preset("iexact")
    assert (ie.bits, ie.block_size, ie.levels, ie.rp_ratio) == (2, 1024, "optimal", 8)
    assert "default" in QuantConfig.preset_names()
    with pytest.raises(ValueError, match="unknown QuantConfig preset 'int3'"):
        QuantConfig.preset("int3")


def test_one_default_everywhere():
    """QuantConfig(), the "default" preset and every ``config=None`` entry point are one config: INT4, G1024."""
    import blockquant
    from blockquant.nn.basic import QLinear

    default = QuantConfig()
    assert (default.bits, default.block_size, default.rp_ratio, default.levels, default.meta_dtype) == (
        4, 1024, 1, "uniform", torch.bfloat16)
    assert QuantConfig.preset("default") == default
    assert QuantConfig.resolve(None, "test") == default
    model = blockquant.convert(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    assert model[0].bq_config == default
    assert QLinear.from_module(torch.nn.Linear(4, 4)).bq_config == default
    assert blockquant.quantize(torch.randn(64)).bits == 4


@pytest.mark.parametrize("d", sorted(ALPHA_TABLE))
def test_int2_optimal_alpha_matches_table(d):
    lv = optimal_levels(2, d)
    assert lv[0] == 0.0 and lv[3] == 3.0
    assert abs(lv[1] - ALPHA_TABLE[d]) < 0.005
    assert abs(lv[2] - (3.0 - lv[1])) < 1e-9


@pytest.mark.parametrize("d", sorted(REDUCTION_TABLE))
def test_int2_variance_reduction_matches_table(d):
    assert abs(variance_reduction(2, d) - REDUCTION_TABLE[d]) < 0.002


def test_ifit_closed_form_agrees():
    """i-Exact's run-time fit is within 0.005 of our optimum up to d = 4096."""
    for d in (16, 64, 256, 1024, 4096):
        fit = 0.83162565 + 0.02993653 * math.log(116.05528511 * d) + 1.225e-5 * d - 0.00171617 * math.sqrt(d)
        assert abs(optimal_levels(2, d)[1] - fit) < 0.005


@pytest.mark.parametrize("bits", [4, 8])
def test_optimal_levels_other_bit_widths(bits):
    lv = torch.tensor(optimal_levels(bits, 1024))
    top = 2 ** bits - 1
    assert lv.numel() == 2 ** bits
    assert lv[0] == 0 and lv[-1] == top
    assert torch.all(lv[1:] > lv[:-1])
    assert torch.allclose(lv + lv.flip(0), torch.full_like(lv, top), atol=1e-9)  # symmetric
    assert variance_reduction(bits, 1024) < -0.2  # clearly better than uniform under the model


@pytest.mark.parametrize("d", [1, 2, 3])
def test_optimal_levels_tiny_blocks_are_finite(d):
    lv = optimal_levels(2, d)
    assert all(math.isfinite(v) for v in lv) and lv[0] < lv[1] < lv[2] < lv[3]


def test_optimal_levels_bad_input():
    assert optimal_levels(1, 64) == (0.0, 1.0)
    with pytest.raises(ValueError, match="bits must be one of"):
        optimal_levels(3, 64)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        optimal_levels(2, 0)


def test_public_names():
    for name in ("QuantConfig", "quantize", "PackedTensor", "optimal_levels"):
        assert hasattr(blockquant, name)
