"""Where the shared real datasets live, for tests.

CI clones the repository with the project's ``shared/`` folder *beside* the
clone, so the default is ``<repo>/../shared``; ``BLOCKQUANT_SHARED`` overrides
it and ``BLOCKQUANT_CORA_RAW`` points at the Cora files directly. Tests that
need the data skip with the path in the reason on a developer machine without
it, and fail under CI (``CI`` set), where a missing dataset is a broken setup,
not a reason to skip accuracy tests.
"""
from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("BLOCKQUANT_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
CORA_RAW = os.environ.get("BLOCKQUANT_CORA_RAW", os.path.join(SHARED, "data", "planetoid", "Cora", "raw"))


def require_cora() -> str:
    """The Cora raw folder; skips (locally) or fails (in CI) when it is missing."""
    if os.path.isfile(os.path.join(CORA_RAW, "ind.cora.x")):
        return CORA_RAW
    msg = f"Cora raw files not found at {CORA_RAW} (set BLOCKQUANT_SHARED or BLOCKQUANT_CORA_RAW)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)
