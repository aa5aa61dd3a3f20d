"""Capture and the graph view every pass works through (FX and ONNX adapters, layer specs)."""
from .errors import TensorfoldError
from .fx_graph import FxGraph, capture
from .graph import GRAPH_OUTPUT, Graph, Layer, TensorInfo
from .onnx_graph import OnnxGraph, load

__all__ = ["GRAPH_OUTPUT", "FxGraph", "Graph", "Layer", "OnnxGraph", "TensorInfo", "TensorfoldError", "capture", "load"]
