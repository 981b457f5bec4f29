"""The public API: optimize_onnx, inspect_onnx, and what they return."""
from attnfuse.optimizer.api import OptimizeResult, inspect_onnx, optimize_onnx

__all__ = ["OptimizeResult", "inspect_onnx", "optimize_onnx"]
