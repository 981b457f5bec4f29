"""attnfuse: recognise attention by what it computes, and fuse it."""
from attnfuse.optimizer.api import OptimizeResult, inspect_onnx, optimize_onnx
from attnfuse.optimizer.config import OptimizeConfig
from attnfuse.optimizer.report import Report

__all__ = ["optimize_onnx", "inspect_onnx", "OptimizeConfig", "OptimizeResult", "Report"]
__version__ = "0.1.0"
