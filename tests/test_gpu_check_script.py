"""bench/gpu_check.sh, the one-command GPU run: everything about it that can be checked without a GPU.

It must parse, name its steps consistently, refuse an unknown step, write nothing and fail without
a GPU, respect its deadline, and call only scripts, options, presets and test markers that exist,
so that the rare GPU session spends its minutes measuring, not debugging the script.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
TEXT = open(SCRIPT).read()
DEFAULT = ("install", "tests", "step", "codec", "chunks")
ALL = DEFAULT + ("suite", "arxiv", "memory")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def _run(*args, env=None, **kwargs):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, **kwargs)


def _fake_python(tmp_path, device="no-cuda"):
    """A stand-in python that reports ``device`` for the probe and fails at anything else."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho {device}\nexit 0\n")
    fake.chmod(0o755)
    return str(fake)


def test_script_parses():
    proc = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_step_is_documented_listed_timed_and_has_a_function():
    assert re.search(r"DEFAULT_STEPS=\((.*)\)", TEXT).group(1).split() == list(DEFAULT)
    assert re.search(r"ALL_STEPS=\((.*)\)", TEXT).group(1).split() == list(ALL)
    for step in ALL:
        assert f"step_{step}()" in TEXT, step
        assert re.search(rf"^#   {step}\s", TEXT, re.M), f"step {step} is not described in the header"
        assert f"[{step}]=" in TEXT, f"step {step} has no timeout"


def test_default_steps_fit_the_command_limit():
    """Their timeouts add up to less than ten minutes (the device tool's limit per command)."""
    timeouts = dict(re.findall(r"\[(\w+)\]=(\d+)", TEXT))
    assert sum(int(timeouts[s]) for s in DEFAULT) <= 660
    assert int(re.search(r'DEADLINE="\$\{DEADLINE:-(\d+)\}"', TEXT).group(1)) <= 580


def test_unknown_step_is_an_error_naming_the_valid_ones():
    proc = _run("bogus")
    assert proc.returncode == 2 and "unknown step 'bogus'" in proc.stdout and "codec" in proc.stdout


def test_without_a_gpu_the_gpu_steps_fail_and_write_nothing(tmp_path):
    results = tmp_path / "results"
    proc = _run("codec", "step", env={"PYTHON": _fake_python(tmp_path), "RESULTS": str(results)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout and "failed: codec(no-gpu) step(no-gpu)" in proc.stdout
    assert list(results.iterdir()) == []


def test_steps_past_the_deadline_are_skipped_and_reported(tmp_path):
    proc = _run("codec", "chunks", env={"PYTHON": _fake_python(tmp_path, "nvidia-h100"), "DEADLINE": "0",
                                          "RESULTS": str(tmp_path / "results")})
    assert proc.returncode == 1
    assert "failed: codec(skipped:deadline) chunks(skipped:deadline)" in proc.stdout, proc.stdout


def test_the_scripts_it_runs_exist_and_take_its_options():
    for script in set(re.findall(r"bench/[\w]+\.py", TEXT)):
        assert os.path.exists(os.path.join(ROOT, script)), script
    codec_help = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "codec_bandwidth.py"), "--help"],
                                capture_output=True, text=True, timeout=60).stdout
    for option in ("--device", "--preset", "--dtypes", "--bits", "--blocks", "--levels", "--n", "--repeats",
                   "--finite-check", "--out"):
        assert option in codec_help, option
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import codec_bandwidth
    finally:
        sys.path.pop(0)
    assert "gpu" in codec_bandwidth.PRESETS
    step_source = open(os.path.join(ROOT, "bench", "gpu_step.py")).read()
    for option in ("--steps", "--out", "--models", "--configs"):
        assert f'"{option}"' in step_source, option


def test_the_cuda_tests_it_runs_exist():
    """``pytest -m cuda`` selects tests: the marker is registered and used by the CUDA test modules."""
    assert re.search(r"^\s+cuda:", open(os.path.join(ROOT, "pytest.ini")).read(), re.M)
    cuda_tests = open(os.path.join(ROOT, "tests", "test_cuda.py")).read()
    assert "pytest.mark.cuda" in cuda_tests and "set_sync_debug_mode" in cuda_tests
