"""Root pytest configuration.

TRITON_INTERPRET must be set before triton is first imported (and
``import torch_geometric`` imports triton), so it is set here, at the very top,
before any test module is collected. It lets the Triton kernels run on CPU tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
