"""Compile the Triton kernels ahead of time for real GPUs, without one, and read their resource use.

Triton compiles for a named target with the ``ptxas`` bundled in its wheel
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``), and the bundled
``cuobjdump --dump-resource-usage`` reads each cubin's registers, shared memory, stack and
local memory (spilled registers live in local memory). A kernel that does not compile for
sm_80 / sm_90, or that spills, is found here on a CPU-only machine.

Each case is one specialisation a launcher in :mod:`blockquant.kernels.blockwise` can produce:
the kernel, its constexprs (from the launcher's own ``_tile_shape``), its pointer types (16-bit
tensors travel as int16) and the divisibility Triton assumes for 16-aligned pointers and block
sizes that are multiples of 16 (as at a real launch of the usual block sizes). Compiling runs in
subprocesses without ``TRITON_INTERPRET`` (under the interpreter ``triton.jit`` builds no compilable
function), ``workers`` at a time.

    python -m blockquant.kernels.aot [--subset ci|full] [--arch 80,90] [--workers 2] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

DTYPES = ("float32", "float16", "bfloat16")
# one block size per launch shape: a one-chunk tile (many blocks per program) and a multi-chunk sweep
CHUNKING = {"one": 1024, "multi": 65536}


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel specialisation: ``kernel`` is "quantize" or "dequantize"; ``data`` the input
    (quantize) or output (dequantize) dtype; ``meta`` the metadata dtype; ``block`` the block size
    whose tile shape it uses; ``stochastic`` only for quantize; ``sizes`` the integer type of the
    element and block counts ("i32", or "i64" from 2**31 elements on)."""

    kernel: str
    bits: int
    optimal: bool
    stochastic: bool
    block: int
    data: str
    meta: str
    sizes: str = "i32"

    @property
    def name(self) -> str:
        chunk = "one-chunk" if self.block == CHUNKING["one"] else f"multi-chunk(G={self.block})"
        rnd = ("stochastic" if self.stochastic else "nearest") if self.kernel == "quantize" else "-"
        return (f"{self.kernel} int{self.bits} {'optimal' if self.optimal else 'uniform'} {rnd} {chunk} "
                f"data={self.data} meta={self.meta} sizes={self.sizes}")


def full_matrix() -> List[Case]:
    """Every specialisation the launchers produce for the two launch shapes: both kernels, bits
    1/2/4/8, uniform/optimal levels, stochastic/nearest rounding (quantize), one-chunk and
    multi-chunk tiles, every input/output and metadata dtype; plus 64-bit sizes once per kernel."""
    cases = []
    for bits in (1, 2, 4, 8):
        for optimal in (False, True):
            for block in CHUNKING.values():
                for data in DTYPES:
                    for meta in DTYPES:
                        for stochastic in (True, False):
                            cases.append(Case("quantize", bits, optimal, stochastic, block, data, meta))
                        cases.append(Case("dequantize", bits, optimal, False, block, data, meta))
    cases.append(Case("quantize", 2, False, True, CHUNKING["one"], "float32", "bfloat16", "i64"))
    cases.append(Case("dequantize", 2, False, False, CHUNKING["one"], "float32", "bfloat16", "i64"))
    return cases


def ci_subset() -> List[Case]:
    """A subset that still reaches every code path of both kernels: every (data, metadata) dtype
    pair (the 16-bit load/store and directed-rounding branches), every bit width (the four code
    packings and noise draws), optimal levels (the binary search), nearest rounding, the
    multi-chunk sweep and 64-bit sizes; what it leaves out are combinations of paths already
    compiled one by one (the full matrix: ``--subset full``, recorded in bench/results/)."""
    one, multi = CHUNKING["one"], CHUNKING["multi"]
    cases = []
    for data in DTYPES:
        for meta in DTYPES:
            cases.append(Case("quantize", 2, False, True, one, data, meta))
            cases.append(Case("dequantize", 2, False, False, one, data, meta))
    for bits in (1, 4, 8):
        cases.append(Case("quantize", bits, True, True, one, "bfloat16", "bfloat16"))
        cases.append(Case("dequantize", bits, True, False, one, "bfloat16", "bfloat16"))
    cases.append(Case("quantize", 4, True, False, multi, "float32", "bfloat16", "i64"))
    cases.append(Case("dequantize", 4, True, False, multi, "float32", "bfloat16", "i64"))
    return cases


# ----------------------------------------------------------------------------- compiling (in a subprocess)

def _compile_one(case: Case, arch: int, cubin_path: str) -> Dict[str, object]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from blockquant.kernels import blockwise as bw

    bb, cb, per, one = bw._tile_shape(case.block, case.bits, torch.device("cuda"))
    kind = {"float32": 0, "float16": 1, "bfloat16": 2}
    ptr = {"float32": "*fp32", "float16": "*i16", "bfloat16": "*i16"}
    common = {"BITS": case.bits, "OPTIMAL": case.optimal, "BB": bb, "CB": cb, "PER": per, "ONE_CHUNK": one,
              "META": kind[case.meta]}
    if case.kernel == "quantize":
        fn = bw._quantize_kernel
        sig = {"x_ptr": ptr[case.data], "payload_ptr": "*u8", "meta_ptr": ptr[case.meta], "levels_ptr": "*fp32",
               "n": case.sizes, "G": "i32", "BPB": "i32", "nb": case.sizes, "seed_lo": "i32", "seed_hi": "i32"}
        const = {"X_KIND": kind[case.data], "STOCHASTIC": case.stochastic, **common}
        aligned = ("x_ptr", "payload_ptr", "meta_ptr", "levels_ptr", "G", "BPB")
        order = list(sig) + ["X_KIND", "META", "BITS", "OPTIMAL", "STOCHASTIC", "BB", "CB", "PER", "ONE_CHUNK"]
    else:
        fn = bw._dequantize_kernel
        sig = {"payload_ptr": "*u8", "meta_ptr": ptr[case.meta], "levels_ptr": "*fp32", "out_ptr": ptr[case.data],
               "n": case.sizes, "G": "i32", "BPB": "i32", "nb": case.sizes}
        const = {"OUT_KIND": kind[case.data], **common}
        aligned = ("payload_ptr", "meta_ptr", "levels_ptr", "out_ptr", "G", "BPB")
        order = list(sig) + ["OUT_KIND", "META", "BITS", "OPTIMAL", "BB", "CB", "PER", "ONE_CHUNK"]
    signature = {name: (sig[name] if name in sig else "constexpr") for name in order}
    attrs = {(order.index(a),): [["tt.divisibility", 16]] for a in aligned}
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=const, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": bw.NUM_WARPS, "enable_fp_fusion": False})
    seconds = time.perf_counter() - start
    with open(cubin_path, "wb") as f:
        f.write(compiled.asm["cubin"])
    return {"seconds": round(seconds, 2), "triton_shared_bytes": int(compiled.metadata.shared),
            **resource_usage(cubin_path)}


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin_path: str) -> Dict[str, int]:
    """Registers, stack, shared and local memory of the one function in a cubin (``cuobjdump``)."""
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", cubin_path], capture_output=True, text=True,
                         check=True).stdout
    found = {}
    for key, field in (("REG", "registers"), ("STACK", "stack_bytes"), ("SHARED", "shared_bytes"),
                       ("LOCAL", "local_bytes")):
        m = re.search(rf"\b{key}:(\d+)", out.split("Function", 1)[-1])
        if m is None:
            raise RuntimeError(f"cuobjdump printed no {key} for {cubin_path}:\n{out}")
        found[field] = int(m.group(1))
    return found


def _worker(payload: str) -> None:
    """Subprocess entry: compile the cases given as JSON on stdin; print one JSON line per case."""
    job = json.loads(payload)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (case, arch) in enumerate(job):
            c = Case(**case)
            try:
                row = _compile_one(c, arch, os.path.join(tmp, f"{i}.cubin"))
                row["error"] = None
            except Exception as e:  # noqa: BLE001 - reported per case, with the message
                row = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e) else ''}"}
            print(json.dumps({"case": case, "arch": arch, **row}), flush=True)


def compile_cases(cases: Sequence[Case], archs: Sequence[int] = (80, 90), workers: int = 2,
                  timeout: Optional[float] = None, cache_dir: Optional[str] = None,
                  progress: Optional[str] = None) -> List[Dict[str, object]]:
    """Compile every case for every architecture in ``workers`` subprocesses; one dict per (case, arch).

    ``cache_dir``: Triton's cache for the run (default: a fresh temporary one, so every case is
    compiled for real and the user's cache is left alone; a kept one lets an interrupted run resume).
    ``progress``: a file that receives each row as a JSON line as soon as it is compiled; rows
    already there are not compiled again.
    """
    done: Dict[str, Dict[str, object]] = {}
    if progress and os.path.exists(progress):
        with open(progress) as f:
            for line in f:
                row = json.loads(line)
                done[json.dumps([row["case"], row["arch"]], sort_keys=True)] = row
    jobs = [(dataclasses.asdict(c), a) for c in cases for a in archs]
    todo = [j for j in jobs if json.dumps(list(j), sort_keys=True) not in done]
    shares = [todo[i::workers] for i in range(workers) if todo[i::workers]]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BLOCKQUANT_TEST_INTERPRET")}
    cache = tempfile.TemporaryDirectory(prefix="blockquant-aot-") if cache_dir is None else None
    env["TRITON_CACHE_DIR"] = cache.name if cache is not None else cache_dir
    lock = threading.Lock()

    def run(share):
        proc = subprocess.Popen([sys.executable, "-c", "import sys; from blockquant.kernels.aot import _worker; "
                                 "_worker(sys.stdin.read())"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        proc.stdin.write(json.dumps(share))
        proc.stdin.close()
        rows = []
        for line in proc.stdout:
            if line.startswith("{"):
                rows.append(json.loads(line))
                if progress:
                    with lock, open(progress, "a") as f:
                        f.write(line if line.endswith("\n") else line + "\n")
        err = proc.stderr.read()
        if proc.wait(timeout=timeout) != 0 or len(rows) != len(share):
            raise RuntimeError(f"AOT compile worker failed (status {proc.returncode}):\n{err[-3000:]}")
        return rows

    with cache if cache is not None else contextlib.nullcontext(), ThreadPoolExecutor(max(1, len(shares))) as pool:
        fresh = [row for rows in pool.map(run, shares) for row in rows]
    by_job = {json.dumps([r["case"], r["arch"]], sort_keys=True): r for r in list(done.values()) + fresh}
    return [by_job[json.dumps(list(j), sort_keys=True)] for j in jobs]


def problems(rows: Sequence[Dict[str, object]]) -> List[str]:
    """Every case that failed to compile or spills (local memory or stack in use)."""
    bad = []
    for r in rows:
        name = f"{Case(**r['case']).name} sm_{r['arch']}"
        if r.get("error"):
            bad.append(f"{name}: {r['error']}")
        elif r["local_bytes"] or r["stack_bytes"]:
            bad.append(f"{name}: spills ({r['local_bytes']} B local, {r['stack_bytes']} B stack)")
    return bad


def markdown(rows: Sequence[Dict[str, object]], title: str) -> str:
    lines = [f"# {title}", "", "| kernel | bits | levels | rounding | tile | data | meta | sizes | arch | registers "
             "| shared B | local B | stack B | compile s |", "|" + "---|" * 14]
    for r in sorted(rows, key=lambda r: (r["case"]["kernel"], r["case"]["bits"], r["case"]["optimal"],
                                         not r["case"]["stochastic"], r["case"]["block"], r["case"]["data"],
                                         r["case"]["meta"], r["case"]["sizes"], r["arch"])):
        c = r["case"]
        rnd = ("stochastic" if c["stochastic"] else "nearest") if c["kernel"] == "quantize" else "-"
        tile = "one-chunk" if c["block"] == CHUNKING["one"] else "multi-chunk"
        cells = [c["kernel"], c["bits"], "optimal" if c["optimal"] else "uniform", rnd, tile, c["data"], c["meta"],
                 c["sizes"], f"sm_{r['arch']}"]
        if r.get("error"):
            cells += ["error: " + r["error"], "", "", "", ""]
        else:
            cells += [r["registers"], r["shared_bytes"], r["local_bytes"], r["stack_bytes"], r["seconds"]]
        lines.append("| " + " | ".join(str(v) for v in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", choices=("ci", "full"), default="full")
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the rows as JSON here (and a .md table beside it)")
    ap.add_argument("--cache-dir", default=None, help="Triton cache to use (default: a fresh temporary one)")
    ap.add_argument("--progress", default=None, help="JSON-lines file of finished rows: resume from it")
    args = ap.parse_args(argv)
    cases = full_matrix() if args.subset == "full" else ci_subset()
    archs = [int(a) for a in args.arch.split(",")]
    start = time.perf_counter()
    rows = compile_cases(cases, archs, args.workers, cache_dir=args.cache_dir, progress=args.progress)
    wall = time.perf_counter() - start
    import triton

    summary = {"triton": triton.__version__, "subset": args.subset, "cases": len(cases), "archs": archs,
               "compiles": len(rows), "wall_seconds": round(wall, 1), "workers": args.workers,
               "problems": problems(rows)}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**summary, "rows": rows}, f, indent=1)
        title = (f"Triton kernels compiled ahead of time (triton {triton.__version__}, subset {args.subset}, "
                 f"{len(rows)} compiles, {wall:.0f} s with {args.workers} workers)")
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown(rows, title))
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
