"""Optional dependencies: which extra brings each, and the one-line error when it is missing.

``convert``, the codec, the functional ops and ``tune`` need only torch and torch-geometric (which brings numpy
and tqdm). The rest is optional:

* ``pip install "blockquant[bench]"``: matplotlib (plots of ``bench --out`` / ``tune --out``), ogb and pandas
  (the ``ogbn-*`` datasets);
* ``pip install "blockquant[gpu]"``: triton (the fused GPU kernels; PyPI's Linux CUDA torch already brings the
  triton it was built with).
"""
import importlib
from types import ModuleType

EXTRA_OF = {"matplotlib": "bench", "ogb": "bench", "pandas": "bench", "triton": "gpu"}
"""The extra of ``setup.py`` that installs each optional top-level package."""


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def install_hint(package: str) -> str:
    return f'pip install "blockquant[{EXTRA_OF[package]}]"'


def require(module: str, purpose: str) -> ModuleType:
    """``import module``, or raise :class:`MissingExtra` saying that ``purpose`` needs it and how to install it."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{purpose} needs {top}, which is not installed: {install_hint(top)}") from None
