"""Attention in standard ONNX ops whose memory grows linearly with the sequence length.

- `windowed`: each query block of C tokens attends to the keys within reach of
  it (C + 2 x window keys), masked to the exact band, plus optional
  global tokens that attend to and are attended by all. Exact for a banded mask.
- `linear`: phi(q) (phi(k)^T v) / (phi(q) sum phi(k)), with phi = elu + 1 or FAVOR+
  random features; causal through cumulative sums.
- `linformer`: keys and values projected along the sequence to K rows.

All take q, k, v as [batch, seq, heads*head_size] (or [batch, seq, heads, head_size])
and return [batch, seq, heads*head_size]. `key_real` is a bool [batch, keys] or None.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attnfuse.kernels.onnx_forms import MULTI_HEAD_ATTENTION
from attnfuse.kernels.reference import favor_features
from attnfuse.passes.onnx.graph import Builder
from attnfuse.passes.onnx.spelling import OnnxBuilder


class Heads:
    """Head split and merge, and a few shape helpers, for one site."""

    def __init__(self, b: Builder, heads: int, head_size: int, dtype):
        self.b, self.heads, self.head_size, self.dtype = b, heads, head_size, np.dtype(dtype)

    def split(self, x: ir.Value) -> ir.Value:
        """-> [B, H, S, D]"""
        b = self.b
        x = b.op("Reshape", [x, b.const([0, 0, self.heads, self.head_size], np.int64)])
        return b.op("Transpose", [x], {"perm": [0, 2, 1, 3]})

    def merge(self, x: ir.Value) -> ir.Value:
        b = self.b
        x = b.op("Transpose", [x], {"perm": [0, 2, 1, 3]})
        return b.op("Reshape", [x, b.const([0, 0, self.heads * self.head_size], np.int64)])

    def scalar(self, value: float) -> ir.Value:
        return self.b.const(np.array(value, self.dtype))

    def lowest(self) -> ir.Value:
        return self.scalar(np.finfo(self.dtype).min)

    def transpose_last(self, x: ir.Value, rank: int) -> ir.Value:
        perm = list(range(rank))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return self.b.op("Transpose", [x], {"perm": perm})

    def dim(self, x: ir.Value, axis: int) -> ir.Value:
        """x.shape[axis] as a 1-element int64 tensor."""
        return self.b.op("Shape", [x], {"start": axis, "end": axis + 1})

    def key_weights(self, key_real: ir.Value) -> ir.Value:
        """[B, 1, T, 1] of 1.0 for real keys, 0.0 for padding."""
        b = self.b
        weights = b.op("Cast", [key_real], {"to": ir.DataType.from_numpy(self.dtype)})
        return b.op("Unsqueeze", [weights, b.const([1, 3], np.int64)])


def windowed(b: OnnxBuilder, q, k, v, *, heads: int, head_size: int, scale: float, left: int, right: int,
             causal: bool, global_tokens: int, key_real, dtype) -> ir.Value:
    h = Heads(b, heads, head_size, dtype)
    band = Band(b, h.dim(q, 1), reach=max(left, right, 1))
    if not global_tokens:
        return _windowed_mha(b, h, band, q, k, v, scale, left, right, causal, key_real)
    qh, kh, vh = h.split(q), h.split(k), h.split(v)
    query_blocks = band.blocks_of(qh, axis=2, width=head_size)
    keys, values = (band.neighbourhoods(x, axis=2, rank=4) for x in (kh, vh))
    scores = b.op("Mul", [b.op("MatMul", [query_blocks, h.transpose_last(keys, 5)]), h.scalar(scale)])
    seen = band.seen(left, right, causal, global_tokens, key_real, head_axis=1)  # [B|1, 1, nb, C, span]
    scores = b.op("Where", [seen, scores, h.lowest()])
    scores, values = _add_global_keys(b, h, scores, values, query_blocks, kh, vh, band.query_pos,
                                      global_tokens, causal, key_real, scale)
    out = b.op("MatMul", [b.op("Softmax", [scores], {"axis": -1}), values])
    out = b.op("Reshape", [out, b.const([0, 0, -1, head_size], np.int64)])
    out = b.op("Slice", [out, b.const([0], np.int64), band.seqlen, b.const([2], np.int64)])
    out = _global_queries(b, h, out, qh, kh, vh, global_tokens, causal, key_real, scale)
    return h.merge(out)


def _windowed_mha(b: OnnxBuilder, h: Heads, band: Band, q, k, v, scale, left, right, causal, key_real) -> ir.Value:
    """Blocks as the batch of ONNX Runtime's fused MultiHeadAttention: [B*nb, C] queries over
    [B*nb, span] keys, the band as its attention_bias. No head transposes, no score tensors
    of ours: several times faster on the CPU than MatMul, Where and Softmax."""
    hidden = h.heads * h.head_size
    flat = [b.op("Reshape", [x, b.const([0, 0, hidden], np.int64)]) for x in (q, k, v)]
    queries = band.blocks_of(flat[0], axis=1, width=hidden)  # [B, nb, C, hidden]
    keys, values = (band.neighbourhoods(x, axis=1, rank=3) for x in flat[1:])  # [B, nb, span, hidden]
    # The band is the same for every block: one constant [1, 1, C, span] bias. What differs per
    # block (keys past either end, padded keys) goes in as the key padding mask.
    bias = b.const(np.where(band.band(left, right, causal), 0, np.finfo(h.dtype).min).astype(h.dtype)[None, None])
    batch = b.op("Concat", [h.dim(q, 0), b.const([1, 1], np.int64)], {"axis": 0})
    valid = b.op("Expand", [band.key_valid(0, key_real), batch])  # [B, nb, span]
    valid = b.op("Cast", [b.op("Reshape", [valid, b.const([-1, band.span], np.int64)])], {"to": ir.DataType.INT32})
    as_batch = lambda x, length: b.op("Reshape", [x, b.const([-1, length, hidden], np.int64)])  # noqa: E731
    out = b.fused(MULTI_HEAD_ATTENTION, dict(query=as_batch(queries, band.block), key=as_batch(keys, band.span),
                                             value=as_batch(values, band.span), key_padding_mask=valid,
                                             attention_bias=bias), {"num_heads": h.heads, "scale": float(scale)})
    out = b.op("Reshape", [out, b.op("Concat", [h.dim(q, 0), b.const([-1, hidden], np.int64)], {"axis": 0})])
    return b.op("Slice", [out, b.const([0], np.int64), band.seqlen, b.const([1], np.int64)])


class Band:
    """Query blocks of C tokens; each sees the span of C + 2 x reach keys around it, masked to
    the exact band. C = reach measured fastest at 8K tokens (ONNX Runtime's MultiHeadAttention
    took as long with C = reach / 2 and its fewer keys per query, and 1.6x as long with 2 x reach)."""

    def __init__(self, b: Builder, seqlen: ir.Value, reach: int):
        block = reach
        self.b, self.seqlen, self.block, self.reach, self.span = b, seqlen, block, reach, block + 2 * reach
        self.blocks = b.op("Div", [b.op("Add", [seqlen, b.const([block - 1], np.int64)]), b.const([block], np.int64)])
        self.padded_len = b.op("Mul", [self.blocks, b.const([block], np.int64)])
        self.pad = b.op("Sub", [self.padded_len, seqlen])
        positions = b.op("Range", [b.const(0, np.int64), b.op("Squeeze", [self.padded_len]), b.const(1, np.int64)])
        self.query_pos = b.op("Reshape", [positions, b.const([-1, block], np.int64)])  # [nb, C]
        starts = b.op("Slice", [self.query_pos, b.const([0], np.int64), b.const([1], np.int64), b.const([1], np.int64)])
        self.key_pos = b.op("Add", [starts, b.const(np.arange(-reach, block + reach, dtype=np.int64))])  # [nb, span]

    def blocks_of(self, x: ir.Value, axis: int, width: int) -> ir.Value:
        """The sequence axis (followed by one of `width`) cut into [nb, C], zero rows past the end."""
        b, rank = self.b, axis + 2
        before = b.const([0] * (rank + axis), np.int64)
        pads = b.op("Concat", [before, self.pad, b.const([0] * (rank - axis - 1), np.int64)], {"axis": 0})
        shape = [0] * axis + [-1, self.block, width]
        return b.op("Reshape", [b.op("Pad", [x, pads]), b.const(shape, np.int64)])

    def neighbourhoods(self, x: ir.Value, axis: int, rank: int) -> ir.Value:
        """[..., S, ...] -> [..., nb, span, ...]: each block's keys, gathered in one copy;
        positions outside the sequence read zero rows."""
        b = self.b
        before = np.zeros(rank, np.int64)
        before[axis] = self.reach
        after = b.op("Concat", [b.const([0] * axis, np.int64), b.op("Add", [self.pad, b.const([self.reach], np.int64)]),
                                b.const([0] * (rank - axis - 1), np.int64)], {"axis": 0})
        padded = b.op("Pad", [x, b.op("Concat", [b.const(before), after], {"axis": 0})])
        return b.op("Gather", [padded, b.op("Add", [self.key_pos, b.const(self.reach, np.int64)])], {"axis": axis})

    def band(self, left: int, right: int, causal: bool) -> np.ndarray:
        """bool [C, span]: query i of a block sees key j of its span. The same for every block."""
        offset = (np.arange(self.span) - self.reach)[None, :] - np.arange(self.block)[:, None]
        return (offset >= -left) & (offset <= (0 if causal else right))

    def key_valid(self, global_tokens: int, key_real) -> ir.Value:
        """bool [B or 1, nb, span]: the key lies inside the sequence, is real, and is not a global token."""
        b = self.b
        valid = _all(b, [b.op("GreaterOrEqual", [self.key_pos, b.const(global_tokens, np.int64)]),  # globals apart
                         b.op("Less", [self.key_pos, b.op("Squeeze", [self.seqlen])])])
        valid = b.op("Unsqueeze", [valid, b.const([0], np.int64)])
        if key_real is not None:
            valid = b.op("And", [valid, self.neighbourhoods(key_real, axis=1, rank=2)])
        return valid

    def seen(self, left: int, right: int, causal: bool, global_tokens: int, key_real, head_axis: int) -> ir.Value:
        """Which keys of its span each query sees: bool [B or 1, nb, C, span] with a unit head axis inserted."""
        b = self.b
        valid = b.op("Unsqueeze", [self.key_valid(global_tokens, key_real), b.const([2], np.int64)])
        seen = b.op("And", [b.const(self.band(left, right, causal)), valid])
        return b.op("Unsqueeze", [seen, b.const([head_axis], np.int64)])


def _add_global_keys(b, h, scores, values, query_blocks, kh, vh, query_pos, count, causal, key_real, scale):
    """Every query also sees the first `count` keys."""
    first = lambda x: b.op("Slice", [x, b.const([0], np.int64), b.const([count], np.int64), b.const([2], np.int64)])  # noqa: E731
    gk, gv = b.op("Unsqueeze", [first(kh), b.const([2], np.int64)]), b.op("Unsqueeze", [first(vh), b.const([2], np.int64)])
    global_scores = b.op("Mul", [b.op("MatMul", [query_blocks, h.transpose_last(gk, 5)]), h.scalar(scale)])
    seen = None
    if causal:  # key g <= query position
        seen = b.op("LessOrEqual", [b.const(np.arange(count, dtype=np.int64)),
                                    b.op("Unsqueeze", [query_pos, b.const([2], np.int64)])])
        seen = b.op("Unsqueeze", [seen, b.const([0, 1], np.int64)])
    if key_real is not None:
        real = b.op("Slice", [key_real, b.const([0], np.int64), b.const([count], np.int64), b.const([1], np.int64)])
        real = b.op("Unsqueeze", [real, b.const([1, 2, 3], np.int64)])
        seen = real if seen is None else b.op("And", [seen, real])
    if seen is not None:
        global_scores = b.op("Where", [seen, global_scores, h.lowest()])
    shape = b.op("Shape", [query_blocks], {"start": 0, "end": 3})
    expanded = b.op("Expand", [gv, b.op("Concat", [shape, b.const([count, h.head_size], np.int64)], {"axis": 0})])
    return (b.op("Concat", [scores, global_scores], {"axis": -1}),
            b.op("Concat", [values, expanded], {"axis": 3}))


def _global_queries(b, h, out, qh, kh, vh, count, causal, key_real, scale):
    """The first `count` queries attend to every key."""
    gq = b.op("Slice", [qh, b.const([0], np.int64), b.const([count], np.int64), b.const([2], np.int64)])
    scores = b.op("Mul", [b.op("MatMul", [gq, h.transpose_last(kh, 4)]), h.scalar(scale)])
    seen = None
    if causal:
        key_pos = b.op("Range", [b.const(0, np.int64), b.op("Squeeze", [h.dim(kh, 2)]), b.const(1, np.int64)])
        seen = b.op("LessOrEqual", [key_pos, b.const(np.arange(count, dtype=np.int64)[:, None])])
    if key_real is not None:
        real = b.op("Unsqueeze", [key_real, b.const([1, 2], np.int64)])
        seen = real if seen is None else b.op("And", [seen, real])
    if seen is not None:
        scores = b.op("Where", [seen, scores, h.lowest()])
    full = b.op("MatMul", [b.op("Softmax", [scores], {"axis": -1}), vh])
    rest = b.op("Slice", [out, b.const([count], np.int64), b.const([np.iinfo(np.int64).max], np.int64),
                          b.const([2], np.int64)])
    return b.op("Concat", [full, rest], {"axis": 2})


def linear(b: Builder, q, k, v, *, heads: int, head_size: int, scale: float, feature_map: str, features: int,
           seed: int, causal: bool, key_real, dtype) -> ir.Value:
    h = Heads(b, heads, head_size, dtype)
    qh, kh, vh = h.split(q), h.split(k), h.split(v)
    if feature_map == "elu":
        phi_q, phi_k = (b.op("Add", [b.op("Elu", [x]), h.scalar(1.0)]) for x in (qh, kh))
    else:
        projection = favor_features(features, head_size, seed).numpy().astype(h.dtype)
        root = h.scalar(scale ** 0.5)  # exp(q'.k') = exp(scale q.k) with q' = q sqrt(scale)
        phi_q = _favor(b, h, b.op("Mul", [qh, root]), projection, key_real=None)
        phi_k = _favor(b, h, b.op("Mul", [kh, root]), projection, key_real=key_real)
    if key_real is not None:
        phi_k = b.op("Mul", [phi_k, h.key_weights(key_real)])
    if causal:
        axis = b.const(2, np.int64)
        outer = b.op("Mul", [b.op("Unsqueeze", [phi_k, b.const([-1], np.int64)]),
                             b.op("Unsqueeze", [vh, b.const([-2], np.int64)])])  # [B, H, S, F, D]
        state = b.op("CumSum", [outer, axis])
        normalizer = b.op("CumSum", [phi_k, axis])
        numerator = b.op("Squeeze", [b.op("MatMul", [b.op("Unsqueeze", [phi_q, b.const([-2], np.int64)]), state]),
                                     b.const([-2], np.int64)])
        denominator = b.op("ReduceSum", [b.op("Mul", [phi_q, normalizer]), b.const([-1], np.int64)])
    else:
        state = b.op("MatMul", [h.transpose_last(phi_k, 4), vh])  # [B, H, F, D]
        normalizer = b.op("ReduceSum", [phi_k, b.const([2], np.int64)])  # [B, H, 1, F]
        numerator = b.op("MatMul", [phi_q, state])
        denominator = b.op("MatMul", [phi_q, h.transpose_last(normalizer, 4)])  # [B, H, S, 1]
    out = b.op("Div", [numerator, b.op("Max", [denominator, h.scalar(np.finfo(h.dtype).tiny)])])
    return h.merge(out)


def _favor(b, h, x, projection, key_real):
    """exp(x W^T - |x|^2 / 2 - max) / sqrt(F): per query row, or over all real keys."""
    logits = b.op("Sub", [b.op("MatMul", [x, b.const(projection.T)]),
                          b.op("Mul", [b.op("ReduceSum", [b.op("Mul", [x, x]), b.const([-1], np.int64)]), h.scalar(0.5)])])
    if key_real is None:
        stabilizer = b.op("ReduceMax", [logits, b.const([-1], np.int64)])
    else:
        real = b.op("Unsqueeze", [key_real, b.const([1, 3], np.int64)])
        stabilizer = b.op("ReduceMax", [b.op("Where", [real, logits, h.lowest()]), b.const([2, 3], np.int64)])
    return b.op("Div", [b.op("Exp", [b.op("Sub", [logits, stabilizer])]), h.scalar(np.sqrt(projection.shape[0]))])


def linformer(b: Builder, q, k, v, *, heads: int, head_size: int, scale: float, rank: int,
              key_real, dtype) -> ir.Value:
    """Keys and values projected along the sequence to `rank` rows: the mean of each of
    `rank` contiguous segments, with log(segment size) added to its score so that a
    segment weighs as much as the keys it stands for. Exact once rank >= length, and
    closer the larger rank is (a random Gaussian projection is neither)."""
    h = Heads(b, heads, head_size, dtype)
    qh, kh, vh = h.split(q), h.split(k), h.split(v)
    length = b.op("Squeeze", [h.dim(kh, 2)])
    positions = b.op("Range", [b.const(0, np.int64), length, b.const(1, np.int64)])
    segment = b.op("Div", [b.op("Mul", [positions, b.const(rank, np.int64)]), length])  # floor(j * K / T)
    member = b.op("Equal", [b.const(np.arange(rank, dtype=np.int64)[:, None]), segment])  # [K, T]
    weights = b.op("Cast", [member], {"to": ir.DataType.from_numpy(h.dtype)})
    if key_real is not None:  # [B, 1, K, T]: padded keys belong to no segment
        real = b.op("Cast", [b.op("Unsqueeze", [key_real, b.const([1, 2], np.int64)])],
                    {"to": ir.DataType.from_numpy(h.dtype)})
        weights = b.op("Mul", [weights, real])
    count = b.op("ReduceSum", [weights, b.const([-1], np.int64)])  # [.., K, 1]
    mean = b.op("Div", [weights, b.op("Max", [count, h.scalar(1.0)])])
    keys, values = b.op("MatMul", [mean, kh]), b.op("MatMul", [mean, vh])  # [B, H, K, D]
    scores = b.op("Mul", [b.op("MatMul", [qh, h.transpose_last(keys, 4)]), h.scalar(scale)])
    size = h.transpose_last(count, 4 if key_real is not None else 2)  # [.., 1, K]
    log_size = b.op("Where", [b.op("Greater", [size, h.scalar(0.0)]), b.op("Log", [b.op("Max", [size, h.scalar(1.0)])]),
                              h.lowest()])
    scores = b.op("Add", [scores, log_size])
    return h.merge(b.op("MatMul", [b.op("Softmax", [scores], {"axis": -1}), values]))


def _all(b: Builder, conditions: list[ir.Value]) -> ir.Value:
    result = conditions[0]
    for condition in conditions[1:]:
        result = b.op("And", [result, condition])
    return result
