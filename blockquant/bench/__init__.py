"""``blockquant bench``: datasets, models, the runner and its reports.

Import-light on purpose: ``blockquant.cli`` pulls these modules in only when
the bench command runs.
"""
from .errors import BenchError

__all__ = ["BenchError"]
