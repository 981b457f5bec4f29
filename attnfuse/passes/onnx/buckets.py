"""Attention on packed tokens in standard ONNX ops: the sequences in a few buckets of similar length.

A runtime without a variable-length attention op (OpenVINO) would otherwise run attention on the
padded batch, or one sequence at a time in a Loop (which OpenVINO 2026.4 mis-runs: a Loop that carries
a sequence of tensors crashes it or returns wrong shapes). Instead the rows are sorted by length and
cut into BUCKETS groups; each group's tokens are gathered from the packed rows into [rows, width, hidden],
width its own longest row, and run through one Attention-23 with its own key mask. The groups' outputs
are concatenated and gathered back into packed order. Padding then costs attention only within a
bucket, and no Loop or sequence op is needed.

Once per graph (`plan`, from the row lengths):
    order = rows by length, longest first (TopK); bucket g = order[g*R : (g+1)*R], R = ceil(B / BUCKETS)
            (BUCKETS rows of length 0 go after the real ones, so that no bucket is empty)
    per bucket: its width w (at least 1), the packed row each of its [n, w] slots reads (row 0 where the
            slot is padding), its key mask [n, 1, w, w] (expanded over the queries: ONNX Runtime takes
            no other)
    back: where each packed token's slot is among the buckets' concatenated slots
Per attention (`attention`): per bucket, Gather q, k and v -> [n, w, hidden], Attention-23, [n * w, hidden];
Concat; Gather(back).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from attnfuse.kernels.onnx_forms import STANDARD_ATTENTION
from attnfuse.passes.onnx.graph import Builder

# Measured on MiniLM and BERT-base in OpenVINO (2 threads; batch 32 and 16, lengths uniform in [8, 128]):
# 4 buckets ran the varlen batch as fast as 8 and faster than 2, with half the attention calls of 8.
BUCKETS = 4
Value = ir.Value


@dataclass(frozen=True)
class Bucket:
    slots: Value  # int64 [n, w]: the packed row each slot reads
    mask: Value  # bool [n, 1, w, w]: the keys each query sees (its row's real tokens)


@dataclass(frozen=True)
class Buckets:
    buckets: tuple[Bucket, ...]
    back: Value  # int64 [tokens]: packed token t is slot back[t] of the buckets' concatenated slots


def plan(b: Builder, lengths: Value, count: int = BUCKETS) -> Buckets:
    """The buckets of a batch whose rows have `lengths` real tokens ([B], any integer type), packed row
    after row."""
    lengths = b.op("Cast", [lengths], {"to": ir.DataType.INT64})
    starts = b.op("CumSum", [lengths, b.const(0, np.int64)], {"exclusive": 1})
    batch = b.op("Shape", [lengths])
    order = b.op("TopK", [lengths, batch], {"largest": 1, "sorted": 1}, num_outputs=2)[1]
    # `count` rows of length 0 after the real ones: every bucket has a row, whatever the batch size
    none = b.const(np.zeros(count, np.int64))
    lengths, starts = (b.op("Concat", [x, none], {"axis": 0}) for x in (lengths, starts))
    order = b.op("Concat", [order, b.op("Add", [batch, b.const(np.arange(count, dtype=np.int64))])], {"axis": 0})
    per_bucket = b.op("Div", [b.op("Add", [batch, b.const([count - 1], np.int64)]), b.const([count], np.int64)])
    buckets, valid = [], []
    for g in range(count):
        rows = b.op("Slice", [order, b.op("Mul", [per_bucket, b.const([g], np.int64)]),
                              b.op("Mul", [per_bucket, b.const([g + 1], np.int64)])])
        bucket, real = _bucket(b, b.op("Gather", [lengths, rows]), b.op("Gather", [starts, rows]))
        buckets.append(bucket)
        valid.append(b.op("Reshape", [real, b.const([-1], np.int64)]))
    slots = b.op("Concat", [b.op("Reshape", [bucket.slots, b.const([-1], np.int64)]) for bucket in buckets], {"axis": 0})
    real_slots = b.op("Reshape", [b.op("NonZero", [b.op("Concat", valid, {"axis": 0})]), b.const([-1], np.int64)])
    tokens = b.op("ReduceSum", [lengths, b.const([0], np.int64)], {"keepdims": 1})
    back = b.op("ScatterElements", [b.op("ConstantOfShape", [tokens], {"value": ir.tensor(np.zeros(1, np.int64))}),
                                    b.op("Gather", [slots, real_slots]), real_slots], {"axis": 0})
    return Buckets(tuple(buckets), back)


def _bucket(b: Builder, lengths: Value, starts: Value) -> tuple[Bucket, Value]:
    """One bucket of rows of `lengths` real tokens starting at packed rows `starts`; and its bool [n, w]
    real slots."""
    longest = b.op("ReduceMax", [lengths], {"keepdims": 0})
    width = b.op("Max", [longest, b.const(1, np.int64)])
    positions = b.op("Range", [b.const(0, np.int64), width, b.const(1, np.int64)])
    column = b.const([1], np.int64)
    real = b.op("Less", [positions, b.op("Unsqueeze", [lengths, column])])  # [n, w]
    rows = b.op("Add", [b.op("Unsqueeze", [starts, column]), positions])
    slots = b.op("Where", [real, rows, b.const(0, np.int64)])
    over_queries = b.op("Concat", [b.const([1, 1], np.int64), b.op("Unsqueeze", [width, b.const([0], np.int64)]),
                                   b.const([1], np.int64)], {"axis": 0})
    mask = b.op("Expand", [b.op("Unsqueeze", [real, b.const([1, 2], np.int64)]), over_queries])
    return Bucket(slots, mask), real


def attention(b: Builder, plan: Buckets, q: Value, k: Value, v: Value, attributes: dict) -> Value:
    """Attention-23 (with `attributes`: heads, scale) of packed q, k, v [tokens, hidden] over each token's
    own row: [tokens, hidden of v]."""
    outputs = []
    for bucket in plan.buckets:
        # [n, w, hidden] by one Gather: ONNX's shape inference then knows the hidden size (of Attention-23's
        # output it infers 0 where v's is not known)
        q_b, k_b, v_b = (b.op("Gather", [x, bucket.slots]) for x in (q, k, v))
        attended = b.op(STANDARD_ATTENTION.op_type,
                        STANDARD_ATTENTION.arguments(query=q_b, key=k_b, value=v_b, attn_mask=bucket.mask), attributes)
        outputs.append(b.op("Flatten", [attended], {"axis": 2}))
    return b.op("Gather", [b.op("Concat", outputs, {"axis": 0}), plan.back])
