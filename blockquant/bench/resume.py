"""Keep what an interrupted ``blockquant bench --out DIR`` finished, and reuse it: ``--resume``.

The configurations train together, seed by seed, in interleaved rounds (:mod:`blockquant.bench.rounds`),
so the unit that finishes is one seed of every configuration still training. While it runs, the
benchmark rewrites ``DIR/results.json`` (and ``results.csv``) atomically (see
:func:`blockquant.bench.report.write_results`) after each seed's rounds and after each configuration
that did not fit its first-step measurements, with ``meta["complete"]`` False: each configuration's
record holds its first-step measurements, the runs of the seeds it finished and ``seeds_done``;
``meta["pending"]`` names the configurations with something left and ``meta["pending_seeds"]`` their
seeds still to train. A run stopped by Ctrl-C, a kill or a crash thus loses at most the seed in
progress (and the first-step measurements of configurations that had not finished a seed yet). The
same command with ``--resume`` reuses, for each configuration that is unchanged, its first-step
measurements (gradient error, activation bytes, step peak) and finished seeds, and trains only the
missing seeds; a configuration with every seed done, or that did not fit, is neither built, measured nor
trained again (summaries and time ratios are computed over the final records). Reusing
needs the same settings: the dataset (as described in ``meta["dataset"]``, which includes its size and
generator), the model's shape, the training options (seeds included), the device, the backend override,
the memory limit, the mini-batch options, and the blockquant and torch versions; a results file written
with other settings is an error, never mixed in.
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


def seeds_left(record: Dict[str, Any], seeds: Sequence[int]) -> List[int]:
    """The seeds of ``seeds`` that ``record`` has not trained yet (none for a row that did not fit)."""
    if record.get("status"):
        return []
    done = {run.get("seed") for run in record.get("runs") or []}
    return [s for s in seeds if s not in done]


def progress_meta(meta: Dict[str, Any], records: List[Dict[str, Any]], configs: Sequence[Any]) -> Dict[str, Any]:
    """``meta`` of a results.json written while the run goes on: which configurations and seeds are still to run."""
    seeds = list(meta.get("seeds") or [])
    by_name = {r["config"]: r for r in records}
    left = {c.name: seeds_left(by_name[c.name], seeds) if c.name in by_name else seeds for c in configs}
    left = {name: s for name, s in left.items() if s}
    return {**meta, "complete": False, "pending": list(left), "pending_seeds": left}


def finished_records(out_dir: str, meta: Dict[str, Any], configs: Sequence[Any]) -> Dict[str, Dict[str, Any]]:
    """The records of ``out_dir/results.json`` that a run with ``meta`` and ``configs`` can reuse, by name:
    finished ones and partly trained ones (see :func:`seeds_left`).

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
        finished = rec.get("status") or rec.get("runs")  # did not fit, or trained at least one seed
        if want is not None and finished and all(rec.get(k) == v for k, v in want.items()):
            reuse[rec["config"]] = rec
    return reuse
