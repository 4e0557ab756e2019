"""--memory-limit-gib: a real address-space limit stops an allocation inside the process, and the
benchmark turns a configuration that does not fit into a "did not fit" row."""
import os
import subprocess
import sys

import pytest
import torch

from blockquant.bench.datasets import load_dataset
from blockquant.bench.errors import BenchError
from blockquant.bench.memlimit import (address_space_bytes, apply_memory_limit, did_not_fit, peak_rss_bytes,
                                       reset_peak_rss)
from blockquant.bench.report import format_table, write_results
from blockquant.bench.runner import BenchOptions, Trainer, resolve_configs, run_benchmark

pytestmark = [pytest.mark.usefixtures("torch_backend_one_thread"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_limit_stops_a_large_allocation_in_a_child_process():
    """Run in a child so this test process keeps its own limit."""
    code = (
        "import torch\n"
        "from blockquant.bench.memlimit import address_space_bytes, apply_memory_limit\n"
        "apply_memory_limit(address_space_bytes() / 2**30 + 0.5)\n"
        "small = torch.empty(2**26, dtype=torch.uint8)\n"  # 64 MiB: fits
        "try:\n"
        "    torch.empty(2**31, dtype=torch.uint8)\n"  # 2 GiB: must not
        "except RuntimeError as e:\n"
        "    print('stopped:', \"can't allocate memory\" in str(e))\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "stopped: True" in proc.stdout


def test_limit_below_current_use_is_a_clear_error():
    used = address_space_bytes()
    with pytest.raises(BenchError, match="below what the process already uses"):
        apply_memory_limit(used / 2 ** 30 / 2)


def test_did_not_fit_row_names_the_limit_and_request():
    err = RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 3221225472 bytes. Error code 12 (Cannot allocate memory)")
    row = did_not_fit("fp32", 20.0, err, "training")
    assert row["status"] == "did not fit" and row["failed_request_bytes"] == 3 * 2 ** 30
    assert row["detail"] == "did not fit: needs > 20 GiB (failed during training, allocating 3.00 GiB more)"


def test_out_of_memory_under_a_limit_becomes_a_row(monkeypatch, tmp_path):
    """fp32 'runs out' (a simulated allocator failure), int2 still runs and is reported."""
    real = Trainer.step_peak

    def step_peak(self, model):
        if not any(hasattr(m, "bq_config") for m in model.modules()):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes.")
        return real(self, model)

    monkeypatch.setattr(Trainer, "step_peak", step_peak)
    data = load_dataset("synthetic:tiny")
    opts = BenchOptions(dataset="synthetic:tiny", configs=("fp32", "int2"), epochs=2, seeds=(0,), hidden=16,
                        quiet=True, memory_limit_gib=3.0)
    recs = run_benchmark(data, opts, resolve_configs(["fp32", "int2"]))
    fp32, q = recs
    assert fp32["status"] == "did not fit" and fp32["failed_stage"] == "first-step measurements"
    assert "status" not in q and q["activation_bytes"] > 0 and q["memory_ratio_fp32"] is None
    if sys.platform.startswith("linux"):  # each row carries the process's peak RSS while that config ran
        assert fp32["peak_rss_bytes"] > 0 and q["peak_rss_bytes"] > 0
    meta = {"dataset": data.describe(), "model": "sage", "device": "cpu", "metric": "acc", "epochs": 2}
    table = format_table(recs, meta)
    assert "fp32: did not fit: needs > 3 GiB (failed during first-step measurements, allocating 1.00 GiB more)" in table
    write_results(str(tmp_path), recs, meta)  # plots skip the row without figures
    with pytest.raises(BenchError, match="out of memory"):  # without a limit, OOM stays an error
        run_benchmark(data, BenchOptions(dataset="synthetic:tiny", epochs=1, seeds=(0,), hidden=16, quiet=True),
                      resolve_configs(["fp32"]))


def test_compressed_config_is_measured_when_the_fp32_reference_does_not_fit(monkeypatch):
    real = Trainer.weight_grads

    def weight_grads(self, model):
        if not any(hasattr(m, "bq_config") for m in model.modules()):
            raise MemoryError()
        return real(self, model)

    monkeypatch.setattr(Trainer, "weight_grads", weight_grads)
    data = load_dataset("synthetic:tiny")
    opts = BenchOptions(dataset="synthetic:tiny", epochs=1, seeds=(0,), hidden=16, quiet=True, memory_limit_gib=3.0)
    (q,) = run_benchmark(data, opts, resolve_configs(["int2"]))
    assert "status" not in q and q["activation_bytes"] > 0
    assert q["grad_rel_error"] is None and "did not fit" in q["grad_rel_error_note"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak-RSS windows read /proc (Linux only)")
def test_peak_rss_window_restarts_and_sees_a_new_allocation():
    big = torch.ones(64 * 2 ** 20, dtype=torch.uint8)  # 64 MiB resident
    del big
    high = peak_rss_bytes()
    assert reset_peak_rss()
    low = peak_rss_bytes()
    assert low < high - 32 * 2 ** 20  # the freed 64 MiB no longer counts in the new window
    touched = torch.ones(128 * 2 ** 20, dtype=torch.uint8)
    assert peak_rss_bytes() >= low + 100 * 2 ** 20
    del touched
