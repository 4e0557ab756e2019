"""`blockquant bench` interrupted: the finished configurations stay in --out, `--resume` reuses them
without recomputing, and results.json is never half-written."""
import json
import os

import pytest

from blockquant.bench import report, runner
from blockquant.cli import main

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")

ARGS = ["bench", "--dataset", "synthetic:tiny", "--epochs", "1", "--seeds", "1", "--hidden", "8", "--layers", "2",
        "--configs", "fp32,int2,int4", "--quiet"]


def _doc(out):
    with open(out / "results.json") as f:
        return json.load(f)


@pytest.fixture
def builds(monkeypatch):
    """Counts Trainer.build calls per configuration name; ``builds.interrupt_at`` raises Ctrl-C's
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


def test_interrupted_run_keeps_finished_configs_and_resume_reuses_them(tmp_path, builds, capsys):
    out = tmp_path / "res"
    builds["interrupt_at"] = "int2"
    assert main([*ARGS, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "results.json" in err
    first = _doc(out)
    assert [r["config"] for r in first["records"]] == ["fp32"]
    assert first["meta"]["complete"] is False and first["meta"]["pending"] == ["int2", "int4"]
    assert sorted(os.listdir(out)) == ["results.csv", "results.json"]  # no temporary left, no plots yet

    builds.clear()
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    assert "reusing fp32" in capsys.readouterr().out
    # fp32 is built once, for the reference gradients of the others, not measured or trained again
    assert builds == {"fp32": 1, "int2": 1, "int4": 1}
    final = _doc(out)
    assert final["meta"]["complete"] is True and final["meta"]["pending"] == []
    recs = {r["config"]: r for r in final["records"]}
    assert list(recs) == ["fp32", "int2", "int4"]
    assert recs["fp32"]["runs"] == first["records"][0]["runs"]  # reused as recorded: the same timings
    assert recs["fp32"]["memory_ratio_fp32"] == 1.0 and recs["int2"]["memory_ratio_fp32"] < 1.0
    assert (out / "accuracy_vs_memory.png").exists()

    builds.clear()  # a finished run resumed: nothing to do
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    assert builds == {} and [r["config"] for r in _doc(out)["records"]] == ["fp32", "int2", "int4"]


def test_resume_reruns_a_changed_config_and_refuses_other_settings(tmp_path, builds, capsys):
    out = tmp_path / "res"
    assert main([*ARGS, "--out", str(out)]) == 0
    capsys.readouterr()
    with open(tmp_path / "int2.json", "w") as f:
        json.dump({"bits": 2, "block_size": 64}, f)
    builds.clear()
    configs = f"fp32,{tmp_path / 'int2.json'}"  # a row named "int2" again, but another configuration
    assert main([*ARGS[:-3], "--configs", configs, "--quiet", "--out", str(out), "--resume"]) == 0
    assert builds == {"fp32": 1, "int2": 1} and "reusing fp32\n" in capsys.readouterr().out
    assert _doc(out)["records"][1]["config_quant"]["block_size"] == 64
    for bad in (["--epochs", "2"], ["--hidden", "16"]):
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
