"""attnfuse: recognise attention by what it computes, and fuse it."""
from attnfuse.optimizer.api import OptimizeResult, inspect_onnx, optimize_onnx
from attnfuse.optimizer.config import OptimizeConfig
from attnfuse.optimizer.report import Report
from attnfuse.optimizer.torch_api import OptimizedModule, optimize

__all__ = ["optimize", "optimize_onnx", "inspect_onnx", "OptimizeConfig", "OptimizeResult", "OptimizedModule", "Report"]
__version__ = "0.1.0"
