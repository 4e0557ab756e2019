"""Codec kernels (installed as ``blockquant.kernels``): a PyTorch reference, a
compiled CPU codec and fused Triton kernels for the same block-wise layout,
chosen by a registry."""
from . import blockwise, native, registry
from .registry import Backend, available_backends, get_backend, register_backend

register_backend(Backend(
    name="torch",
    quantize=blockwise.quantize_torch,
    dequantize=blockwise.dequantize_torch,
    supports=lambda device: True,
    priority=0,
))

# compiled at first use with the system C compiler; unsupported (so never picked) where that fails
register_backend(Backend(
    name="native",
    quantize=native.quantize_native,
    dequantize=native.dequantize_native,
    supports=native.supports,
    priority=10,
    why_unsupported=lambda device: (native.unavailable_reason() if device.type == "cpu"
                                    else "it runs on CPU tensors only"),
))

if getattr(blockwise, "HAS_TRITON", False):  # Triton is optional; the PyTorch backend works everywhere
    register_backend(Backend(
        name="triton",
        quantize=blockwise.quantize_triton,
        dequantize=blockwise.dequantize_triton,
        supports=blockwise.triton_supports,
        priority=20,
        # on CPU the interpreter is a correctness tool, far slower than the other backends
        chosen_by_default=lambda device: device.type == "cuda" or registry.interpreting(),
        why_unsupported=lambda device: "set TRITON_INTERPRET=1 before importing triton to run it on CPU",
    ))

__all__ = ["Backend", "available_backends", "get_backend", "register_backend", "blockwise", "native"]
