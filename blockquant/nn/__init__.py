"""Compressed drop-in replacements for torch and PyG modules."""
from .registry import WRAPPERS, CompressedModule, register_wrapper
from .basic import (QELU, QGELU, QBatchNorm1d, QDropout, QLayerNorm, QLeakyReLU, QLinear, QPyGBatchNorm,
                    QPyGLinear, QReLU)
from .conv import QGATConv, QGATv2Conv, QGCN2Conv, QGCNConv, QGINConv, QGraphConv, QSAGEConv

__all__ = ["WRAPPERS", "CompressedModule", "register_wrapper",
           "QLinear", "QPyGLinear", "QBatchNorm1d", "QPyGBatchNorm", "QLayerNorm", "QReLU", "QLeakyReLU",
           "QELU", "QGELU", "QDropout",
           "QGCNConv", "QSAGEConv", "QGATConv", "QGATv2Conv", "QGINConv", "QGraphConv", "QGCN2Conv"]
