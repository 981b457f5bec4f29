"""The peers attnfuse is measured against: ONNX Runtime's transformers optimizer and onnxscript's ORT fusions.

Both are run as a user would run them, on an exported .onnx file, and judged by how
many attention sites they turn into fused attention ops.
"""
from __future__ import annotations

import os
import pathlib
import tempfile

import onnx

from attnfuse.core import registry
from attnfuse.models._export import quiet
from attnfuse.models.zoo import MODEL_KIND

# "ort" runs only ORT's Python fusions (opt_level 0); "ort-O1" first lets ORT's basic
# graph optimizations (constant folding) simplify the graph, as its default does for BERT.
PEERS = ("ort", "ort-O1", "onnxscript")

# The peers need the model's geometry spelled out; the zoo's models all share it.
NUM_HEADS, HIDDEN_SIZE = 4, 64

_ORT_MODEL_TYPE = {"encoder": "bert", "decoder": "gpt2", "vision": "vit"}

def ort_model_type(path: str | os.PathLike) -> str:
    """ORT's model_type for a zoo file, read from its name ("gpt2-dynamo-eager...")."""
    family = pathlib.Path(path).name.split("-")[0]
    return _ORT_MODEL_TYPE[MODEL_KIND.get(family, "encoder")]


def _run_ort(path: str, opt_level: int, **geometry) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(path, opt_level=opt_level, **geometry)
    # Saving is part of the peer's work (it adds the com.microsoft opset import), so go through a file as users do.
    with tempfile.TemporaryDirectory() as folder:
        optimized.save_model_to_file(os.path.join(folder, "optimized.onnx"))
        return onnx.load(os.path.join(folder, "optimized.onnx"))


def _run_onnxscript(path: str) -> onnx.ModelProto:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, _counts = optimize_for_ort(ir.load(path))
    return ir.serde.serialize_model(model)


def peer_fuse(
    path: str | os.PathLike, peer: str, *, model_type: str | None = None,
    num_heads: int = NUM_HEADS, hidden_size: int = HIDDEN_SIZE,
) -> tuple[onnx.ModelProto | None, str | None]:
    """Run one peer on the file at `path`: (optimized model, None), or (None, "Error: message") if it crashed.

    ORT's optimizer must be told the architecture (`model_type`: bert, gpt2, vit..., read
    from a zoo file's name by default) and the geometry (the zoo's by default).
    """
    path = str(path)
    geometry = dict(model_type=model_type or ort_model_type(path), num_heads=num_heads, hidden_size=hidden_size)
    runs = {
        "ort": lambda: _run_ort(path, 0, **geometry),
        "ort-O1": lambda: _run_ort(path, 1, **geometry),
        "onnxscript": lambda: _run_onnxscript(path),
    }
    try:
        with quiet():
            return runs[peer](), None
    except Exception as error:  # a peer's crash is a result to report, not a failure of ours
        return None, describe_error(error)


def count_attention(model: onnx.ModelProto) -> tuple[int, int]:
    """(fused attention ops, attention sites): each fused op stands for one site, each Softmax left for one more.
    A run takes one branch of an If: the branch with more sites counts. A Loop counts its body once."""
    counts = [_count_attention(model.graph.node)] + [_count_attention(f.node) for f in model.functions]
    return sum(fused for fused, _ in counts), sum(total for _, total in counts)


def _count_attention(nodes) -> tuple[int, int]:
    fused = softmax = 0
    for node in nodes:
        fused += registry.is_fused_attention(node.domain, node.op_type)
        softmax += node.domain in ("", "ai.onnx") and node.op_type == "Softmax"
        bodies = [_count_attention(a.g.node) for a in node.attribute if a.g.node]
        if bodies:  # an If runs one branch; a Loop's body is counted once, as the op it loops
            inner_fused, inner_total = max(bodies, key=lambda counts: counts[::-1]) if node.op_type == "If" else \
                [sum(counts) for counts in zip(*bodies)]
            fused, softmax = fused + inner_fused, softmax + inner_total - inner_fused
    return fused, fused + softmax


def ort_session(model: onnx.ModelProto):
    """A CPU session that logs only errors: the peers' outputs make ORT warn about every shape it re-merges."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def validity_error(model: onnx.ModelProto) -> str | None:
    """None if onnx.checker accepts the model and ONNX Runtime (CPU) can load it, else why not."""
    try:
        onnx.checker.check_model(model)
        ort_session(model)
    except Exception as error:
        return describe_error(error)
    return None


def describe_error(error: Exception) -> str:
    """One line for a table or a JSON field: the type and the first line of the message."""
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"[:300]
