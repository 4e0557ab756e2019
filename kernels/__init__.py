"""Codec kernels (installed as ``blockquant.kernels``): the PyTorch reference
(:mod:`~blockquant.kernels.reference`, the semantics every backend matches), the codec compiled for the CPU
(:mod:`~blockquant.kernels.native`) and fused Triton kernels (:mod:`~blockquant.kernels.blockwise`), registered
per device type as the kernels of two ``torch.library`` ops (:mod:`~blockquant.kernels.ops`);
:mod:`~blockquant.kernels.registry` says which backend runs where."""
from . import blockwise, native, ops, reference, registry
from .registry import Backend, available_backends, default_backend, forced_backend, get_backend, register_backend

register_backend(Backend(
    name="torch",
    quantize=reference.quantize_torch,
    dequantize=reference.dequantize_torch,
    supports=lambda device: True,
))

# compiled at first use with the system C compiler; unsupported where that fails
register_backend(Backend(
    name="native",
    quantize=native.quantize_native,
    dequantize=native.dequantize_native,
    supports=native.supports,
    why_unsupported=lambda device: (native.unavailable_reason() if device.type == "cpu"
                                    else "it runs on CPU tensors only"),
))

if blockwise.HAS_TRITON:  # Triton is optional; the PyTorch reference works everywhere
    register_backend(Backend(
        name="triton",
        quantize=blockwise.quantize_triton,
        dequantize=blockwise.dequantize_triton,
        supports=blockwise.triton_supports,
        why_unsupported=lambda device: "set TRITON_INTERPRET=1 before importing triton to run it on CPU",
    ))
    ops.register_device_kernels("cuda", blockwise.quantize_triton, blockwise.dequantize_triton)


# The CPU's default is decided at the call (registry.default_backend): the compiled codec is
# built at its first use, and where that fails the reference runs instead.
def _cpu_quantize(flat, block, bits, meta_dtype, levels, stochastic, seed):
    return default_backend(flat.device).quantize(flat, block, bits, meta_dtype, levels, stochastic, seed)


def _cpu_dequantize(payload, meta, n, block, bits, levels, out_dtype):
    return default_backend(payload.device).dequantize(payload, meta, n, block, bits, levels, out_dtype)


ops.register_device_kernels("cpu", _cpu_quantize, _cpu_dequantize)

__all__ = ["Backend", "available_backends", "default_backend", "forced_backend", "get_backend", "register_backend",
           "blockwise", "native", "ops", "reference", "registry"]
