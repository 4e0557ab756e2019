"""Faults during training: an out-of-memory error in the middle of a step, and a data-parallel rank
that dies.

A step that runs out of memory partway (in forward, in the codec, in backward) must leave the model,
the optimizer and blockquant's caches usable for a retry with a smaller config, and hold nothing
once the caller drops the step's tensors. Injected failures (a ``TorchFunctionMode`` raising
``torch.OutOfMemoryError`` at the k-th torch call of a step) reach every point of a step
deterministically; one test provokes a real allocation failure under an address-space limit
(``RLIMIT_AS``, as ``blockquant bench --memory-limit-gib`` does) in a child process.
"""
import gc
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch_geometric.nn.models import GAT, GraphSAGE

import blockquant
from blockquant import adjacency, packed, save_policy
from blockquant.bench.runner import profiler_net_bytes

pytestmark = pytest.mark.usefixtures("torch_backend_one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, F, C = 120, 12, 4


class OutOfMemoryAt(TorchFunctionMode):
    """Raise ``torch.OutOfMemoryError`` at the ``k``-th torch call made under it (forward, the codec and
    the Python backward functions alike); ``k=None`` only counts the calls."""

    def __init__(self, k=None):
        super().__init__()
        self.k, self.calls, self.raised = k, 0, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if self.calls == self.k:
            self.raised = getattr(func, "__name__", str(func))
            raise torch.OutOfMemoryError(f"injected at torch call {self.k} ({self.raised})")
        return func(*args, **(kwargs or {}))


def _graph():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, F, generator=g), torch.randint(0, N, (2, 600), generator=g),
            torch.randint(0, C, (N,), generator=g))


MODELS = {
    # BatchNorm, dropout, jumping knowledge; GAT: attention and its dropout
    "sage": lambda: GraphSAGE(F, 16, num_layers=3, out_channels=C, norm="batch_norm", dropout=0.3, jk="cat"),
    "gat": lambda: GAT(F, 8, num_layers=2, out_channels=C, heads=2, dropout=0.3, norm="layer_norm"),
}


def _convert(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blockquant.ConversionWarning)  # PyG's LayerNorm has no wrapper
        return blockquant.convert(model, config)


def _model_and_optimizer(name, config):
    torch.manual_seed(0)
    model = _convert(MODELS[name](), config)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _step(model, opt, x, ei, y, fault=None):
    opt.zero_grad(set_to_none=True)
    with fault if fault is not None else OutOfMemoryAt():
        with blockquant.defer_finite_check():
            loss = torch.nn.functional.cross_entropy(model(x, ei), y)
        loss.backward()
    opt.step()


def _library_state_is_clean(graph):
    """Nothing of the failed step left in blockquant's own tables: shared compressions died with their
    intermediates; the only cached structure (attention's included: it shares the graph's) is the live
    graph's; no deferred check is active."""
    assert len(save_policy._SHARED) == 0, list(save_policy._SHARED.keys())
    assert all(k is graph for k in adjacency._STRUCTURES.keys())
    assert packed._ACTIVE_CHECK.get() is None


@pytest.mark.parametrize("name", sorted(MODELS))
def test_out_of_memory_mid_step_leaks_nothing_and_a_smaller_config_retries(name):
    """For points spread over the whole step: after the failure and ``gc``, nothing is held (the
    allocator's net bytes over the failed step are 0) and blockquant's tables are clean; then the same
    model and optimizer, converted to a smaller config, take exactly the step a model that never
    failed takes (same parameters and optimizer state; BatchNorm's running statistics saw the failed
    forward, as in plain PyTorch, and do not enter a training step)."""
    x, ei, y = _graph()
    count = OutOfMemoryAt()
    model, opt = _model_and_optimizer(name, "int4")
    _step(model, opt, x, ei, y)  # the graph's cached structures are built in the first step
    _step(model, opt, x, ei, y, count)
    calls = count.calls
    points = sorted({1, 2, calls - 1, calls, *range(3, calls, max(1, calls // 6))})
    twin, twin_opt = _model_and_optimizer(name, "int4")
    _step(twin, twin_opt, x, ei, y)
    _convert(twin, "int2")
    torch.manual_seed(1)
    _step(twin, twin_opt, x, ei, y)
    for k in points:
        model, opt = _model_and_optimizer(name, "int4")
        _step(model, opt, x, ei, y)
        opt.zero_grad(set_to_none=True)
        fault = OutOfMemoryAt(k)

        def failed_step():
            with pytest.raises(torch.OutOfMemoryError):
                _step(model, opt, x, ei, y, fault)
            opt.zero_grad(set_to_none=True)  # a partial backward may have written some .grad
            gc.collect()

        _, net = profiler_net_bytes(failed_step)
        assert net == 0, f"{net} bytes still held after a failure at torch call {k} ({fault.raised})"
        _library_state_is_clean(ei)
        _convert(model, "int2")
        torch.manual_seed(1)
        _step(model, opt, x, ei, y)
        where = f"after a failure at torch call {k} of {calls} ({fault.raised})"
        for (pn, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p, q), f"{pn} differs from the never-failed model's {where}"
        got, want = opt.state_dict()["state"], twin_opt.state_dict()["state"]
        assert got.keys() == want.keys()
        for i in want:
            for key, v in want[i].items():
                assert torch.equal(got[i][key], v), f"optimizer state {i}.{key} differs {where}"


ALLOCATION_FAILURE = textwrap.dedent("""
    import ctypes, gc, json, warnings
    import torch
    warnings.simplefilter("ignore")
    import blockquant
    from blockquant.bench.memlimit import address_space_bytes, apply_memory_limit, _status_bytes
    from blockquant import save_policy
    from torch_geometric.nn.models import GraphSAGE

    torch.set_num_threads(1)
    torch.manual_seed(0)
    N, F, H, L = 4096, 64, 64, 12
    x, ei, y = torch.randn(N, F), torch.randint(0, N, (2, 4 * N)), torch.randint(0, 8, (N,))
    model = GraphSAGE(F, H, num_layers=L, out_channels=8, norm="batch_norm", dropout=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    # the larger config keeps the BatchNorm inputs exact: 2.5x the step peak of int2 everywhere
    LARGE = {f"norms.{i}": None for i in range(L - 1)}

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x, ei), y).backward()
        opt.step()

    class MallInfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2

    def malloc_held():  # bytes malloc has handed out and not got back: heap blocks in use plus mmapped ones
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    blockquant.convert(model, "int2")
    base = address_space_bytes()
    step()
    int2_needs = _status_bytes("VmPeak") - base
    apply_memory_limit((address_space_bytes() + 1.6 * int2_needs) / 2 ** 30)
    out = {"int2_needs_mib": int2_needs / 2 ** 20, "attempts": []}
    for config in ("large", "int2", "large", "int2"):
        blockquant.convert(model, LARGE if config == "large" else "int2")
        before = [p.detach().clone() for p in model.parameters()]
        steps = [s["step"].item() for s in opt.state.values()]
        opt.zero_grad(set_to_none=True)

        gc.collect()
        held = malloc_held()
        try:
            step()
            result = "ok"
        except RuntimeError as e:
            if "can't allocate memory" not in str(e):
                raise
            result = "out of memory"
        opt.zero_grad(set_to_none=True)
        gc.collect()
        out["attempts"].append({
            "config": config, "result": result, "held_after_minus_before": malloc_held() - held,
            "params_changed": any(not torch.equal(a, b) for a, b in zip(before, model.parameters())),
            "optimizer_steps_taken": sorted({s["step"].item() - s0 for s, s0 in zip(opt.state.values(), steps)}),
            "shared_entries": len(save_policy._SHARED), "address_space_mib": address_space_bytes() / 2 ** 20})
    print(json.dumps(out))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_a_real_allocation_failure_leaves_everything_usable_for_a_smaller_config(tmp_path):
    """Under an address-space limit between what the two configs need, the larger fails inside a step
    (a real allocator failure), holds nothing afterwards and changes no parameter or optimizer state;
    int2 then trains in the same process, and the pattern repeats identically."""
    import json

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               # large blocks straight from mmap, returned at free: the address space follows what is live
               MALLOC_MMAP_THRESHOLD_="65536")
    env.pop("TRITON_INTERPRET", None)
    env.pop("BLOCKQUANT_BACKEND", None)  # the default codec: the compiled one where it builds
    proc = subprocess.run([sys.executable, "-c", ALLOCATION_FAILURE], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    attempts = res["attempts"]
    assert [a["result"] for a in attempts] == ["out of memory", "ok", "out of memory", "ok"], res
    for a in attempts:
        # nothing held once the step's tensors are dropped (a step of the larger config holds ~20 MiB at the
        # failure; what remains is malloc's bookkeeping of Python's own small objects)
        assert abs(a["held_after_minus_before"]) < 256 * 1024, a
        assert a["shared_entries"] == 0, a
        if a["result"] == "ok":
            assert a["params_changed"] and a["optimizer_steps_taken"] == [1], a
        else:
            assert not a["params_changed"] and a["optimizer_steps_taken"] == [0], a
    assert abs(attempts[3]["address_space_mib"] - attempts[1]["address_space_mib"]) < 8, res


# ---------------------------------------------------------------------------------------------- DDP

RANK_DRIVER = textwrap.dedent("""
    # one rank of `python -m blockquant.bench.ddp`; rank 1 is killed (or stopped) in its 2nd optimizer step
    import os, signal, sys
    import torch
    if os.environ["RANK"] == "1":
        real, steps = torch.optim.Adam.step, []
        def step(self, *args, **kwargs):
            steps.append(1)
            if len(steps) == 2:
                os.kill(os.getpid(), signal.SIGKILL if os.environ["FAULT"] == "killed" else signal.SIGSTOP)
            return real(self, *args, **kwargs)
        torch.optim.Adam.step = step
    from blockquant.bench.ddp import worker_main
    sys.exit(worker_main(sys.argv[1:]))
""")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch built without gloo")
@pytest.mark.parametrize("fault", ["killed", "hangs"])
def test_a_rank_that_dies_or_hangs_stops_the_other_with_a_clear_error_in_bounded_time(fault, tmp_path):
    """Two gloo ranks on loopback; rank 1 is killed (SIGKILL) or stopped (SIGSTOP) in its second step.
    Rank 0 does not wait for it: a dead peer's closed connection fails its next collective at once, a
    hung peer fails it after the process group's timeout (--timeout-s 3 here); either way one line
    says which rank, step and config, and why."""
    import time

    timeout_s = 3
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", GLOO_SOCKET_IFNAME="lo",
               FAULT=fault, BLOCKQUANT_BACKEND="torch")
    env.pop("TRITON_INTERPRET", None)
    args = ["--dataset", "synthetic:tiny", "--configs", "iexact", "--epochs", "6", "--hidden", "16",
            "--timeout-s", str(timeout_s), "--out", str(tmp_path)]
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_DRIVER, *args], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.monotonic() + 240  # process start-up, imports and data on a loaded machine
        while ranks[0].poll() is None and time.monotonic() < deadline:
            if fault == "killed" and ranks[1].poll() is not None:
                break
            time.sleep(0.05)
        if fault == "killed":  # from rank 1's death to rank 0's exit
            assert ranks[1].wait(timeout=max(1.0, deadline - time.monotonic())) == -9
            died = time.monotonic()
            ranks[0].wait(timeout=30)
            assert time.monotonic() - died < 30
        else:
            ranks[0].wait(timeout=max(1.0, deadline - time.monotonic()))
        err = ranks[0].communicate(timeout=30)[1]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert ranks[0].returncode == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if "blockquant.bench.ddp: error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "rank 0 lost contact with another rank in step 2 of 6 of config 'iexact'" in lines[0]
    assert ("Connection" in lines[0]) if fault == "killed" else (f"Timed out waiting {timeout_s * 1000}ms" in lines[0])
    assert not (tmp_path / "rank0.json").exists()


def test_launch_failure_names_the_rank_that_failed_first():
    """What `blockquant bench --nproc` says when a rank dies: torchrun's root cause and the ranks' errors."""
    from blockquant.bench.ddp import failure_summary

    torchrun_stderr = textwrap.dedent("""\
        blockquant.bench.ddp: error: rank 0 lost contact with another rank in step 2 of 6 of config 'iexact' (x)
        Traceback (most recent call last):
        torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
        ======================================================
        Failures:
        [1]:
          rank      : 0 (local_rank: 0)
          exitcode  : 1 (pid: 2502)
        ------------------------------------------------------
        Root Cause (first observed failure):
        [0]:
          time      : 2026-12-07_03:18:46
          host      : localhost
          rank      : 1 (local_rank: 1)
          exitcode  : -9 (pid: 2503)  (SIGKILL)
          error_file: <N/A>
          traceback : Signal 9 (SIGKILL) received by PID 2503
        ======================================================
        """)
    summary = failure_summary(torchrun_stderr)
    assert summary.startswith("rank 1 failed first (killed by SIGKILL); blockquant.bench.ddp: error: rank 0 lost")
    plain = failure_summary(torchrun_stderr.replace("  (SIGKILL)", "").replace("-9 (pid", "3 (pid"))
    assert plain.startswith("rank 1 failed first (exit code 3)")
    assert failure_summary("a\nb\nc") == "a | b | c"
