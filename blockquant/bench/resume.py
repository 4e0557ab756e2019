"""Keep what an interrupted ``blockquant bench --out DIR`` finished, and reuse it: ``--resume``.

While it runs, the benchmark rewrites ``DIR/results.json`` (and ``results.csv``)
after every configuration it finishes, atomically (see
:func:`blockquant.bench.report.write_results`), with ``meta["complete"]`` False
and the configurations still to run in ``meta["pending"]``. A run stopped by
Ctrl-C, a kill or a crash leaves the configurations it finished there; the
same command with ``--resume`` reuses each of them whose configuration is
unchanged and runs only the others. Reusing needs the same settings: the
dataset (as described in ``meta["dataset"]``, which includes its size and
generator), the model's shape, the training options, the device, the backend
override, the memory limit, the mini-batch options, and the blockquant and
torch versions; a results file written with other settings is an error, never
mixed in.
"""
from __future__ import annotations

import json
import os.path as osp
from typing import Any, Dict, List, Sequence

from .errors import BenchError

#: meta fields a resumed run must share with the run it continues
SETTINGS = ("dataset", "model", "hidden", "layers", "lr", "dropout", "epochs", "seeds", "device", "backend_env",
            "memory_limit_gib", "loader", "batch_size")
RESULTS = "results.json"


def _normal(value: Any) -> Any:
    """``value`` as it reads back from results.json (tuples become lists, dtypes strings)."""
    return json.loads(json.dumps(value, default=str))


def settings(meta: Dict[str, Any]) -> Dict[str, Any]:
    versions = meta.get("versions") or {}
    return _normal({**{k: meta.get(k) for k in SETTINGS}, "blockquant": versions.get("blockquant"),
                    "torch": versions.get("torch")})


def progress_meta(meta: Dict[str, Any], records: List[Dict[str, Any]], configs: Sequence[Any]) -> Dict[str, Any]:
    """``meta`` of a results.json written while the run goes on: which configurations are still to run."""
    finished = {r["config"] for r in records}
    return {**meta, "complete": False, "pending": [c.name for c in configs if c.name not in finished]}


def finished_records(out_dir: str, meta: Dict[str, Any], configs: Sequence[Any]) -> Dict[str, Dict[str, Any]]:
    """The records of ``out_dir/results.json`` that a run with ``meta`` and ``configs`` can reuse, by name.

    Raises :class:`BenchError` when that file was written with other settings or is not a results file.
    """
    path = osp.join(out_dir, RESULTS)
    if not osp.exists(path):
        return {}
    try:
        with open(path) as f:
            doc = json.load(f)
        old, records = doc["meta"], doc["records"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchError(f"--resume: {path} is not a results file of blockquant bench ({e}); pass another --out "
                         f"or remove it") from None
    before, now = settings(old), settings(meta)
    changed = [f"{k} {before.get(k)!r} -> {now[k]!r}" for k in now if before.get(k) != now[k]]
    if changed:
        raise BenchError(f"--resume: {path} was written with other settings ({'; '.join(changed)[:400]}); "
                         f"run without --resume to recompute every configuration, or pass another --out")
    wanted = {c.name: {f"config_{k}": v for k, v in _normal(c.describe()).items() if k != "name"}
              for c in configs}
    reuse = {}
    for rec in records:
        want = wanted.get(rec.get("config"))
        if want is not None and all(rec.get(k) == v for k, v in want.items()):
            reuse[rec["config"]] = rec
    return reuse
