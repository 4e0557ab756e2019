"""Codec bandwidth against the same device's copy bandwidth, measured in the same run.

For every case (input dtype x bits x block size x levels x backend) it times,
each as the median of ``--repeats`` calls after warm-up:

* a copy of the input, right before the case: ``dst.copy_(x)`` into a
  preallocated tensor and ``x.clone()`` (which, like dequantize, allocates its
  output), so that a loaded machine's drift hits both sides of each ratio;
* ``quantize`` (stochastic rounding, bf16 metadata) and ``dequantize``.

Reported per case: GB/s of input (elements x input bytes / time, the CPU goal's
unit), GB/s moved (bytes read + written: input, payload and metadata; the GPU
goal's unit), and the fraction of the copy bandwidth (moved bytes per second
over the copy's read + write bytes per second). Goals: GPU >= 70% of copy at
INT2, block 1024; CPU >= 1 GB/s of fp32 input at INT2 and INT4, block 1024.

``--finite-check`` also times a loop of ``blockquant.quantize`` calls with the
per-call finiteness check (one host-device synchronisation each) against the
same loop inside ``blockquant.defer_finite_check()`` (one synchronisation).

Examples::

    # CPU, reference vs compiled codec, the README's activation shape
    python bench/codec_bandwidth.py --preset cpu --backends torch,native --shape 169343x128
    # GPU, the full matrix on 64M elements (run by bench/gpu_check.sh)
    python bench/codec_bandwidth.py --preset full --finite-check

Results go to ``--out`` (default ``bench/results/codec_bandwidth_<device>.json``,
the device name in the file name) and a Markdown table beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from typing import Callable, Dict, List

GOAL_GPU_FRACTION_OF_COPY = 0.70
GOAL_CPU_INPUT_GBPS = 1.0
PRESETS = {
    # the GPU matrix
    "full": dict(dtypes="float32,float16,bfloat16", bits="1,2,4,8", blocks="64,256,1024,4096,row",
                 levels="uniform,optimal"),
    # what bench/gpu_check.sh measures in its time budget: every bit width and both level kinds at the
    # goal's block size (each case compiles two kernel specialisations at its first launch)
    "gpu": dict(dtypes="float32,bfloat16", bits="1,2,4,8", blocks="1024", levels="uniform,optimal"),
    # the CPU goal's cases
    "cpu": dict(dtypes="float32", bits="2,4", blocks="1024", levels="uniform,optimal"),
    # a quick look at everything, smaller
    "smoke": dict(dtypes="float32,bfloat16", bits="1,8", blocks="64,row", levels="uniform,optimal"),
}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help="JSON file to write (default: bench/results/codec_bandwidth_<device>.json)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--backends", default=None,
                   help="comma list of codec backends (default: triton on cuda, torch,native on cpu)")
    p.add_argument("--preset", default="full", choices=sorted(PRESETS), help="case matrix (default full)")
    p.add_argument("--dtypes", default=None, help="override the preset: input dtypes, e.g. float32,bfloat16")
    p.add_argument("--bits", default=None, help="override the preset: e.g. 2,4")
    p.add_argument("--blocks", default=None, help="override the preset: block sizes and/or 'row'")
    p.add_argument("--levels", default=None, help="override the preset: uniform,optimal")
    p.add_argument("--n", type=int, default=64 * 1024 * 1024, help="elements per tensor (default 64M)")
    p.add_argument("--shape", default=None, help="ROWSxCOLS instead of --n (sets the 'row' block width)")
    p.add_argument("--row-width", type=int, default=16,
                   help="columns per row for 'row' blocks with --n (default 16: 128 columns projected 8x)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--finite-check", action="store_true",
                   help="also time per-call vs deferred finiteness checks (blockquant.defer_finite_check)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.shape:
        m = re.fullmatch(r"(\d+)x(\d+)", args.shape)
        if not m:
            p.error(f"--shape must look like 169343x128; got {args.shape!r}")
        rows, cols = int(m.group(1)), int(m.group(2))
        args.n, args.row_width = rows * cols, cols
    if args.n < 1 or args.repeats < 1 or args.warmup < 0 or args.row_width < 1:
        p.error(f"--n, --repeats, --row-width must be >= 1 and --warmup >= 0; got n={args.n}, "
                f"repeats={args.repeats}, row_width={args.row_width}, warmup={args.warmup}")
    return args


def device_slug(info: Dict[str, object]) -> str:
    """A file-name-safe device name: the GPU's, else the CPU's with its core count."""
    name = str(info.get("gpu") or f"cpu-{info.get('cpu_count')}core")
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def time_median(fn: Callable[[], object], device, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, perf_counter on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times: List[float] = []
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def wall_median(fn: Callable[[], object], device, repeats: int, warmup: int) -> float:
    """Median wall-clock seconds of ``fn()`` including a final device synchronisation."""
    import torch

    def run():
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def finite_check_case(device, repeats: int, warmup: int) -> Dict[str, object]:
    """``calls`` quantize calls of a hidden-layer-sized tensor, checked per call vs once."""
    import torch

    import blockquant

    calls, shape = 20, (169_343 // 4, 128)
    xs = [torch.randn(shape, device=device) for _ in range(4)]
    cfg = blockquant.QuantConfig.preset("default")

    def per_call():
        for i in range(calls):
            blockquant.quantize(xs[i % len(xs)], cfg, seed=i)

    def deferred():
        with blockquant.defer_finite_check():
            for i in range(calls):
                blockquant.quantize(xs[i % len(xs)], cfg, seed=i)

    a = wall_median(per_call, device, repeats, warmup)
    b = wall_median(deferred, device, repeats, warmup)
    return {"calls": calls, "shape": list(shape), "config": cfg.short(), "per_call_check_s": a,
            "deferred_check_s": b, "saved_per_call_us": (a - b) / calls * 1e6, "speedup": a / b}


def run_cases(args, device, backend_names) -> Dict[str, object]:
    import torch

    from blockquant.kernels import get_backend
    from blockquant.kernels.reference import payload_bytes
    from blockquant.levels import optimal_levels

    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    blocks = [b if b == "row" else int(b) for b in args.blocks.split(",")]
    levels_kinds = args.levels.split(",")
    n = args.n
    gen = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(n, generator=gen, device=device, dtype=torch.float32)
    cases: List[Dict[str, object]] = []
    skipped: List[Dict[str, str]] = []
    for dtype in dtypes:
        x = base.to(dtype)
        x_bytes = n * x.element_size()
        dst = torch.empty_like(x)
        for bits in bits_list:
            for block_spec in blocks:
                block = args.row_width if block_spec == "row" else block_spec
                for levels_kind in levels_kinds:
                    levels = optimal_levels(bits, block) if levels_kind == "optimal" else None
                    for name in backend_names:
                        try:
                            backend = get_backend(device, name)
                        except ValueError as e:
                            skipped.append({"backend": name, "reason": str(e)})
                            continue
                        copy_s = time_median(lambda dst=dst, x=x: dst.copy_(x), device, args.repeats, args.warmup)
                        clone_s = time_median(lambda x=x: x.clone(), device, args.repeats, args.warmup)
                        payload, meta = backend.quantize(x, block, bits, torch.bfloat16, levels, True, 1234)
                        packed = payload_bytes(n, block, bits) + meta.numel() * meta.element_size()
                        # the lambdas bind their tensors now: `del` below frees them within the same scope
                        q_s = time_median(
                            lambda x=x: backend.quantize(x, block, bits, torch.bfloat16, levels, True, 1234),
                            device, args.repeats, args.warmup)
                        d_s = time_median(
                            lambda p=payload, m=meta: backend.dequantize(p, m, n, block, bits, levels, dtype),
                            device, args.repeats, args.warmup)
                        del payload, meta
                        copy_gbps = 2 * x_bytes / copy_s / 1e9
                        for op, secs in (("quantize", q_s), ("dequantize", d_s)):
                            moved_gbps = (x_bytes + packed) / secs / 1e9
                            row = {
                                "backend": name, "op": op, "dtype": str(dtype).replace("torch.", ""),
                                "bits": bits, "block": block_spec, "block_elems": block, "levels": levels_kind,
                                "meta_dtype": "bfloat16", "stochastic": True, "median_s": secs,
                                "input_gbps": x_bytes / secs / 1e9, "moved_gbps": moved_gbps,
                                "copy_median_s": copy_s, "clone_median_s": clone_s, "copy_gbps": copy_gbps,
                                "fraction_of_copy": moved_gbps / copy_gbps,
                                "time_vs_copy": secs / copy_s, "time_vs_clone": secs / clone_s,
                            }
                            cases.append(row)
                            print(f"{name:7s} {row['dtype']:9s} int{bits} {str(block_spec):>5s} {levels_kind:8s} "
                                  f"{op:10s} {secs * 1e3:9.2f} ms  {row['input_gbps']:7.3f} GB/s in  "
                                  f"{moved_gbps:7.3f} GB/s moved  {100 * row['fraction_of_copy']:6.1f}% of copy  "
                                  f"(copy {copy_s * 1e3:.2f} ms, clone {clone_s * 1e3:.2f} ms)", flush=True)
        del x, dst
    return {"cases": cases, "skipped": skipped}


def markdown(results) -> str:
    m = results["machine"]
    lines = [f"# Codec bandwidth on {m.get('gpu') or m.get('cpu')} ({m['device']})", "",
             f"n = {results['n']:,} elements, median of {results['repeats']} calls, stochastic rounding, "
             f"bf16 metadata; torch threads {m['torch_threads']}, load average {m.get('loadavg_1min')} at the "
             f"start and {results.get('loadavg_end')} at the end. Each case's copy was timed right before it.", "",
             "| backend | dtype | bits | block | levels | op | ms | GB/s of input | GB/s moved | % of copy | "
             "time / copy | time / clone |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        lines.append(f"| {c['backend']} | {c['dtype']} | {c['bits']} | {c['block']} | {c['levels']} | {c['op']} | "
                     f"{c['median_s'] * 1e3:.2f} | {c['input_gbps']:.3f} | {c['moved_gbps']:.3f} | "
                     f"{100 * c['fraction_of_copy']:.1f} | {c['time_vs_copy']:.2f} | {c['time_vs_clone']:.2f} |")
    for s in results["skipped"]:
        lines.append(f"\nskipped backend {s['backend']}: {s['reason']}")
    fc = results.get("finite_check")
    if fc:
        lines += ["", f"Finiteness check, {fc['calls']} x quantize of {tuple(fc['shape'])} ({fc['config']}): "
                      f"per call {fc['per_call_check_s'] * 1e3:.2f} ms, deferred {fc['deferred_check_s'] * 1e3:.2f} ms "
                      f"({fc['saved_per_call_us']:.1f} us saved per call)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    backends = args.backends.split(",") if args.backends else None
    # TRITON_INTERPRET is read when triton is imported, so decide before importing torch/blockquant
    if device == "cpu" and backends and "triton" in backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch

    from blockquant.bench.machine import machine_info

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    backends = backends or (["triton"] if device.type == "cuda" else ["torch", "native"])
    if device.type == "cuda" and "triton" in backends and os.environ.get("TRITON_INTERPRET") == "1":
        print("codec_bandwidth: TRITON_INTERPRET=1 would run the CUDA kernels in the interpreter; "
              "rerun with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    info = machine_info(device)
    out = args.out or os.path.join(RESULTS_DIR, f"codec_bandwidth_{device_slug(info)}.json")
    print(f"device {device} ({info.get('gpu', info.get('cpu', '?'))}), backends {backends}, n = {args.n:,}, "
          f"threads {info['torch_threads']}, load {info.get('loadavg_1min')}", flush=True)
    results: Dict[str, object] = {
        "machine": info, "backends": backends, "n": args.n, "row_width": args.row_width, "repeats": args.repeats,
        "warmup": args.warmup, "preset": args.preset,
        "goals": {"gpu_fraction_of_copy_int2_g1024": GOAL_GPU_FRACTION_OF_COPY,
                  "cpu_input_gbps_int2_int4_g1024": GOAL_CPU_INPUT_GBPS},
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
    }
    results.update(run_cases(args, device, backends))
    if args.finite_check:
        results["finite_check"] = finite_check_case(device, args.repeats, args.warmup)
        print("finite check:", json.dumps(results["finite_check"]), flush=True)
    if hasattr(os, "getloadavg"):
        results["loadavg_end"] = round(os.getloadavg()[0], 2)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    md = os.path.splitext(out)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(results))
    print(f"wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
