"""The compiled CPU codec's build and cache: ``$CC`` split as a shell would, one compiler run for
processes starting together, a cache trusted only as far as its owner, a read-only cache or home,
and the explicit build command.

Compiling the real source takes 10-30 s on a loaded 2-core machine, so most tests compile with a
stand-in compiler: a shell script that logs its arguments and "compiles" by copying the library
this session already built (it then passes the same self-check). They need that library, so they
skip, with the reason, where the codec cannot be built at all.
"""
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import blockquant
from blockquant.kernels import get_backend, native, registry

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"compiled CPU codec unavailable: {native.unavailable_reason()}")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def built():
    """The library this session built in the normal cache (what the stand-in compiler copies)."""
    return native.library_path()


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path, built):
    """An empty cache directory (``tmp_path/cache``): the next use builds afresh; restored afterwards."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(native.CACHE_ENV, str(cache))
    monkeypatch.delenv("CC", raising=False)
    native._reset_for_tests()
    yield cache
    monkeypatch.undo()
    native._reset_for_tests()


def stand_in_compiler(where, built, sleep_s=0.0):
    """A compiler script at ``where``: logs each call (one line of arguments) to ``where.log``, waits
    ``sleep_s``, then writes the library ``built`` to the ``-o`` target."""
    log = str(where) + ".log"
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$@" >> '{log}'
        sleep {sleep_s}
        out=""
        while [ $# -gt 0 ]; do
            if [ "$1" = "-o" ]; then out="$2"; fi
            shift
        done
        cp '{built}' "$out"
        """))
    where.chmod(0o755)
    return log


def calls(log):
    return open(log).read().splitlines() if os.path.exists(log) else []


def test_cc_is_split_into_words_as_a_shell_would(fresh_cache, tmp_path, built, monkeypatch):
    """``CC="ccache gcc"`` is two words; a quoted path with a space is one."""
    cc = tmp_path / "dir with space" / "fake cc"
    log = stand_in_compiler(cc, built)
    monkeypatch.setenv("CC", f"'{cc}' -DFROM_CC")
    assert native.available(), native.unavailable_reason()
    (line,) = calls(log)
    assert line.startswith("-DFROM_CC -O3 ")  # the extra word reached the compiler as its own argument
    assert os.path.dirname(native.library_path()) == str(fresh_cache)
    native._reset_for_tests()
    monkeypatch.setenv("CC", "'unbalanced")
    with pytest.warns(native.CodecFallbackWarning, match="cannot be split into words"):
        assert not native.available()


def test_build_name_is_a_hash_of_source_flags_compiler_and_cpu(tmp_path, built, monkeypatch):
    cc = [shutil.which("cc") or "cc"]
    flags = native.BASE_FLAGS
    name = native._build_name(cc, flags, b"source")
    assert name == native._build_name(list(cc), tuple(flags), b"source")  # a pure function of its inputs
    assert name != native._build_name(cc, flags, b"source2")
    assert name != native._build_name(cc, (*flags, "-march=native"), b"source")
    assert name != native._build_name(["ccache", *cc], flags, b"source")
    monkeypatch.setattr(native, "_cpu_signature", lambda: "flags : another cpu")
    assert name != native._build_name(cc, flags, b"source")
    monkeypatch.undo()
    # a compiler replaced in place (same path, other file) gets its own build
    fake = tmp_path / "cc"
    stand_in_compiler(fake, built)
    before = native._build_name([str(fake)], flags, b"source")
    fake.write_text(fake.read_text() + "\n# upgraded\n")
    assert native._build_name([str(fake)], flags, b"source") != before


def test_processes_starting_together_compile_once(fresh_cache, tmp_path, built, monkeypatch):
    """Two processes (DDP ranks, say) build into one empty cache at the same moment: one compiler run;
    the other waits on the lock and loads that build."""
    cc = tmp_path / "cc"
    log = stand_in_compiler(cc, built, sleep_s=1.0)
    monkeypatch.setenv("CC", str(cc))
    go = tmp_path / "go"
    children = []
    for i in range(2):
        pid = os.fork()
        if pid == 0:  # child: wait for the start signal, load, report the library it loaded
            status = 1
            try:
                # as PyTorch's DataLoader workers do: OpenMP's thread team does not survive fork, and the
                # parent (this test session) has used it, so a parallel torch op in the child would hang
                torch.set_num_threads(1)
                while not go.exists():
                    time.sleep(0.005)
                if native.available():
                    (tmp_path / f"loaded-{i}").write_text(native.library_path())
                    status = 0
                else:
                    (tmp_path / f"loaded-{i}").write_text(native.unavailable_reason())
            finally:
                os._exit(status)
        children.append(pid)
    go.touch()
    deadline = time.monotonic() + 60
    statuses = {}
    while len(statuses) < 2 and time.monotonic() < deadline:
        for pid in children:
            if pid not in statuses:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    statuses[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    for pid in children:
        if pid not in statuses:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    reports = [(tmp_path / f"loaded-{i}").read_text() for i in range(2) if (tmp_path / f"loaded-{i}").exists()]
    assert list(statuses.values()) == [0, 0], reports
    assert reports[0] == reports[1] and reports[0].startswith(str(fresh_cache))
    assert len(calls(log)) == 1, calls(log)  # without the lock: one compiler run per process


def test_a_waiting_process_gives_up_after_the_lock_timeout(fresh_cache, tmp_path, built, monkeypatch):
    """A build lock held by a process that never finishes: a clear reason after LOCK_TIMEOUT_S, not a hang."""
    fcntl = pytest.importorskip("fcntl")
    cc = tmp_path / "cc"
    stand_in_compiler(cc, built)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(native, "LOCK_TIMEOUT_S", 0.5)
    fresh_cache.mkdir()
    with open(fresh_cache / native.LOCK_NAME, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # flock locks belong to the open file: this one blocks the loader's
        t0 = time.monotonic()
        with pytest.warns(native.CodecFallbackWarning, match="for over 0.5 s"):
            assert not native.available()
        assert time.monotonic() - t0 < 10


def _plant(cache, built, mode=0o755):
    """Put a copy of the library where the next load looks for it (the name for this compiler)."""
    with open(native.SOURCE, "rb") as f:
        source = f.read()
    name = native._build_name(native._compiler(), (*native.BASE_FLAGS, *native.ARCH_FLAGS[0]), source)
    cache.mkdir(exist_ok=True)
    path = cache / name
    shutil.copyfile(built, path)
    path.chmod(mode)
    return path


def test_a_build_found_in_the_cache_is_loaded_without_compiling(fresh_cache, built, monkeypatch):
    path = _plant(fresh_cache, built)
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail(f"the compiler ran: {a}"))
    assert native.available(), native.unavailable_reason()
    assert native.library_path() == str(path)


@pytest.mark.parametrize("how", ["writable-by-others", "writable-by-group", "other-owner", "symlink",
                                 "cache-dir-writable-by-others", "cache-dir-other-owner"])
def test_a_cache_others_could_have_written_is_refused(how, fresh_cache, built, monkeypatch):
    """A file at the build's name that someone else owns or can write, or a cache directory where
    they could replace it, is never loaded: the codec is unavailable, and the reason says why and what
    to do. (A shared BLOCKQUANT_CACHE_DIR would otherwise let anyone run code in this process.)"""
    path = _plant(fresh_cache, built)
    os.chmod(fresh_cache, 0o700)
    loaded = []
    real_cdll = native.ctypes.CDLL
    monkeypatch.setattr(native.ctypes, "CDLL", lambda p, *a, **k: loaded.append(p) or real_cdll(p, *a, **k))

    def owned_by_someone_else(p):
        if os.geteuid() == 0:  # root may give the file away
            os.chown(p, 4242, -1)
        else:  # a user cannot: pretend to be another user instead
            uid = os.geteuid()
            monkeypatch.setattr(native.os, "geteuid", lambda: uid + 1)

    if how == "writable-by-others":
        path.chmod(0o757)
        expect = "writable by group or others"
    elif how == "writable-by-group":
        path.chmod(0o775)
        expect = "writable by group or others"
    elif how == "other-owner":
        owned_by_someone_else(path)
        expect = "belongs to uid"
    elif how == "symlink":
        target = fresh_cache.parent / "elsewhere.so"
        path.rename(target)
        path.symlink_to(target)
        expect = "not a regular file"
    elif how == "cache-dir-writable-by-others":
        os.chmod(fresh_cache, 0o777)
        expect = "cache directory .* writable by group or others"
    else:
        owned_by_someone_else(fresh_cache)
        expect = "cache directory .* belongs to uid"
    with pytest.warns(native.CodecFallbackWarning, match="refusing to load"):
        assert not native.available()
    reason = native.unavailable_reason()
    assert __import__("re").search(expect, reason), reason
    assert native.CACHE_ENV in reason and loaded == []
    if how == "cache-dir-writable-by-others":  # with the sticky bit (like /tmp) others cannot replace our files
        os.chmod(fresh_cache, 0o1777)
        native._reset_for_tests()
        assert native.available(), native.unavailable_reason()
        assert loaded == [str(path)]


def test_the_build_is_private_whatever_the_umask(fresh_cache, tmp_path, built, monkeypatch):
    cc = tmp_path / "cc"
    stand_in_compiler(cc, built)
    monkeypatch.setenv("CC", str(cc))
    old = os.umask(0o002)  # a umask that would leave new files group-writable
    try:
        assert native.available(), native.unavailable_reason()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(native.library_path()).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(fresh_cache).st_mode) & 0o022 == 0
    native._reset_for_tests()
    assert native.available(), native.unavailable_reason()  # and the next process trusts it


def _unwritable_dirs(tmp_path):
    """Two directories this process cannot write into: read-only (0o555) ones for a user; for root,
    which writes through any mode, sysfs (``/sys``), which no process can create files in."""
    if os.geteuid() != 0:
        dirs = (tmp_path / "ro-home", tmp_path / "ro-cache")
        for d in dirs:
            d.mkdir()
            d.chmod(0o555)
        return tuple(str(d) for d in dirs)
    try:
        os.mkdir("/sys/blockquant-write-probe")
    except OSError:
        return "/sys", "/sys"
    os.rmdir("/sys/blockquant-write-probe")
    pytest.skip("running as root and /sys is writable here: no directory this process cannot write")


def _attempt(monkeypatch, **env):
    for k in ("HOME", "XDG_CACHE_HOME", native.CACHE_ENV, "CC"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    native._reset_for_tests()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = native.available()
        backend = get_backend(torch.device("cpu")).name
        x = torch.linspace(-1, 1, 1000)
        decoded = blockquant.quantize(x, blockquant.QuantConfig(bits=2, block_size=64)).dequantize()  # either way
    assert (decoded - x).abs().max() < 0.1
    return ok, backend, [str(w.message) for w in caught if w.category is native.CodecFallbackWarning]


@pytest.mark.usefixtures("fresh_cache")
def test_a_read_only_home_or_cache_directory(tmp_path, built, monkeypatch):
    """A read-only home (no cache yet) or cache directory without a build: the codec is unavailable,
    with one warning naming the directory and the fix, and the PyTorch backend does the work. A
    read-only cache directory that holds the build (made with ``--build`` by whoever could write it,
    e.g. root in an image) is loaded, and nothing is written into it."""
    monkeypatch.setattr(registry, "interpreting", lambda: False)
    monkeypatch.delenv("BLOCKQUANT_BACKEND", raising=False)
    ro_home, ro_cache = _unwritable_dirs(tmp_path)
    for env, expect, where in (({"HOME": ro_home}, "cannot create the cache directory", ro_home),
                               ({native.CACHE_ENV: ro_cache}, "is not writable", ro_cache)):
        ok, backend, warned = _attempt(monkeypatch, **env)
        reason = native.unavailable_reason()
        assert not ok and backend == "torch", reason
        assert expect in reason and where in reason, reason
        assert native.CACHE_ENV in reason and native.BUILD_COMMAND in reason
        assert len(warned) == 1 and reason in warned[0]
    prebuilt = tmp_path / "prebuilt"
    _plant(prebuilt, built)
    before = sorted(os.listdir(prebuilt))
    prebuilt.chmod(0o555)
    try:
        ok, backend, warned = _attempt(monkeypatch, **{native.CACHE_ENV: str(prebuilt)})
        assert ok and backend == "native" and warned == [], native.unavailable_reason()
        assert sorted(os.listdir(prebuilt)) == before  # no lock file, no temporary: nothing written
    finally:
        prebuilt.chmod(0o755)


def test_build_command_builds_ahead_of_time_and_reports_failure(fresh_cache, tmp_path, built, monkeypatch, capsys):
    from blockquant.kernels.__main__ import main

    cc = tmp_path / "cc"
    log = stand_in_compiler(cc, built)
    monkeypatch.setenv("CC", str(cc))
    assert main(["--build"]) == 0
    (so,) = fresh_cache.glob("*.so")
    assert str(so) in capsys.readouterr().out and len(calls(log)) == 1
    assert main([]) == 0  # status: which backend CPU tensors get, and the library
    assert str(so) in capsys.readouterr().out and len(calls(log)) == 1
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reason is the error, said once, not also a warning
        assert main(["--build"]) == 1
    assert "no-such-compiler" in capsys.readouterr().err
    # the README's command, as written: runs as a module, from the cached build, without a warning
    monkeypatch.setenv("CC", str(cc))
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(native.BUILD_COMMAND.replace("python", sys.executable, 1).split(), env=env,
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0 and str(so) in proc.stdout, proc.stderr
    assert "Warning" not in proc.stderr and len(calls(log)) == 1, proc.stderr
