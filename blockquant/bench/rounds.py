"""Timing configurations so that a busy machine cannot fake the comparison.

On a shared machine, timing each configuration in its own block of epochs compares
configurations that ran under different loads. ``blockquant bench`` therefore trains them in
interleaved rounds: every configuration runs one epoch per round (the order rotates from round to
round, so none always runs first), each keeping its own random-number stream, so results equal
those of training the configurations one after another. Each step records its wall time and the
CPU time of the process (``time.process_time``: what the step computed, all threads together,
far less sensitive to other processes than wall time). A configuration's time is compared with
the reference's (plain PyG in its best form: ``fp32-sparse`` when it ran, else ``fp32``) *in the
same round*; the minimum and median of those per-round ratios are the figures to quote, with the
load average of the rounds. The first epoch of every seed is a warm-up (graph caches, the codec's
build) and is not counted when there are more.

The rounds of one seed always run within one process, and every run records the rounds it trained in
(``rounds_id``) and their load average (``load_avg_rounds``). A run of an interrupted benchmark that
``--resume`` reuses therefore keeps valid ratios: they pair steps of the same rounds, and the ratios are
computed over the final records, whichever process trained each seed. A run whose rounds the reference
did not train in (a configuration changed or added before ``--resume``, the reference reused) has no
ratio for that seed rather than one of steps that ran under other loads.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

#: reference configurations of the time ratios, in order of preference: plain PyG in its best form first
REFERENCES = ("fp32-sparse", "fp32")


class StepClock:
    """Wall and process CPU time of the training steps of one run (one configuration and seed)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.wall: List[float] = []
        self.cpu: List[float] = []

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.wall.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)


class RngStreams:
    """One random-number stream per contender (the CPU generator, and the CUDA one on a GPU), so that
    interleaving their epochs leaves every run exactly as if it had run alone."""

    def __init__(self, device: torch.device):
        self.device = device
        self.states: Dict[str, tuple] = {}

    def start(self, name: str, seed: int) -> None:
        with self._saved():
            torch.manual_seed(seed)
            self.states[name] = self._get()

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        with self._saved():
            self._set(self.states[name])
            try:
                yield
            finally:
                self.states[name] = self._get()

    @contextlib.contextmanager
    def _saved(self):
        outer = self._get()
        try:
            yield
        finally:
            self._set(outer)

    def _get(self):
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set(self, state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)


def interleaved(names: Sequence[str], rounds: int, run: Callable[[str, int], None],
                on_error: Callable[[str, int, BaseException], bool]) -> List[Dict[str, Any]]:
    """Call ``run(name, round)`` for every name in every round, rotating the order; returns the load
    average before and after each round. A name whose ``run`` raises is dropped from later rounds when
    ``on_error(name, round, error)`` returns True (the error is re-raised otherwise)."""
    active = list(names)
    loads = []
    for r in range(rounds):
        order = active[r % len(active):] + active[:r % len(active)] if active else []
        before = _load()
        for name in order:
            try:
                run(name, r)
            except Exception as e:  # noqa: BLE001 - the caller decides (e.g. "did not fit" under a limit)
                if not on_error(name, r, e):
                    raise
                active.remove(name)
        loads.append({"round": r, "order": order, "load_avg_before": before, "load_avg_after": _load()})
    return loads


def _load() -> Optional[float]:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def reference_of(names: Sequence[str]) -> Optional[str]:
    """The configuration time ratios refer to: plain PyG's best form among those that ran."""
    return next((r for r in REFERENCES if r in names), names[0] if names else None)


def timed_steps(run: Dict[str, Any], key: str) -> List[float]:
    """A run's step times (``key``: ``epoch_times_s`` or ``epoch_cpu_s``) without the warm-up epoch."""
    times = run.get(key) or []
    return times[1:] if len(times) > 1 else times


def add_time_ratios(records: List[Dict[str, Any]], loads: Optional[List[Dict[str, Any]]] = None) -> None:
    """Each trained record's step times (wall and CPU, warm-up excluded: min and median) and their
    per-round ratios to the reference's step in the same round (min and median over the rounds), pairing
    a run with the reference's run of the same seed and rounds (``seed``, ``rounds_id``). The load average
    range covers ``loads`` (:func:`interleaved`'s) and every run's ``load_avg_rounds``."""
    trained = {r["config"]: r for r in records if "status" not in r and r.get("runs")}
    ref_name = reference_of(list(trained))
    ref = trained.get(ref_name)
    ref_runs = {_rounds_of(run): run for run in ref["runs"]} if ref is not None else {}
    seen = [x for x in (lo.get(k) for lo in loads or () for k in ("load_avg_before", "load_avg_after"))
            if x is not None]
    seen += [x for rec in trained.values() for run in rec["runs"] for x in run.get("load_avg_rounds") or ()
             if x is not None]
    for rec in trained.values():
        rec["time_reference"] = ref_name
        rec["load_avg_rounds"] = [min(seen), max(seen)] if seen else None
        for key, tag in (("epoch_times_s", "time"), ("epoch_cpu_s", "cpu")):
            mine = [t for run in rec["runs"] for t in timed_steps(run, key)]
            rec[f"epoch_{tag}_min_s"] = min(mine) if mine else None
            rec[f"epoch_{tag}_median_s"] = statistics.median(mine) if mine else None
            ratios = []
            for run in rec["runs"]:
                ref_run = ref_runs.get(_rounds_of(run))
                if ref_run is not None:
                    ratios += [a / b for a, b in zip(timed_steps(run, key), timed_steps(ref_run, key)) if b > 0]
            rec[f"{tag}_ratio_ref_min"] = min(ratios) if ratios else None
            rec[f"{tag}_ratio_ref_median"] = statistics.median(ratios) if ratios else None


def _rounds_of(run: Dict[str, Any]) -> tuple:
    return run.get("seed"), run.get("rounds_id")
