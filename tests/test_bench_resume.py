"""`blockquant bench` interrupted: the unit that finishes is one seed of the interleaved rounds, so an
interruption loses at most the seed in progress; `--resume` reuses the first-step measurements and finished
seeds and trains only the missing ones, and results.json is never half-written."""
import copy
import json
import os

import pytest

from blockquant.bench import memlimit, minibatch, report, runner
from blockquant.bench.datasets import load_dataset
from blockquant.cli import main

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")

ARGS = ["bench", "--dataset", "synthetic:tiny", "--epochs", "2", "--seeds", "2", "--hidden", "8", "--layers", "2",
        "--configs", "fp32,int2,int4", "--quiet"]
NAMES = ["fp32", "int2", "int4"]
MINI_BATCH = ["--batch-size", "200"]  # RandomNodeLoader: 3 steps per epoch on synthetic:tiny


def _doc(out):
    with open(out / "results.json") as f:
        return json.load(f)


@pytest.fixture(autouse=True)
def plots(monkeypatch):
    """The folders plots were written to (drawing them takes seconds: here nothing is drawn)."""
    written = []
    monkeypatch.setattr(report, "write_plots", lambda out_dir, records, meta: written.append(out_dir) or [])
    return written


@pytest.fixture
def builds(monkeypatch):
    """Counts Trainer.build calls per configuration name; ``builds["interrupt_at"]`` raises Ctrl-C's
    KeyboardInterrupt when that configuration is built."""
    real = runner.Trainer.build
    counts = {}

    def build(self, cfg, seed):
        counts[cfg.name] = counts.get(cfg.name, 0) + 1
        if cfg.name == counts.get("interrupt_at"):
            raise KeyboardInterrupt
        return real(self, cfg, seed)

    monkeypatch.setattr(runner.Trainer, "build", build)
    return counts


@pytest.fixture
def epochs(monkeypatch):
    """Records the (seed, epoch) of every training epoch, full batch and mini-batch; ``epochs.interrupt_at``
    raises Ctrl-C's KeyboardInterrupt at the first epoch with that (seed, epoch)."""

    class Epochs(list):
        interrupt_at = None

    calls = Epochs()
    for cls in (runner.TrainingRun, minibatch.MiniBatchRun):
        def epoch(self, e, _real=cls.epoch):
            if (self.seed, e) == calls.interrupt_at:
                calls.interrupt_at = None
                raise KeyboardInterrupt
            calls.append((self.seed, e))
            return _real(self, e)

        monkeypatch.setattr(cls, "epoch", epoch)
    return calls


@pytest.mark.parametrize("extra", [[], MINI_BATCH], ids=["full-batch", "mini-batch"])
def test_interrupted_in_the_second_seed_keeps_the_first_and_resume_trains_only_the_second(
        tmp_path, builds, epochs, plots, capsys, extra):
    args = [*ARGS, *extra]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0  # the uninterrupted run, to compare with
    whole = {r["config"]: r for r in _doc(tmp_path / "whole")["records"]}

    out = tmp_path / "res"
    epochs.clear()
    epochs.interrupt_at = (1, 1)  # seed 1 (the second of 0, 1), its second round: seed 0 is finished
    assert main([*args, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "results.json" in err
    assert (1, 0) in epochs  # seed 1 had begun: its first round is lost
    first = _doc(out)
    assert first["meta"]["complete"] is False and first["meta"]["pending"] == NAMES
    assert first["meta"]["pending_seeds"] == {name: [1] for name in NAMES}
    assert [r["config"] for r in first["records"]] == NAMES
    for rec in first["records"]:
        assert rec["seeds_done"] == [0] and [run["seed"] for run in rec["runs"]] == [0]
        # seed 0 and the first-step measurements as the uninterrupted run has them
        assert rec["runs"][0]["loss"] == whole[rec["config"]]["runs"][0]["loss"]
        assert rec["grad_rel_error"] == whole[rec["config"]]["grad_rel_error"]
    assert sorted(os.listdir(out)) == ["results.csv", "results.json"]  # no temporary left
    assert plots == [str(tmp_path / "whole")]  # plots only when complete

    builds.clear()
    epochs.clear()
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert "reusing fp32 (seeds 0 of 2), int2 (seeds 0 of 2), int4 (seeds 0 of 2)" in capsys.readouterr().out
    # each built once, to train seed 1: neither measured again nor fp32 built for reference gradients
    assert builds == {"fp32": 1, "int2": 1, "int4": 1}
    assert sorted(epochs) == sorted([(1, 0), (1, 1)] * 3)  # only seed 1, both rounds, every configuration
    final = _doc(out)
    assert final["meta"]["complete"] is True and final["meta"]["pending"] == []
    recs = {r["config"]: r for r in final["records"]}
    assert list(recs) == NAMES
    for name, rec in recs.items():
        assert set(rec) == set(whole[name]), name  # the structure of an uninterrupted run
        assert rec["seeds_done"] == rec["seeds"] == [0, 1]
        assert rec["runs"][0] == first["records"][NAMES.index(name)]["runs"][0]  # reused as recorded
        for key in ("loss", "val", "test", "seed"):
            assert [run[key] for run in rec["runs"]] == [run[key] for run in whole[name]["runs"]], (name, key)
        for key in ("activation_bytes", "grad_rel_error", "val_mean", "test_mean", "curve_loss_mean"):
            assert rec[key] == whole[name][key], (name, key)
        # each seed's ratios pair the rounds of that seed, which all configurations trained together
        assert [run["rounds_id"] for run in rec["runs"]] == [run["rounds_id"] for run in recs["fp32"]["runs"]]
        assert rec["time_reference"] == "fp32" and rec["time_ratio_ref_median"] is not None
    assert recs["fp32"]["time_ratio_ref_min"] == 1.0 and recs["int2"]["memory_ratio_fp32"] < 1.0
    assert plots[-1] == str(out)

    builds.clear()  # a finished run resumed: nothing to do
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert builds == {} and [r["config"] for r in _doc(out)["records"]] == NAMES


def test_interrupted_in_first_step_measurements_keeps_the_rows_that_did_not_fit(tmp_path, builds, monkeypatch,
                                                                                capsys):
    """The measurement loop stays interruptible; a row that did not fit is written as soon as it failed."""
    monkeypatch.setattr(memlimit, "apply_memory_limit", lambda gib: 0)  # the limit is only recorded
    real = runner.Trainer.step_peak

    def step_peak(self, model):
        if any(getattr(getattr(m, "bq_config", None), "bits", None) == 2 for m in model.modules()):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes.")
        return real(self, model)

    monkeypatch.setattr(runner.Trainer, "step_peak", step_peak)
    args = [*ARGS, "--memory-limit-gib", "64", "--out", str(tmp_path)]
    builds["interrupt_at"] = "int4"
    assert main(args) == 130
    first = _doc(tmp_path)
    assert [(r["config"], r["status"], r["failed_stage"]) for r in first["records"]] == [
        ("int2", "did not fit", "first-step measurements")]
    assert first["meta"]["pending"] == ["fp32", "int4"]
    assert first["meta"]["pending_seeds"] == {"fp32": [0, 1], "int4": [0, 1]}
    capsys.readouterr()

    builds.clear()
    assert main([*args, "--resume"]) == 0
    assert "reusing int2\n" in capsys.readouterr().out
    assert "int2" not in builds and builds["int4"] == 3  # int4: measured, then trained for each seed
    recs = {r["config"]: r for r in _doc(tmp_path)["records"]}
    kept = {k: v for k, v in first["records"][0].items() if k != "command"}  # reused as it was
    assert list(recs) == NAMES and {k: recs["int2"][k] for k in kept} == kept
    assert recs["fp32"]["seeds_done"] == recs["int4"]["seeds_done"] == [0, 1]


def test_stopped_after_the_last_seed_resume_only_summarizes(tmp_path, builds, monkeypatch, capsys):
    """Every seed done but the final write not reached: --resume trains nothing and writes the summaries."""
    real = report.format_table

    def interrupted(records, meta):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "format_table", interrupted)
    args = [*ARGS, "--epochs", "1", "--out", str(tmp_path)]
    assert main(args) == 130
    first = _doc(tmp_path)
    assert first["meta"]["complete"] is False and first["meta"]["pending"] == []
    assert all(r["seeds_done"] == [0, 1] and "val_mean" not in r for r in first["records"])
    monkeypatch.setattr(report, "format_table", real)
    builds.clear()
    assert main([*args, "--resume"]) == 0
    assert "reusing fp32, int2, int4\n" in capsys.readouterr().out and builds == {}
    final = _doc(tmp_path)
    assert final["meta"]["complete"] is True
    for rec, before in zip(final["records"], first["records"]):
        assert rec["runs"] == before["runs"] and rec["val_mean"] > 0 and rec["time_ratio_ref_median"] is not None


def test_a_config_that_stops_fitting_in_a_later_seed_becomes_its_row(monkeypatch):
    """on_record gets every configuration after each seed; one that runs out of memory under a limit in seed 1
    becomes its did-not-fit row: its first-step measurements, without the runs of a half-trained config."""
    real = runner.TrainingRun.epoch

    def epoch(self, e):
        if self.seed == 1 and any(hasattr(m, "bq_config") for m in self.model.modules()):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3221225472 bytes.")
        return real(self, e)

    monkeypatch.setattr(runner.TrainingRun, "epoch", epoch)
    opts = runner.BenchOptions(dataset="synthetic:tiny", configs=("fp32", "int2"), epochs=1, seeds=(0, 1), hidden=8,
                               layers=2, quiet=True, memory_limit_gib=64.0)
    seen = []
    recs = runner.run_benchmark(load_dataset("synthetic:tiny"), opts, runner.resolve_configs(opts.configs),
                                on_record=lambda records: seen.append(copy.deepcopy(records)))
    assert [[(r["config"], r.get("seeds_done"), r.get("failed_stage")) for r in records] for records in seen] == [
        [("fp32", [0], None), ("int2", [0], None)],  # after seed 0
        [("fp32", [0, 1], None), ("int2", None, "training")]]  # after seed 1
    fp32, int2 = recs
    assert int2["status"] == "did not fit" and "runs" not in int2 and int2["grad_rel_error"] > 0
    assert fp32["seeds"] == [0, 1] and fp32["time_ratio_ref_median"] == 1.0


def test_resume_reruns_a_changed_config_and_refuses_other_settings(tmp_path, builds, capsys):
    out = tmp_path / "res"
    assert main([*ARGS, "--out", str(out)]) == 0
    capsys.readouterr()
    with open(tmp_path / "int2.json", "w") as f:
        json.dump({"bits": 2, "block_size": 64}, f)
    builds.clear()
    configs = f"fp32,{tmp_path / 'int2.json'}"  # a row named "int2" again, but another configuration
    assert main([*ARGS[:-3], "--configs", configs, "--quiet", "--out", str(out), "--resume"]) == 0
    # fp32 is built once, for the reference gradients of int2, not measured or trained again
    assert builds == {"fp32": 1, "int2": 3} and "reusing fp32\n" in capsys.readouterr().out
    fp32, int2 = _doc(out)["records"]
    assert int2["config_quant"]["block_size"] == 64 and int2["seeds_done"] == [0, 1]
    # int2 trained in rounds fp32 did not train in: no time ratio rather than one across other loads
    assert fp32["time_ratio_ref_median"] == 1.0 and int2["time_ratio_ref_median"] is None
    assert int2["memory_ratio_fp32"] < 1.0
    for bad in (["--epochs", "3"], ["--hidden", "16"], ["--seeds", "3"]):
        assert main([*ARGS, *bad, "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "other settings" in err and bad[0].strip("-") in err, err
    assert main([*ARGS, "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_results_json_is_replaced_atomically(tmp_path, monkeypatch):
    """A write that dies halfway (a kill, a full disk) leaves the previous results.json whole."""
    meta = {"dataset": {"name": "d"}, "model": "sage"}
    report.write_results(str(tmp_path), [{"config": "fp32", "runs": [1, 2]}], meta, plots=False)
    before = (tmp_path / "results.json").read_text()

    def dies_halfway(obj, f, **kwargs):
        f.write('{"meta": {"trunc')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report.json, "dump", dies_halfway)
    with pytest.raises(OSError, match="No space"):
        report.write_results(str(tmp_path), [{"config": "fp32"}, {"config": "int2"}], meta, plots=False)
    assert (tmp_path / "results.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["results.csv", "results.json"]
    assert oct(os.stat(tmp_path / "results.json").st_mode & 0o777) == "0o644"
