"""bench/gpu_check.sh, the one-command GPU run: what can be checked without a GPU."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def _run(*args, env=None, **kwargs):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, **kwargs)


def test_script_parses():
    proc = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_documented_step_has_a_function():
    text = open(SCRIPT).read()
    for step in ("install", "tests", "codec", "finite", "arxiv", "memory"):
        assert f"step_{step}()" in text, step


def test_unknown_step_is_an_error_naming_the_valid_ones():
    proc = _run("bogus")
    assert proc.returncode == 2 and "unknown step 'bogus'" in proc.stdout and "codec" in proc.stdout


def test_without_a_gpu_the_gpu_steps_fail_and_write_nothing(tmp_path):
    """A stand-in python that reports no CUDA device: no result file may appear, the exit status is 1."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho no-cuda\n")
    fake.chmod(0o755)
    results = tmp_path / "results"
    proc = _run("codec", "arxiv", env={"PYTHON": str(fake), "RESULTS": str(results)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout and "failed: codec(no-gpu) arxiv(no-gpu)" in proc.stdout
    assert list(results.iterdir()) == []
