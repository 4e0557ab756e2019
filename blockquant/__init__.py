"""blockquant: train graph neural networks with activations stored in block-wise low-bit form.

The forward pass is exact; tensors saved for backward are compressed (1, 2, 4
or 8 bits per element, unbiased stochastic rounding, optional seeded random
projection) and decompressed on demand in backward.
"""
from .config import ROW, QuantConfig
from .levels import optimal_levels
from .packed import PackedTensor, defer_finite_check, dequantize, quantize
from .conversion import ConversionWarning, ProjectionWarning, convert, summary, to_original
from .memory import SavedMemory, track_saved
from . import functional, save_policy
from .adjacency import Adjacency, as_adjacency
from .saved_hooks import compress_saved_tensors
from .plan import Plan
from .tune import TuneError, TuneResult, tune
from .noise import NoiseReport, noise_report

__version__ = "0.2.0"  # the one place; setup.py reads it from here, CHANGELOG.md says what changed

# The function ``convert`` is ``blockquant.convert``; the module that defines it is ``blockquant.conversion``.
__all__ = [
    "__version__",
    # codec
    "QuantConfig", "ROW", "PackedTensor", "quantize", "dequantize", "defer_finite_check", "optimal_levels",
    # converting a model
    "convert", "to_original", "summary", "ConversionWarning", "ProjectionWarning", "Plan", "tune", "TuneResult",
    "TuneError",
    # memory, and gradient noise against dropout's
    "track_saved", "SavedMemory", "compress_saved_tensors", "noise_report", "NoiseReport",
    # functional building blocks, and the rule for what they keep for backward
    "functional", "save_policy", "Adjacency", "as_adjacency",
]
