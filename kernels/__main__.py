"""``python -m blockquant.kernels [--build]``: which codec backend compresses CPU tensors here, and why.

``--build`` compiles the C codec into its cache now (what the first training step
would otherwise do, 10-30 s), e.g. while building a container image or once on
a cluster's login node, and exits with status 1 and the reason where it cannot.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blockquant.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true",
                        help="compile the C codec into its cache directory now; exit 1 with the reason if it fails")
    args = parser.parse_args(argv)

    from . import get_backend, native

    if args.build:
        try:
            path = native.build()
        except RuntimeError as e:
            print(f"blockquant: {e}", file=sys.stderr)
            return 1
        print(f"blockquant: the compiled CPU codec is built and passed its self-check: {path}")
        return 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", native.CodecFallbackWarning)  # the reason is printed below
        chosen = get_backend(torch.device("cpu")).name
        path, reason = native.library_path(), native.unavailable_reason()
    print(f"CPU tensors are compressed by the {chosen!r} backend")
    print(f"compiled CPU codec: {path}" if path else f"compiled CPU codec unavailable: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
