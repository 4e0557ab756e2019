"""`blockquant bench` end to end: in-process and as a subprocess, outputs, schema, errors."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import blockquant
from bench_fixtures import copy_cora, write_ogb_fixture
from blockquant.cli import build_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECORD_KEYS = {
    "config", "config_kind", "config_quant", "dataset", "model", "device", "versions", "command",
    "activation_bytes", "activation_mib", "bytes_per_node", "memory_ratio_fp32", "activation_source",
    "alloc_delta_bytes", "alloc_delta_method", "per_module",
    "peak_step_bytes", "peak_step_mib", "peak_method",
    "epoch_time_median_s", "time_ratio_fp32",
    "metric", "val_mean", "val_std", "test_mean", "test_std", "grad_rel_error", "runs",
    "curve_loss_mean", "curve_val_mean",
}


pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")


def _env():
    env = dict(os.environ, BLOCKQUANT_BACKEND="torch", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    return env


def _records(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        doc = json.load(f)
    return doc["meta"], {r["config"]: r for r in doc["records"]}


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    assert os.path.getsize(path) > 2000, path


def test_bench_synthetic_in_process(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["bench", "--dataset", "synthetic:tiny", "--epochs", "3", "--seeds", "2", "--hidden", "32",
               "--configs", "fp32,checkpoint,int2,default", "--quiet", "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    for name in ("fp32", "checkpoint", "int2", "default"):
        assert name in stdout
    assert "act MiB" in stdout and "test acc" in stdout

    meta, recs = _records(out)
    assert list(recs) == ["fp32", "checkpoint", "int2", "default"]
    assert meta["dataset"]["name"] == "synthetic:tiny" and meta["seeds"] == [0, 1]
    assert meta["versions"]["torch"] and meta["command"].startswith("blockquant bench")
    for name, r in recs.items():
        missing = RECORD_KEYS - set(r)
        assert not missing, (name, missing)
        assert r["dataset"] == "synthetic:tiny" and r["model"] == "sage" and r["device"] == "cpu"
        assert len(r["runs"]) == 2 and all(len(run["epoch_times_s"]) == 3 for run in r["runs"])
        assert 0.0 <= r["test_mean"] <= 1.0 and r["epoch_time_median_s"] > 0
        assert r["peak_step_bytes"] > 0
        assert r["bytes_per_node"] == pytest.approx(r["activation_bytes"] / meta["dataset"]["num_nodes"])
    fp32 = recs["fp32"]
    assert fp32["memory_ratio_fp32"] == 1.0 and fp32["grad_rel_error"] == 0.0
    # track_saved and the allocator agree for plain autograd
    assert fp32["alloc_delta_bytes"] == pytest.approx(fp32["activation_bytes"], rel=0.05)
    # every saver holds less than fp32; checkpoint's number is its honest held inputs
    for name in ("checkpoint", "int2", "default"):
        assert recs[name]["activation_bytes"] < 0.5 * fp32["activation_bytes"], name
        assert recs[name]["memory_ratio_fp32"] < 0.5
    ck = recs["checkpoint"]
    assert ck["activation_bytes"] > 0
    assert ck["alloc_delta_bytes"] == pytest.approx(ck["activation_bytes"], rel=0.1)
    assert ck["grad_rel_error"] < 1e-5  # recomputation is exact
    assert 0 < recs["int2"]["grad_rel_error"] < 1.0
    assert recs["default"]["config_quant"] == blockquant.QuantConfig.preset("default").to_dict()
    assert sum(recs["int2"]["per_module"].values()) == recs["int2"]["activation_bytes"]

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == list(recs)
    assert float(rows[0]["activation_bytes"]) == fp32["activation_bytes"]
    for png in ("accuracy_vs_memory.png", "memory_per_module.png", "training_curves.png"):
        _assert_png(out / png)


def test_bench_cora_in_process(tmp_path, capsys):
    root = copy_cora(tmp_path)
    out = tmp_path / "cora"
    rc = main(["bench", "--dataset", "cora", "--root", root, "--epochs", "15", "--seeds", "1", "--hidden", "64",
               "--configs", "fp32,default", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    meta, recs = _records(out)
    assert meta["dataset"]["num_nodes"] == 2708
    # Cora's 1433-wide first layer dominates fp32 memory; compression must still save something
    assert recs["default"]["activation_bytes"] < recs["fp32"]["activation_bytes"]
    assert recs["default"]["grad_rel_error"] > 0
    for r in recs.values():
        assert r["test_mean"] > 0.5  # 7 classes: chance is ~0.14


def test_bench_subprocess_module_entry(tmp_path):
    out = tmp_path / "sub"
    proc = subprocess.run(
        [sys.executable, "-m", "blockquant", "bench", "--dataset", "synthetic:tiny", "--epochs", "2", "--seeds", "1",
         "--hidden", "16", "--configs", "fp32,int4", "--quiet", "--out", str(out)],
        cwd=str(tmp_path), env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "int4" in proc.stdout and "fp32" in proc.stdout
    _, recs = _records(out)
    assert recs["int4"]["activation_bytes"] < recs["fp32"]["activation_bytes"]
    assert proc.stderr.strip() == "" or "Traceback" not in proc.stderr


def test_bench_ogb_fixture_end_to_end(tmp_path, capsys):
    write_ogb_fixture(str(tmp_path), "ogbn-arxiv", num_nodes=80)
    write_ogb_fixture(str(tmp_path), "ogbn-proteins", num_nodes=60)
    for name, metric in (("ogbn-arxiv", "acc"), ("ogbn-proteins", "rocauc")):
        out = tmp_path / name
        rc = main(["bench", "--dataset", name, "--root", str(tmp_path), "--epochs", "2", "--seeds", "1",
                   "--hidden", "16", "--configs", "fp32,int2", "--quiet", "--out", str(out)])
        assert rc == 0, capsys.readouterr().err
        meta, recs = _records(out)
        assert meta["metric"] == metric and recs["int2"]["metric"] == metric
        assert 0.0 <= recs["fp32"]["test_mean"] <= 1.0


def test_help_documents_every_option(capsys):
    assert main(["bench", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--dataset", "--root", "--model", "--configs", "--epochs", "--seeds", "--hidden", "--layers",
                "--lr", "--device", "--out", "--quiet", "--scale", "--dropout"):
        assert opt in text, opt
    for action in build_parser()._subparsers._group_actions[0].choices["bench"]._actions:
        assert action.help, action.option_strings
    for name in ("synthetic:arxiv-like", "ogbn-proteins", "checkpoint", "iexact"):
        assert name in text


@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--model", "transformer"], "unknown model 'transformer'"),
    (["--configs", "fp32,int3"], "unknown config 'int3'"),
    (["--configs", "missing.json"], "config file 'missing.json' not found"),
    (["--dataset", "cora", "--root", "/nonexistent/root"], "pass --root"),
    (["--dataset", "ogbn-arxiv", "--root", "/nonexistent/root"], "no download is attempted"),
    (["--seeds", "0"], "--seeds expects"),
    (["--epochs", "-3"], "--epochs expects a positive integer"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--bogus"], "unrecognized arguments"),
])
def test_user_errors_are_one_line_exit_2(argv, needle, capsys):
    rc = main(["bench", "--quiet", "--dataset", "synthetic:tiny", *argv] if argv[0] != "--dataset" else
              ["bench", "--quiet", *argv])
    assert rc == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("blockquant: error:") and needle in err, err
    assert "Traceback" not in captured.out + captured.err


def test_bad_json_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"bits": 3}')
    assert main(["bench", "--quiet", "--dataset", "synthetic:tiny", "--configs", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bits" in err


def test_json_config_runs(tmp_path, capsys):
    cfg = tmp_path / "g256.json"
    cfg.write_text(json.dumps({"bits": 2, "block_size": 256, "rp_ratio": 4}))
    out = tmp_path / "o"
    assert main(["bench", "--quiet", "--dataset", "synthetic:tiny", "--epochs", "1", "--seeds", "1", "--hidden", "16",
                 "--configs", f"fp32,{cfg}", "--out", str(out)]) == 0
    _, recs = _records(out)
    assert recs["g256"]["config_quant"]["block_size"] == 256
    assert recs["g256"]["activation_bytes"] < recs["fp32"]["activation_bytes"]


def test_ogb_folder_without_release_file_never_prompts(tmp_path):
    """ogb would ask 'Will you update the dataset now? (y/N)' on stdin: we must fail fast instead."""
    write_ogb_fixture(str(tmp_path), "ogbn-arxiv", release=False)
    proc = subprocess.run(
        [sys.executable, "-m", "blockquant", "bench", "--dataset", "ogbn-arxiv", "--root", str(tmp_path), "--quiet"],
        cwd=str(tmp_path), env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "RELEASE_v1.txt" in err, err
    assert "Will you update" not in proc.stdout


@pytest.mark.parametrize("model", ["sage", "gcn", "gat", "gin", "gcn2"])
def test_every_model_trains_and_converts(model):
    from blockquant.bench.datasets import load_dataset
    from blockquant.bench.runner import BenchOptions, resolve_configs, run_benchmark

    data = load_dataset("synthetic:tiny")
    opts = BenchOptions(dataset="synthetic:tiny", model=model, epochs=2, seeds=(0,), hidden=16, quiet=True)
    recs = {r["config"]: r for r in run_benchmark(data, opts, resolve_configs(["fp32", "checkpoint", "int8"]))}
    assert recs["checkpoint"]["activation_bytes"] < recs["fp32"]["activation_bytes"]
    assert recs["checkpoint"]["grad_rel_error"] < 1e-5
    assert recs["int8"]["activation_bytes"] < recs["fp32"]["activation_bytes"]
    assert recs["int8"]["grad_rel_error"] < 0.1  # 8-bit codes: close to fp32
    for r in recs.values():
        assert all(torch.isfinite(torch.tensor(run["loss"])).all() for run in r["runs"])


def test_out_of_memory_is_one_line_exit_2(monkeypatch, capsys):
    from blockquant.bench import runner

    def boom(self, *a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details")

    monkeypatch.setattr(runner.TrainingRun, "epoch", boom)
    rc = main(["bench", "--quiet", "--dataset", "synthetic:tiny", "--epochs", "1", "--seeds", "1",
               "--configs", "fp32"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of memory" in err and "--hidden" in err, err


def test_progress_bars_unless_quiet(capsys):
    argv = ["bench", "--dataset", "synthetic:tiny", "--epochs", "1", "--seeds", "1", "--hidden", "8",
            "--configs", "fp32"]
    assert main(argv) == 0
    loud = capsys.readouterr()
    assert "configs" in loud.err and "fp32 seed 0" in loud.err
    assert main(argv + ["--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and "fp32" in quiet.out
