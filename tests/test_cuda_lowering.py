"""The CUDA target: PackedMultiHeadAttention where its constraints hold (key padding, no
other bias). No GPU with onnxruntime-gpu is available here, so the graph is checked with
onnx.checker and against ONNX Runtime's own operator schemas, not run."""
from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

import attnfuse
from attnfuse.models import zoo

ENCODERS = [c for c in zoo.ZOO if c.kind == "encoder" and c.attention == "sdpa"]


def schema_error(proto: onnx.ModelProto) -> str:
    """Load with the CPU provider: ORT resolves the graph, infers types with its contrib
    schemas, and only then looks for kernels. Returns what it stopped at."""
    try:
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as error:
        return str(error)
    return ""


@pytest.mark.parametrize("case", ENCODERS, ids=lambda c: c.id)
def test_encoders_get_packed_attention(case):
    result = attnfuse.optimize_onnx(str(zoo.exported(case)), target="ort-cuda")
    assert result.report.verify.ok  # verified in the CPU form of the same rewrites
    assert result.report.fused_ops.get("PackedMultiHeadAttention") == result.report.attention_total == 2
    assert "MultiHeadAttention" not in result.report.fused_ops
    proto = result.proto
    onnx.checker.check_model(proto, full_check=True)
    error = schema_error(proto)
    # Everything but the CUDA kernel itself passed ORT's checks.
    assert "Could not find an implementation for PackedMultiHeadAttention" in error


@pytest.mark.parametrize("family", ["gpt2", "bloom"])
def test_causal_attention_stays_unpacked_on_cuda(family):
    """PackedMultiHeadAttention has no causal mask: decoders keep MultiHeadAttention."""
    result = attnfuse.optimize_onnx(str(zoo.exported(zoo.ZooCase(family, "dynamo", "eager"))), target="ort-cuda")
    assert "PackedMultiHeadAttention" not in result.report.fused_ops
    assert result.report.fused_ops["MultiHeadAttention"] == 2
    assert schema_error(result.proto) == ""  # runs on the CPU as it is
