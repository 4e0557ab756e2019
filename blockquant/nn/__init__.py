"""Compressed drop-in replacements for torch and PyG modules."""
from .registry import WRAPPERS, CompressedModule, register_wrapper, wrapper_for

__all__ = ["WRAPPERS", "CompressedModule", "register_wrapper", "wrapper_for"]
from .basic import (QELU, QGELU, QBatchNorm1d, QDropout, QLayerNorm, QLeakyReLU, QLinear,  # noqa: E402
                    QPyGBatchNorm, QPyGLinear, QReLU)

__all__ += ["QLinear", "QPyGLinear", "QBatchNorm1d", "QPyGBatchNorm", "QLayerNorm", "QReLU", "QLeakyReLU",
            "QELU", "QGELU", "QDropout"]
from .conv import QGATConv, QGATv2Conv, QGCN2Conv, QGCNConv, QGINConv, QGraphConv, QSAGEConv  # noqa: E402

__all__ += ["QGCNConv", "QSAGEConv", "QGATConv", "QGATv2Conv", "QGINConv", "QGraphConv", "QGCN2Conv"]
