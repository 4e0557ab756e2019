"""A per-layer compression plan: which :class:`QuantConfig` each named module gets.

A :class:`Plan` is a read-only mapping from qualified module names to a
``QuantConfig`` (or ``None``: leave that module at full precision), plus a
``default`` for every module it does not name. Because it is a mapping,
``blockquant.convert(model, plan)`` applies it directly; it is what
:func:`blockquant.tune` returns and what ``blockquant tune`` writes as JSON::

    {"format": "blockquant.plan/1",
     "default": {"bits": 4, "block_size": 1024, ...} | null,
     "layers": {"convs.1": {"bits": 2, "block_size": 4096, "rp_ratio": 8, ...}, ...},
     "info": {...free-form provenance...}}

``blockquant.convert(model, "plan.json")``, ``Plan.from_json("plan.json")`` and
``blockquant bench --configs plan.json`` all read that file.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Iterator, Mapping, Optional, Union

from .config import QuantConfig

PLAN_FORMAT = "blockquant.plan/1"


def _config_or_none(value: Any, where: str) -> Optional[QuantConfig]:
    if value is None or isinstance(value, QuantConfig):
        return value
    if isinstance(value, str):
        return QuantConfig.preset(value)
    if isinstance(value, Mapping):
        return QuantConfig.from_dict(value)
    raise TypeError(f"Plan: {where} must be a QuantConfig, a QuantConfig dict, a preset name or None; "
                    f"got {type(value).__name__}")


class Plan(Mapping[str, Optional[QuantConfig]]):
    """Per-module configs for :func:`blockquant.convert`.

    Args:
        layers: qualified module name -> ``QuantConfig`` (or ``None`` to keep
            that module and its subtree at full precision).
        default: config for every module not named in ``layers`` (modules
            whose saved bytes do not depend on the config, such as ReLU's
            1-bit mask or Dropout's seed, still get converted with it);
            ``None`` leaves them all at full precision.
        info: free-form provenance (dataset, budget, measured bytes...),
            kept in the JSON and ignored by :func:`convert`.

    As a mapping it reads ``{"": default, **layers}``: the root name ``""``
    carries the default, which is how :func:`convert` spells "everything else".
    """

    def __init__(self, layers: Mapping[str, Any], default: Any = "default",
                 info: Optional[Mapping[str, Any]] = None):
        if not isinstance(layers, Mapping):
            raise TypeError(f"Plan: layers must be a mapping from module names to QuantConfig; "
                            f"got {type(layers).__name__}")
        self.layers: Dict[str, Optional[QuantConfig]] = {}
        for name, value in layers.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"Plan: layer names must be non-empty qualified module names; got {name!r}")
            self.layers[name] = _config_or_none(value, f"layers[{name!r}]")
        self.default: Optional[QuantConfig] = _config_or_none(default, "default")
        self.info: Dict[str, Any] = dict(info or {})

    # ----------------------------------------------------------- mapping view
    def _as_mapping(self) -> Dict[str, Optional[QuantConfig]]:
        return {"": self.default, **self.layers}

    def __getitem__(self, key: str) -> Optional[QuantConfig]:
        return self._as_mapping()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._as_mapping())

    def __len__(self) -> int:
        return len(self.layers) + 1

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return self.layers == other.layers and self.default == other.default

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {c.short() if c else None}" for n, c in self.layers.items())
        d = self.default.short() if self.default else None
        return f"Plan({{{inner}}}, default={d})"

    @classmethod
    def uniform(cls, config: Optional[QuantConfig]) -> "Plan":
        """Every module at ``config`` (``None``: no compression at all)."""
        return cls({}, default=config)

    # ------------------------------------------------------------- JSON
    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "default": self.default.to_dict() if self.default is not None else None,
            "layers": {n: (c.to_dict() if c is not None else None) for n, c in self.layers.items()},
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        if not isinstance(d, Mapping) or "layers" not in d:
            raise ValueError(f"not a blockquant plan: expected a dict with 'format': {PLAN_FORMAT!r}, 'layers' and "
                             f"'default'; got keys {sorted(d) if isinstance(d, Mapping) else type(d).__name__}")
        fmt = d.get("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise ValueError(f"unsupported plan format {fmt!r}; expected {PLAN_FORMAT!r}")
        return cls(d["layers"], default=d.get("default"), info=d.get("info"))

    def to_json(self, path: Optional[str] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str) -> "Plan":
        """Read a plan from a JSON file path (or from the JSON text itself)."""
        if path_or_text.lstrip().startswith("{"):
            return cls.from_dict(json.loads(path_or_text))
        with open(path_or_text) as f:
            return cls.from_dict(json.load(f))


def is_plan_dict(d: Any) -> bool:
    """Whether a parsed JSON document is a plan (rather than a single QuantConfig)."""
    return isinstance(d, Mapping) and "layers" in d


def load_config_or_plan(path: str) -> Union[QuantConfig, Plan]:
    """A JSON file holding either one QuantConfig or a Plan."""
    with open(path) as f:
        d = json.load(f)
    return Plan.from_dict(d) if is_plan_dict(d) else QuantConfig.from_dict(d)
