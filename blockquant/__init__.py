"""blockquant: train graph neural networks with activations stored in block-wise low-bit form.

The forward pass is exact; tensors saved for backward are compressed (1, 2, 4
or 8 bits per element, unbiased stochastic rounding, optional seeded random
projection) and decompressed on demand in backward.
"""
from .config import ROW, QuantConfig
from .levels import optimal_levels
from .packed import PackedTensor, defer_finite_check, dequantize, quantize

__version__ = "0.2.0"  # the one place; setup.py reads it from here, CHANGELOG.md says what changed

__all__ = ["QuantConfig", "ROW", "PackedTensor", "quantize", "dequantize", "defer_finite_check", "optimal_levels",
           "__version__"]
from .convert import convert, summary, to_original  # noqa: E402
from .memory import track_saved  # noqa: E402

__all__ += ["convert", "to_original", "summary", "track_saved"]
from . import functional  # noqa: E402
from .adjacency import Adjacency, as_adjacency  # noqa: E402
from .saved_hooks import compress_saved_tensors  # noqa: E402

__all__ += ["functional", "Adjacency", "as_adjacency", "compress_saved_tensors"]
from .plan import Plan  # noqa: E402
from .tune import TuneError, TuneResult, tune  # noqa: E402

__all__ += ["Plan", "tune", "TuneResult", "TuneError"]
