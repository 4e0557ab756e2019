"""Quantization settings: one frozen, validated dataclass and its named presets."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Mapping, Union

import torch

ROW = "row"
"""Sentinel for ``block_size``: one block per row (last dimension), EXACT's scheme."""

_BITS = (1, 2, 4, 8)
_LEVELS = ("uniform", "optimal")
_ROUNDING = ("stochastic", "nearest")
_META_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
MIN_BLOCK_SIZE = 4
MAX_BLOCK_SIZE = 65536


def _bad(field: str, allowed: str, got: Any) -> ValueError:
    return ValueError(f"QuantConfig.{field} must be {allowed}; got {got!r}")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a saved activation is compressed.

    ``QuantConfig()`` is the ``"default"`` preset, what :func:`blockquant.convert`, the functional ops and
    :func:`blockquant.quantize` use when given no config: INT4, blocks of 1024 elements, uniform levels, no
    projection, bfloat16 metadata (chosen from measurements; docs/method.md, "Presets: what each costs").

    Args:
        bits: code width per element, one of 1, 2, 4, 8.
        block_size: elements per quantization block (an integer from 4 to
            65536, independent of any kernel launch shape), or ``"row"`` for
            one block per row of the (projected) tensor, as EXACT does.
        rp_ratio: random-projection ratio for linear-layer inputs; the last
            dimension ``D`` is projected to ``ceil(D / rp_ratio)`` columns by
            a seeded Rademacher matrix before quantization. ``1`` disables it.
        levels: ``"uniform"`` levels, or ``"optimal"`` levels that minimise
            the rounding variance under i-Exact's clipped-normal model.
        rounding: ``"stochastic"`` (unbiased) or ``"nearest"`` (deterministic,
            biased; for tests and ablations).
        meta_dtype: dtype of the per-block minimum and step (float16,
            bfloat16 or float32). Accepts a ``torch.dtype`` or its name.
    """

    bits: int = 4
    block_size: Union[int, str] = 1024
    rp_ratio: int = 1
    levels: str = "uniform"
    rounding: str = "stochastic"
    meta_dtype: Union[torch.dtype, str] = torch.bfloat16

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in _BITS:
            raise _bad("bits", f"one of {_BITS}", self.bits)
        bs = self.block_size
        if isinstance(bs, str):
            if bs != ROW:
                raise _bad("block_size", f"an integer in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}] or {ROW!r}", bs)
        elif isinstance(bs, bool) or not isinstance(bs, int) or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE:
            raise _bad("block_size", f"an integer in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}] or {ROW!r}", bs)
        r = self.rp_ratio
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise _bad("rp_ratio", "an integer >= 1 (1 disables random projection)", r)
        if self.levels not in _LEVELS:
            raise _bad("levels", f"one of {_LEVELS}", self.levels)
        if self.rounding not in _ROUNDING:
            raise _bad("rounding", f"one of {_ROUNDING}", self.rounding)
        md = self.meta_dtype
        if isinstance(md, str):
            if md.replace("torch.", "") not in _META_DTYPES:
                raise _bad("meta_dtype", f"one of {tuple(_META_DTYPES)}", md)
            object.__setattr__(self, "meta_dtype", _META_DTYPES[md.replace("torch.", "")])
        elif md not in _META_DTYPES.values():
            raise _bad("meta_dtype", f"one of {tuple(_META_DTYPES)}", md)

    # ------------------------------------------------------------------ helpers
    def block_size_for(self, row_length: int) -> int:
        """Block size actually used for a tensor whose last dimension is ``row_length``."""
        if self.block_size == ROW:
            return max(int(row_length), 1)
        return int(self.block_size)

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["meta_dtype"] = str(self.meta_dtype).replace("torch.", "")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        if "layers" in d and "bits" not in d:
            raise ValueError("this is a per-layer plan (from blockquant tune), not one QuantConfig; load it with "
                             "blockquant.Plan.from_dict / Plan.from_json, or pass the file to blockquant.convert")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s) {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, path: str) -> "QuantConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def short(self) -> str:
        """Compact human-readable description, e.g. ``int2/G1024/rp8/optimal``."""
        g = "row" if self.block_size == ROW else f"G{self.block_size}"
        s = f"int{self.bits}/{g}"
        if self.rp_ratio > 1:
            s += f"/rp{self.rp_ratio}"
        if self.levels != "uniform":
            s += f"/{self.levels}"
        if self.rounding != "stochastic":
            s += f"/{self.rounding}"
        return s

    @staticmethod
    def preset_names() -> tuple:
        return tuple(_PRESETS)

    @classmethod
    def resolve(cls, config: Union["QuantConfig", str, None], where: str) -> "QuantConfig":
        """What every ``config=`` argument accepts: a :class:`QuantConfig`, a preset name, or ``None`` for the
        ``"default"`` preset. ``where`` names the caller in the error for anything else."""
        if config is None:
            return _PRESETS["default"]
        if isinstance(config, str):
            return cls.preset(config)
        if not isinstance(config, QuantConfig):
            raise TypeError(f"{where} expects config to be a QuantConfig, a preset name {tuple(_PRESETS)} or None; "
                            f"got {type(config).__name__}")
        return config

    @classmethod
    def preset(cls, name: str) -> "QuantConfig":
        """Named recipes.

        ``int1`` .. ``int8``: that bit width, block 1024, no projection.
        ``exact``: EXACT's settings (INT2, one block per projected row,
        uniform levels, projection ratio 8, bf16 metadata).
        ``iexact``: i-Exact's best (INT2, ratio 8, block 1024, optimal levels).
        ``default``: ``QuantConfig()``, what :func:`blockquant.convert` uses.
        """
        try:
            return _PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown QuantConfig preset {name!r}; expected one of {tuple(_PRESETS)}") from None


_PRESETS: Dict[str, QuantConfig] = {
    "int1": QuantConfig(bits=1),
    "int2": QuantConfig(bits=2),
    "int4": QuantConfig(bits=4),
    "int8": QuantConfig(bits=8),
    "exact": QuantConfig(bits=2, block_size=ROW, rp_ratio=8, levels="uniform", meta_dtype=torch.bfloat16),
    "iexact": QuantConfig(bits=2, block_size=1024, rp_ratio=8, levels="optimal", meta_dtype=torch.bfloat16),
}
# The field defaults above are the default: one definition for QuantConfig(), convert(), the functional ops
# and the benchmark's "default" config.
_PRESETS["default"] = QuantConfig()
