"""onnx-lowrank: factorize the weights of an ONNX model into low-rank chains, exactly at full rank."""

from .api import Options, compress, compress_file
from .errors import BoundNotMet, InputError
from .report import LayerReport, Report, SkippedLayer, Validation
from .run.inspection import LayerInfo, inspect

__all__ = [
    "BoundNotMet",
    "InputError",
    "LayerInfo",
    "LayerReport",
    "Options",
    "Report",
    "SkippedLayer",
    "Validation",
    "compress",
    "compress_file",
    "inspect",
]
