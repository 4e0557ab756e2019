"""Codec kernels (installed as ``blockquant.kernels``): a PyTorch reference and
fused Triton kernels for the same block-wise layout, chosen by a registry."""
from . import blockwise, registry
from .registry import Backend, available_backends, get_backend, register_backend

register_backend(Backend(
    name="torch",
    quantize=blockwise.quantize_torch,
    dequantize=blockwise.dequantize_torch,
    supports=lambda device: True,
))

if getattr(blockwise, "HAS_TRITON", False):  # Triton is optional; the PyTorch backend works everywhere
    register_backend(Backend(
        name="triton",
        quantize=blockwise.quantize_triton,
        dequantize=blockwise.dequantize_triton,
        supports=blockwise.triton_supports,
    ))

__all__ = ["Backend", "available_backends", "get_backend", "register_backend", "blockwise"]
