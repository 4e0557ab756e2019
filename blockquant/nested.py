"""Finding the tensors inside nested arguments and outputs (lists, tuples, sets, dicts, PyG ``Data``).

One walk for the two places that need it: :func:`blockquant.convert`'s pre-hook, which marks a model's inputs
resident, and :func:`blockquant.track_saved`, which collects outputs and exclusions.
"""
from __future__ import annotations

from typing import Any, List

import torch

MAX_DEPTH = 6


def flatten_tensors(obj: Any, out: List[torch.Tensor], depth: int = 0) -> None:
    """Append to ``out`` every tensor in ``obj``: tensors, containers of them (``MAX_DEPTH`` levels deep), PyG
    ``Data``/``HeteroData`` (through ``to_dict()``) and holders of storage such as ``PackedTensor``
    (through ``storages()``)."""
    if depth > MAX_DEPTH or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            flatten_tensors(v, out, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            flatten_tensors(v, out, depth + 1)
    elif hasattr(obj, "to_dict") and callable(obj.to_dict):  # torch_geometric Data / HeteroData
        try:
            flatten_tensors(obj.to_dict(), out, depth + 1)
        except Exception:  # not a PyG data object after all
            pass
    elif hasattr(obj, "storages") and callable(obj.storages):
        flatten_tensors(tuple(obj.storages()), out, depth + 1)
