"""Compressed drop-in replacements for torch and PyG modules."""
from .registry import WRAPPERS, CompressedModule, register_wrapper, wrapper_for

__all__ = ["WRAPPERS", "CompressedModule", "register_wrapper", "wrapper_for"]
