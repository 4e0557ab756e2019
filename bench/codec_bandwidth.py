"""Codec bandwidth vs. device copy bandwidth (meant for a CUDA machine).

Measures, on one device:

* copy bandwidth: ``dst.copy_(src)`` of a large float32 tensor, counted as
  bytes read + bytes written;
* quantize and dequantize of ``--n`` float32 elements (64M by default) for
  INT2 with G=1024 (uniform and optimal levels) and INT2 row mode (one block
  per row of ``--row-width`` columns; 16 = a 128-wide hidden layer projected
  with ratio 8), counted the same way: input read + payload and metadata
  written for quantize, the reverse for dequantize.

Each figure is the median over ``--repeats`` timed calls after warm-up. The
goal for the Triton kernels is at least 70% of copy bandwidth. Results are
printed and written as JSON to ``--out``.

Typical use on a GPU machine (the interpreter must be OFF)::

    TRITON_INTERPRET=0 python bench/codec_bandwidth.py --out bench/results/codec_bandwidth_cuda.json

On a CPU-only machine, ``--device cpu --backend torch`` checks that the script
works (the numbers say nothing about the GPU goal).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

GOAL_FRACTION_OF_COPY = 0.70


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="path of the JSON file to write")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--backend", default=None, choices=["triton", "torch"],
                   help="codec backend (default: triton on cuda, torch on cpu)")
    p.add_argument("--n", type=int, default=64 * 1024 * 1024, help="elements per tensor (default 64M)")
    p.add_argument("--row-width", type=int, default=16, help="columns per row for the row-mode case (default 16)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    args = p.parse_args(argv)
    if args.n < 1 or args.repeats < 1 or args.warmup < 0 or args.row_width < 1:
        p.error(f"--n, --repeats, --row-width must be >= 1 and --warmup >= 0; got n={args.n}, "
                f"repeats={args.repeats}, row_width={args.row_width}, warmup={args.warmup}")
    return args


def machine_info(device) -> Dict[str, object]:
    """Versions and hardware, so results from different machines are never mixed up."""
    import torch

    info: Dict[str, object] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": str(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if hasattr(os, "getloadavg"):
        # a shared machine's load explains noisy CPU timings
        info["loadavg_1min"] = round(os.getloadavg()[0], 2)
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


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


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    # TRITON_INTERPRET is read when triton is imported, so decide before importing torch/blockquant
    if device == "cpu" and args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch

    from blockquant.kernels import get_backend
    from blockquant.kernels.blockwise import payload_bytes
    from blockquant.levels import optimal_levels

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    backend_name = args.backend or ("triton" if device.type == "cuda" else "torch")
    if device.type == "cuda" and backend_name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        print("codec_bandwidth: TRITON_INTERPRET=1 would run the CUDA kernels in the interpreter; "
              "rerun with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    backend = get_backend(device, backend_name)

    n = args.n
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, generator=gen, device=device, dtype=torch.float32)
    x_bytes = x.numel() * x.element_size()

    copy_dst = torch.empty_like(x)
    copy_s = time_median(lambda: copy_dst.copy_(x), device, args.repeats, args.warmup)
    copy_gbps = 2 * x_bytes / copy_s / 1e9
    del copy_dst

    results = {
        "machine": machine_info(device),
        "backend": backend_name,
        "n": n,
        "repeats": args.repeats,
        "goal_fraction_of_copy": GOAL_FRACTION_OF_COPY,
        "copy": {"bytes": 2 * x_bytes, "median_s": copy_s, "gbps": copy_gbps},
        "cases": [],
    }
    print(f"device {device} ({results['machine'].get('gpu', results['machine'].get('cpu_model', '?'))}), "
          f"backend {backend_name}, n = {n:,}")
    print(f"copy: {copy_gbps:8.3g} GB/s  ({copy_s * 1e3:.3f} ms)")

    cases = [("int2-G1024-uniform", 2, 1024, "uniform"),
             ("int2-G1024-optimal", 2, 1024, "optimal"),
             (f"int2-row{args.row_width}-uniform", 2, args.row_width, "uniform")]
    for name, bits, block, levels_kind in cases:
        levels = optimal_levels(bits, block) if levels_kind == "optimal" else None
        payload, meta = backend.quantize(x, block, bits, torch.bfloat16, levels, True, 1234)
        packed_bytes = payload_bytes(n, block, bits) + meta.numel() * meta.element_size()
        moved = x_bytes + packed_bytes
        q_s = time_median(lambda: backend.quantize(x, block, bits, torch.bfloat16, levels, True, 1234),
                          device, args.repeats, args.warmup)
        d_s = time_median(lambda: backend.dequantize(payload, meta, n, block, bits, levels, torch.float32),
                          device, args.repeats, args.warmup)
        for op, secs in (("quantize", q_s), ("dequantize", d_s)):
            gbps = moved / secs / 1e9
            frac = gbps / copy_gbps
            results["cases"].append({
                "name": name, "op": op, "bits": bits, "block": block, "levels": levels_kind,
                "meta_dtype": "bfloat16", "stochastic": True, "bytes": moved, "median_s": secs,
                "gbps": gbps, "fraction_of_copy": frac, "meets_goal": frac >= GOAL_FRACTION_OF_COPY,
            })
            print(f"{name:22s} {op:10s} {gbps:8.3g} GB/s  ({secs * 1e3:.3f} ms)  "
                  f"{100 * frac:5.1f}% of copy{'' if frac >= GOAL_FRACTION_OF_COPY else '  < goal'}")
        del payload, meta

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
