"""Which fused op runs a decoder's attention fastest on ONNX Runtime's CPU provider?

One attention of the benchmark Llama (16 query heads, 4 kv heads, head size 64) with its KV
cache, in the two exact forms attnfuse can write:

- MultiHeadAttention: the cache concatenated with the new k and v in the graph, both repeated to
  every query head (Unsqueeze, Expand, Reshape), the mask as attention_bias;
- GroupQueryAttention: the new k and v and the cache as they are (the op appends the cache and
  shares each kv head among its query heads), the same attention_bias.

Workloads as in `attnfuse bench --model llama`: prefill (16 prompts left padded to 256 tokens, no
cache) and decode (batch 8, one new token over a cache of 512). Both outputs and present k/v are
checked equal; 2 threads, median of interleaved runs.

    python -m benchmarks.attention_lowering [--repeats 30]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from attnfuse.tools.timing import interleaved_medians, ort_session, table

HEADS, KV_HEADS, HEAD_SIZE = 16, 4, 64
WORKLOADS = {"prefill 16 x 256": (16, 256, 0), "decode 8 x 1, past 512": (8, 1, 512)}  # batch, new, past
FLOAT = TensorProto.FLOAT


def _model(nodes, inputs, initializers) -> onnx.ModelProto:
    outputs = [helper.make_tensor_value_info(name, FLOAT, None) for name in ("out", "present_k", "present_v")]
    graph = helper.make_graph(nodes, "attention", inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _inputs(batch: int, new: int, past: int) -> list:
    total = past + new
    shapes = {"q": [batch, new, HEADS * HEAD_SIZE], "k": [batch, new, KV_HEADS * HEAD_SIZE],
              "v": [batch, new, KV_HEADS * HEAD_SIZE], "past_k": [batch, KV_HEADS, past, HEAD_SIZE],
              "past_v": [batch, KV_HEADS, past, HEAD_SIZE], "bias": [batch, 1, new, total]}
    return [helper.make_tensor_value_info(name, FLOAT, shape) for name, shape in shapes.items()]


def multi_head_attention(batch: int, new: int, past: int) -> onnx.ModelProto:
    const = lambda name, values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    nodes = []
    for x in ("k", "v"):
        nodes += [helper.make_node("Reshape", [x, "split"], [f"{x}4"]),
                  helper.make_node("Transpose", [f"{x}4"], [f"{x}_heads"], perm=[0, 2, 1, 3]),
                  helper.make_node("Concat", [f"past_{x}", f"{x}_heads"], [f"present_{x}"], axis=2),
                  helper.make_node("Unsqueeze", [f"present_{x}", "axis2"], [f"{x}5"]),
                  helper.make_node("Expand", [f"{x}5", "repeat"], [f"{x}_expanded"]),
                  helper.make_node("Reshape", [f"{x}_expanded", "all_heads"], [f"{x}_all"])]
    nodes.append(helper.make_node("MultiHeadAttention", ["q", "k_all", "v_all", "", "", "bias"], ["out"],
                                  domain="com.microsoft", num_heads=HEADS))
    initializers = [const("split", [0, 0, KV_HEADS, HEAD_SIZE]), const("axis2", [2]),
                    const("repeat", [1, 1, HEADS // KV_HEADS, 1, 1]), const("all_heads", [0, HEADS, -1, HEAD_SIZE])]
    return _model(nodes, _inputs(batch, new, past), initializers)


def group_query_attention(batch: int, new: int, past: int) -> onnx.ModelProto:
    i32 = lambda name, values: numpy_helper.from_array(np.array(values, np.int32), name)  # noqa: E731
    total = past + new
    # As attnfuse writes it for a file with a cache (a prefill has one of length 0): every row's
    # keys counted whole and its new tokens given, causal from the end, the bias masking the rest.
    inputs = ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total_length", "", "", "", "bias",
              "", "", "", "", "", "query_lengths"]
    node = helper.make_node("GroupQueryAttention", inputs, ["out", "present_k", "present_v"], domain="com.microsoft",
                            num_heads=HEADS, kv_num_heads=KV_HEADS, causal=1)
    initializers = [i32("seqlens_k", [total - 1] * batch), i32("total_length", total), i32("query_lengths", [new] * batch)]
    return _model([node], _inputs(batch, new, past), initializers)


def feeds(batch: int, new: int, past: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The inputs, and which new tokens are real (bool [batch, new])."""
    rng = np.random.default_rng(seed)
    total = past + new
    lengths = rng.integers(16, total + 1, batch)  # left padded: each row's real tokens end the row
    real = np.arange(total)[None, :] >= (total - lengths)[:, None]
    causal = np.arange(total)[None, :] <= (past + np.arange(new))[:, None]
    allowed = real[:, None, None, :] & causal[None, None]
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return {"q": normal(batch, new, HEADS * HEAD_SIZE), "k": normal(batch, new, KV_HEADS * HEAD_SIZE),
            "v": normal(batch, new, KV_HEADS * HEAD_SIZE), "past_k": normal(batch, KV_HEADS, past, HEAD_SIZE),
            "past_v": normal(batch, KV_HEADS, past, HEAD_SIZE),
            "bias": np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)}, real[:, past:]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    rows = []
    for workload, shape in WORKLOADS.items():
        sessions = {"MultiHeadAttention (concat + repeat)": ort_session(multi_head_attention(*shape), threads=2),
                    "GroupQueryAttention": ort_session(group_query_attention(*shape), threads=2)}
        inputs, real = feeds(*shape)
        (out, *presents), (other, *other_presents) = (session.run(None, inputs) for session in sessions.values())
        # at real tokens: a padded query has no key to attend to, and the two ops fill it differently
        error = max(float(np.abs(a - b).max()) for a, b in [(out[real], other[real]), *zip(presents, other_presents)])
        medians = interleaved_medians({name: (lambda s=s: s.run(None, inputs)) for name, s in sessions.items()},
                                      repeats=args.repeats, warmup=3, desc=workload)
        base = medians["MultiHeadAttention (concat + repeat)"]
        rows += [[workload, name, f"{ms * 1e3:.2f}", f"{base / ms:.2f}x", f"{error:.1e}"] for name, ms in medians.items()]
    print(table(["workload", "form", "median ms", "speedup", "max abs difference (real tokens)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
