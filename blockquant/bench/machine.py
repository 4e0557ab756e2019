"""What a benchmark ran on, recorded with its results so that figures from different machines are never mixed up.

One home for it: ``blockquant bench`` (``results.json``) and the scripts in ``bench/`` call :func:`machine_info`.
"""
from __future__ import annotations

import os
import platform
from typing import Dict


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device) -> Dict[str, object]:
    """Hardware, thread counts, load and versions of the process running on ``device``."""
    import torch

    info: Dict[str, object] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        pass
    if hasattr(os, "getloadavg"):  # a shared machine's load explains noisy CPU timings
        info["loadavg_1min"] = round(os.getloadavg()[0], 2)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info
