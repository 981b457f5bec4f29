"""Transformer graphs written the way other producers write them.

attnfuse's zoo comes from two PyTorch exporters; the files users bring come from many
more tools. Each builder here reproduces one class of such files with onnx.helper and
seeded numpy weights, and returns a `ForeignGraph`: the model, how many attention sites
it holds, a numpy reference of the maths it claims (which is how the builder itself is
checked), and padded batches made here, not by attnfuse.

The classes, as those producers write them (read from them, no code copied):
- ONNX Runtime's attention-fusion test graphs (`BertLayer`): LayerNormalization as an op
  at opset 16 (ONNX defines it from 17; ONNX Runtime runs it anyway) or decomposed at
  opset 11, Reshape to [0, 0, H, D], a (1 - m) * -10000 mask from an int or float
  [B, S] input or a 3-D [B, S, S] one, pruned heads (q, k, v narrower than the hidden
  size), q/k heads wider than v's, Add operands switched, batch 1 and sequence 3 fixed;
  GPT-2 with one `past` input [2, B, H, P, D] and a stored causal triangle.
- tf2onnx BERT: `input_ids:0` names, int32 ids, token types by OneHot, projections and
  attention as Einsum (Keras' EinsumDense), TF's 3-D mask, TF's batch-norm style layernorm.
- Hugging Face Optimum: `input_ids`, `attention_mask`, `position_ids`,
  `past_key_values.N.key/value` in, `logits`, `present.N.key/value` out, dims
  `batch_size`, `sequence_length`, `past_sequence_length`,
  `past_sequence_length + sequence_length`; merged decoders (an If on the bool input
  `use_cache_branch`, each branch the whole decoder); BLOOM's caches with heads merged
  into the batch (`batch_size x num_heads`); seq2seq decoders with self and encoder
  caches and BART's 3-D [B*H, S, D] attention.
- A ViT whose position embeddings fix the image size at 224.
- com.microsoft ops (EmbedLayerNormalization, SkipLayerNormalization, FastGelu) upstream
  of unfused attention: a file another optimizer already went over.
- ALBERT's shared layer as a Loop body.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper
from scipy.special import erf
from spellings import FLOAT32_MIN, GraphBuilder, alibi_slopes, make_model

EPS = 1e-5
MASK_FILL = -10000.0  # the additive mask of BERT-era graphs: (1 - m) * -10000
POSITIONS = 64  # position table rows, as in the zoo
MS = "com.microsoft"
Feeds = dict[str, np.ndarray]


@dataclass
class Batch:
    case: str  # what it covers: "left padding, past 5, 3 new", ...
    feeds: Feeds
    # bool [B, S]: the positions whose outputs count (None: all); padded ones are zero after padding-free
    real: np.ndarray | None
    real_keys: np.ndarray | None = None  # bool [B, past + S]: the positions of caches that count


# A cache's axes: b batch, h heads, t past + new positions, d head size, "2" key and value
# stacked, "bh" batch and heads merged into one axis.
BHTD = ("b", "h", "t", "d")


@dataclass
class ForeignGraph:
    name: str
    model: onnx.ModelProto
    sites: int  # attention sites, subgraphs included
    reference: Callable[[Feeds], Feeds]  # numpy, from the maths: output name -> value
    batches: list[Batch]
    onnx_valid: bool = True  # False where ONNX's checker rejects what ONNX Runtime runs
    caches: dict[str, tuple[str, ...]] = field(default_factory=dict)  # cache output -> its axes


def real_part(array, batch: Batch, cache_axes: tuple[str, ...] | None = None) -> np.ndarray:
    """The positions of an output that count: a cache (laid out as `cache_axes`) at the
    real keys, a token output ([B, S, ...]) at the real tokens, anything else whole."""
    array = np.asarray(array, np.float64)
    if cache_axes is not None and batch.real_keys is not None:
        b, shape, axes = batch.real_keys.shape[0], [], []
        for axis, size in zip(cache_axes, array.shape):  # a merged "bh" axis as two
            shape += [b, size // b] if axis == "bh" else [size]
            axes += ["b", "h"] if axis == "bh" else [axis]
        array = np.moveaxis(array.reshape(shape), (axes.index("b"), axes.index("t")), (0, 1))
        return array[batch.real_keys]
    if batch.real is not None and array.shape[:2] == batch.real.shape:
        return array[batch.real]
    return array


# ------------------------------------------------------------------------- numpy


def np_layer_norm(x, gamma, beta):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * gamma + beta


def np_gelu_erf(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_mlp(x, w, activation):
    return activation(x @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]


def np_heads(t, heads):
    """[B, S, H*D] -> [B, H, S, D]."""
    b, s, width = t.shape
    return t.reshape(b, s, heads, width // heads).transpose(0, 2, 1, 3)


def np_merge(t):
    """[B, H, S, D] -> [B, S, H*D]."""
    b, h, s, d = t.shape
    return t.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def np_attention(q, k, v, scale, bias=0.0, allowed=None):
    """softmax(q k^T * scale + bias) v over [B, H, S, D] heads; scores where `allowed` is
    False are replaced by -10000 before the bias is added."""
    scores = q @ np.swapaxes(k, -1, -2) * scale
    if allowed is not None:
        scores = np.where(allowed, scores, MASK_FILL)
    return np_softmax(scores + bias) @ v


def np_softmax(scores):
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def np_self_attention(x, w, heads, bias=0.0):
    """Projections, attention scaled by the q/k head size, merge, output projection."""
    q, k, v = (np_heads(x @ w[f"w{n}"] + w[f"b{n}"], heads) for n in "qkv")
    return np_merge(np_attention(q, k, v, q.shape[-1] ** -0.5, bias)) @ w["wo"] + w["bo"]


def causal(queries: int, keys: int) -> np.ndarray:
    """bool [S, T]: query i (the last S of T positions) sees keys j <= i + T - S."""
    return np.arange(keys)[None, :] <= np.arange(queries)[:, None] + keys - queries


def in64(feeds: Feeds) -> Feeds:
    return {name: value.astype(np.float64) if value.dtype.kind == "f" else value for name, value in feeds.items()}


# ----------------------------------------------------------------------- weights


def dense(rng, fan_in, *shape):
    return rng.normal(0, fan_in**-0.5, (fan_in, *shape)).astype(np.float32)


def vector(rng, *shape, around=0.0):
    return (around + rng.normal(0, 0.1, shape)).astype(np.float32)


def norm_weights(rng, width):
    return vector(rng, width, around=1.0), vector(rng, width)


def attention_weights(rng, hidden, qk_width, v_width):
    return {"wq": dense(rng, hidden, qk_width), "bq": vector(rng, qk_width),
            "wk": dense(rng, hidden, qk_width), "bk": vector(rng, qk_width),
            "wv": dense(rng, hidden, v_width), "bv": vector(rng, v_width),
            "wo": dense(rng, v_width, hidden), "bo": vector(rng, hidden)}


def mlp_weights(rng, hidden, inner):
    return {"w1": dense(rng, hidden, inner), "b1": vector(rng, inner), "w2": dense(rng, inner, hidden),
            "b2": vector(rng, hidden)}


# ------------------------------------------------------------------ onnx pieces


def value(name, elem, dims):
    return helper.make_tensor_value_info(name, elem, dims)


def linear(g: GraphBuilder, x, w, b=None, switch=False, name="dense"):
    """MatMul then Add of the bias; `switch` writes the Add as (bias, y)."""
    y = g.op("MatMul", x, g.weight(w, f"{name}.weight"))
    if b is None:
        return y
    bias = g.weight(b, f"{name}.bias")
    return g.op("Add", bias, y) if switch else g.op("Add", y, bias)


def layer_norm(g: GraphBuilder, x, gamma, beta, style="op"):
    """LayerNormalization, or the ReduceMean/Pow/Sqrt/Div decomposition of older exports."""
    gamma, beta = g.weight(gamma, "ln.weight"), g.weight(beta, "ln.bias")
    if style == "op":
        return g.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=EPS)
    centred = g.op("Sub", x, g.reduce("ReduceMean", x, [-1]))
    var = g.reduce("ReduceMean", g.op("Pow", centred, g.f32(2.0)), [-1])
    normed = g.op("Div", centred, g.op("Sqrt", g.op("Add", var, g.f32(EPS))))
    return g.op("Add", g.op("Mul", normed, gamma), beta)


def gelu_tanh(g: GraphBuilder, x):
    cube = g.op("Mul", g.op("Pow", x, g.f32(3.0)), g.f32(0.044715))
    inner = g.op("Mul", g.op("Add", x, cube), g.f32(np.sqrt(2 / np.pi)))
    return g.op("Mul", g.op("Mul", x, g.f32(0.5)), g.op("Add", g.f32(1.0), g.op("Tanh", inner)))


def gelu_erf(g: GraphBuilder, x):
    half = g.op("Add", g.op("Erf", g.op("Div", x, g.f32(np.sqrt(2)))), g.f32(1.0))
    return g.op("Mul", g.op("Mul", x, half), g.f32(0.5))


def mlp(g: GraphBuilder, x, w, activation, name="mlp"):
    inner = activation(g, linear(g, x, w["w1"], w["b1"], name=f"{name}.fc1"))
    return linear(g, inner, w["w2"], w["b2"], name=f"{name}.fc2")


def heads_first(g: GraphBuilder, t, heads, head_size, perm=(0, 2, 1, 3)):
    """[B, S, H*D] -> [B, H, S, D] by a constant [0, 0, H, D] Reshape and a Transpose."""
    return g.op("Transpose", g.op("Reshape", t, g.i64([0, 0, heads, head_size])), perm=list(perm))


def heads_first_by_shape(g: GraphBuilder, t, heads, head_size):
    """The same, its shape built TorchScript's way: Concat(Shape(t)[0], Shape(t)[1], H, D)."""
    return g.op("Transpose", g.op("Reshape", t, shape_of(g, t, heads, head_size)), perm=[0, 2, 1, 3])


def merged_heads(g: GraphBuilder, ctx, width):
    return g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.i64([0, 0, width]))


def merged_heads_by_shape(g: GraphBuilder, ctx, width):
    ctx = g.op("Transpose", ctx, perm=[0, 2, 1, 3])
    return g.op("Reshape", ctx, shape_of(g, ctx, width))


def shape_of(g: GraphBuilder, t, *tail):
    """Concat(Shape(t)[0], Shape(t)[1], *tail): the TorchScript way to build a Reshape's shape."""
    return g.op("Concat", g.dim(t, 0), g.dim(t, 1), *(g.i64([d]) for d in tail), axis=0)


def filled(g: GraphBuilder, shape, number: float):
    """ConstantOfShape(shape) with `number`."""
    return g.op("ConstantOfShape", shape, value=helper.make_tensor("fill", TensorProto.FLOAT, [1], [number]))


def position_table(hidden):
    """The seeded table of the builders whose positions are 0..S-1."""
    return dense(np.random.default_rng(10), POSITIONS, hidden)


def positions_of(g: GraphBuilder, ids, hidden):
    """The first S rows of the position table, S = Shape(ids)[1], by Slice."""
    table = g.weight(position_table(hidden), "position_embeddings")
    return g.op("Slice", table, g.i64([0]), g.dim(ids, 1), g.i64([0]))


# --------------------------------------------------------------------- batches


def real_tokens(lengths, width, side="right") -> np.ndarray:
    columns, lengths = np.arange(width)[None, :], np.asarray(lengths)[:, None]
    return columns >= width - lengths if side == "left" else columns < lengths


def row_lengths(batch: int, width: int) -> list[int]:
    """A full row, a row of one token, then rows of width - 2."""
    return ([width, 1] + [max(width - 2, 1)] * batch)[:batch]


def padding_cases(batch: int, width: int) -> list[tuple[str, np.ndarray]]:
    """(case, real [B, width]): right and left padding, with a full row and a row of one
    token; a fixed batch of one row gets one case per padding instead."""
    if batch == 1:
        return [("right padding", real_tokens([width - 1], width)),
                ("left padding", real_tokens([width - 1], width, "left")),
                ("one token, right padding", real_tokens([1], width))]
    return [(f"{side} padding", real_tokens(row_lengths(batch, width), width, side)) for side in ("right", "left")]


def cache_cases(batch, past_new=((0, 6), (5, 3), (5, 1))):
    """(case, real over past + new, past length, new length): left padding (how batches are
    generated) at every past length, right padding too without a past."""
    cases = []
    for past, new in past_new:
        total = past + new
        sides = ("left", "right") if past == 0 else ("left",)
        for side in sides:
            real = real_tokens(row_lengths(batch, total), total, side)
            cases.append((f"{side} padding, past {past}, {new} new", real, past, new))
    return cases


def position_ids(real: np.ndarray, new: int) -> np.ndarray:
    """What generate() feeds: the count of real tokens before each one, for the new ones."""
    positions = np.maximum(np.cumsum(real, axis=1) - 1, 0)
    return positions[:, -new:].astype(np.int64)


# ------------------------------------------------ ONNX Runtime's BERT attention layer


@dataclass(frozen=True)
class BertLayer:
    """One BERT layer as ONNX Runtime's attention-fusion tests write it; every field
    changes the file, `heads`/`qk_head`/`v_head` the widths too."""

    opset: int = 17
    layernorm: str = "op"  # "op" (LayerNormalization) or "decomposed"
    hidden: int = 16
    heads: int = 4
    qk_head: int = 4
    v_head: int = 4
    switch_add: bool = False  # Add(bias, x) and Add(mask, scores) instead of (x, bias), (scores, mask)
    mask: str = "int"  # "int" or "float" [B, S], or "3d" int [B, S, S]
    fixed: tuple[int, int] | None = None  # (batch, sequence) fixed in the graph
    pooler: bool = False  # a second output: tanh(dense(output[:, 0])), BERT's pooler on the first token

    def weights(self, rng):
        return attention_weights(rng, self.hidden, self.heads * self.qk_head, self.heads * self.v_head)


def bert_mask_bias(g: GraphBuilder, layer: BertLayer, mask: str):
    """(1 - m) * -10000 as [B, 1, 1, S] (or [B, 1, S, S] from a 3-D mask)."""
    m = g.unsqueeze(mask, [1]) if layer.mask == "3d" else g.unsqueeze(g.unsqueeze(mask, [1]), [2])
    if layer.mask != "float":
        m = g.op("Cast", m, to=TensorProto.FLOAT)
    return g.op("Mul", g.op("Sub", g.f32(1.0), m), g.f32(MASK_FILL))


def np_mask_bias(mask):
    m = mask.astype(np.float64)
    return (1 - (m[:, None] if m.ndim == 3 else m[:, None, None, :])) * MASK_FILL


def bert_self_attention(g: GraphBuilder, layer: BertLayer, w, x, bias):
    """Separate q, k, v projections, K transposed by perm (0, 2, 3, 1), scores divided by sqrt(d)."""
    H, switch = layer.heads, layer.switch_add
    q = heads_first(g, linear(g, x, w["wq"], w["bq"], switch, "query"), H, layer.qk_head)
    kt = heads_first(g, linear(g, x, w["wk"], w["bk"], switch, "key"), H, layer.qk_head, perm=(0, 2, 3, 1))
    v = heads_first(g, linear(g, x, w["wv"], w["bv"], name="value"), H, layer.v_head)
    scores = g.op("Div", g.op("MatMul", q, kt), g.f32(np.sqrt(layer.qk_head)))
    scores = g.op("Add", bias, scores) if switch else g.op("Add", scores, bias)
    ctx = merged_heads(g, g.op("MatMul", g.op("Softmax", scores, axis=3), v), H * layer.v_head)
    return linear(g, ctx, w["wo"], w["bo"], switch, "attention.output.dense")


def token_dims(fixed=None):
    return list(fixed) if fixed else ["batch_size", "sequence_length"]


def bert_attention_layer(layer: BertLayer = BertLayer(), name: str = "bert_attention") -> ForeignGraph:
    """LayerNorm(input_1 + input_2) -> self-attention -> residual -> LayerNorm."""
    rng = np.random.default_rng(11)
    g = GraphBuilder(opset=layer.opset)
    w = layer.weights(rng)
    (g1, b1), (g2, b2) = norm_weights(rng, layer.hidden), norm_weights(rng, layer.hidden)
    tokens = token_dims(layer.fixed)

    x = layer_norm(g, g.op("Add", "input_1", "input_2"), g1, b1, layer.layernorm)
    attention = bert_self_attention(g, layer, w, x, bert_mask_bias(g, layer, "input_mask"))
    skip = g.op("Add", x, attention) if layer.switch_add else g.op("Add", attention, x)
    out = g.rename(layer_norm(g, skip, g2, b2, layer.layernorm), "output")
    pool = (dense(rng, layer.hidden, layer.hidden), vector(rng, layer.hidden)) if layer.pooler else None
    outputs = [value("output", TensorProto.FLOAT, [*tokens, layer.hidden])]
    if layer.pooler:
        first = g.op("Gather", out, g.i64(0), axis=1)
        g.rename(g.op("Tanh", linear(g, first, *pool, name="pooler")), "pooled")
        outputs.append(value("pooled", TensorProto.FLOAT, [tokens[0], layer.hidden]))

    mask_type = TensorProto.FLOAT if layer.mask == "float" else TensorProto.INT64
    inputs = [value("input_1", TensorProto.FLOAT, [*tokens, layer.hidden]),
              value("input_2", TensorProto.FLOAT, [*tokens, layer.hidden]),
              value("input_mask", mask_type, [*tokens, tokens[1]] if layer.mask == "3d" else tokens)]
    model = make_model(g, name, inputs, outputs)

    def reference(feeds):
        f = in64(feeds)
        x = np_layer_norm(f["input_1"] + f["input_2"], g1, b1)
        attention = np_self_attention(x, w, layer.heads, np_mask_bias(f["input_mask"]))
        out = np_layer_norm(x + attention, g2, b2)
        return {"output": out, **({"pooled": np.tanh(out[:, 0] @ pool[0] + pool[1])} if layer.pooler else {})}

    def feeds(real):
        b, s = real.shape
        mask = np.broadcast_to(real[:, None, :], (b, s, s)) if layer.mask == "3d" else real
        return {"input_1": rng.normal(size=(b, s, layer.hidden)).astype(np.float32),
                "input_2": rng.normal(size=(b, s, layer.hidden)).astype(np.float32),
                "input_mask": mask.astype(np.float32 if layer.mask == "float" else np.int64)}

    batch, width = layer.fixed or (3, 6)
    batches = [Batch(case, feeds(real), real) for case, real in padding_cases(batch, width)]
    # ONNX defines LayerNormalization from opset 17; ONNX Runtime runs the op at any opset.
    valid = layer.layernorm != "op" or layer.opset >= 17
    return ForeignGraph(name, model, 1, reference, batches, onnx_valid=valid)


# ---------------------------------------------------------------- tf2onnx BERT


def tf2onnx_einsum_bert(hidden=16, heads=4, vocab=30, opset=15) -> ForeignGraph:
    """Embeddings, then attention as Keras' EinsumDense writes it: W [hidden, H, D], scores
    Einsum('aecd,abcd->acbe', k, q), TF BERT's 3-D mask, TF's batch-norm style layernorm."""
    rng = np.random.default_rng(12)
    d = hidden // heads
    g = GraphBuilder(opset=opset)
    w = {"word": dense(rng, vocab, hidden), "type": dense(rng, 2, hidden), "bo": vector(rng, hidden),
         "wo": rng.normal(0, hidden**-0.5, (heads, d, hidden)).astype(np.float32)}
    for n in "qkv":
        w[f"w{n}"], w[f"b{n}"] = dense(rng, hidden, heads, d), vector(rng, heads, d)
    (g1, b1), (g2, b2) = norm_weights(rng, hidden), norm_weights(rng, hidden)
    ids, segments, mask = "input_ids:0", "segment_ids:0", "input_mask:0"
    output = "bert/encoder/layer_0/output/LayerNorm/batchnorm/add_1:0"

    def tf_layer_norm(x, gamma, beta):  # x * s + (beta - mean * s), s = gamma / sqrt(var + eps)
        mean = g.reduce("ReduceMean", x, [-1])
        centred = g.op("Sub", x, mean)
        var = g.reduce("ReduceMean", g.op("Mul", centred, centred), [-1])
        s = g.op("Mul", g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.f32(EPS)))), g.weight(gamma, "gamma"))
        return g.op("Add", g.op("Mul", x, s), g.op("Sub", g.weight(beta, "beta"), g.op("Mul", mean, s)))

    def einsum_dense(x, n):
        kernel = g.op("Einsum", x, g.weight(w[f"w{n}"], "kernel"), equation="abc,cde->abde")
        return g.op("Add", kernel, g.weight(w[f"b{n}"], "bias"))

    word = g.op("Gather", g.weight(w["word"], "word_embeddings"), ids, axis=0)
    one_hot = g.op("OneHot", g.op("Reshape", segments, g.i64([-1])), g.const([2], np.int32), g.f32([0.0, 1.0]))
    types = g.op("MatMul", one_hot, g.weight(w["type"], "token_type_embeddings"))
    types = g.op("Reshape", types, shape_of(g, ids, hidden))
    x = tf_layer_norm(g.op("Add", g.op("Add", word, types), positions_of(g, ids, hidden)), g1, b1)

    q = g.op("Mul", einsum_dense(x, "q"), g.f32(d**-0.5))
    k, v = einsum_dense(x, "k"), einsum_dense(x, "v")
    # TF BERT: to_mask [B, 1, T] times ones [B, F, 1] -> [B, F, T], then [B, 1, F, T].
    to_mask = g.op("Reshape", mask, g.op("Concat", g.dim(ids, 0), g.i64([1]), g.dim(ids, 1), axis=0))
    ones = filled(g, g.op("Concat", g.dim(ids, 0), g.dim(ids, 1), g.i64([1]), axis=0), 1.0)
    mask_3d = g.op("Mul", ones, g.op("Cast", to_mask, to=TensorProto.FLOAT))
    adder = g.op("Mul", g.op("Sub", g.f32(1.0), g.unsqueeze(mask_3d, [1])), g.f32(MASK_FILL))
    scores = g.op("Add", g.op("Einsum", k, q, equation="aecd,abcd->acbe"), adder)
    ctx = g.op("Einsum", g.op("Softmax", scores, axis=-1), v, equation="acbe,aecd->abcd")
    out = g.op("Einsum", ctx, g.weight(w["wo"], "kernel"), equation="abcd,cde->abe")
    out = g.op("Add", out, g.weight(w["bo"], "bias"))
    g.rename(tf_layer_norm(g.op("Add", out, x), g2, b2), output)

    tokens = ["unk__0", "unk__1"]
    inputs = [value(name, TensorProto.INT32, tokens) for name in (ids, mask, segments)]
    model = make_model(g, "tf2onnx", inputs, [value(output, TensorProto.FLOAT, [*tokens, hidden])])

    def reference(feeds):
        i, s = feeds[ids], feeds[segments]
        x = np_layer_norm(w["word"][i] + w["type"][s] + position_table(hidden)[: i.shape[1]], g1, b1).astype(np.float64)
        q, k, v = (np.einsum("abc,cde->adbe", x, w[f"w{n}"]) + w[f"b{n}"][None, :, None, :] for n in "qkv")
        ctx = np_attention(q, k, v, d**-0.5, np_mask_bias(feeds[mask]))
        out = np.einsum("adbe,dec->abc", ctx, w["wo"]) + w["bo"]
        return {output: np_layer_norm(out + x, g2, b2)}

    def feeds(real):
        b, s = real.shape
        return {ids: rng.integers(0, vocab, (b, s)).astype(np.int32), mask: real.astype(np.int32),
                segments: (np.arange(s)[None, :] >= s // 2).repeat(b, 0).astype(np.int32)}

    batches = [Batch(case, feeds(real), real) for case, real in padding_cases(3, 6)]
    return ForeignGraph("tf2onnx_einsum", model, 1, reference, batches)


# ------------------------------------------------------- ONNX Runtime's GPT-2 with past


def gpt2_with_past(hidden=16, heads=4, max_seq=32, opset=17) -> ForeignGraph:
    """GPT-2 attention with one `past` input [2, B, H, P, D] and `present` out; a float mask
    over past + new tokens; causality from a stored uint8 triangle sliced by Shape arithmetic;
    the output projection as Gemm on [B*S, hidden]."""
    rng = np.random.default_rng(13)
    d = hidden // heads
    g = GraphBuilder(opset=opset)
    w = {"wqkv": dense(rng, hidden, 3 * hidden), "bqkv": vector(rng, 3 * hidden),
         "wo": dense(rng, hidden, hidden), "bo": vector(rng, hidden)}
    (g1, b1), (g2, b2) = norm_weights(rng, hidden), norm_weights(rng, hidden)

    x0 = g.op("Add", "input_1", "input_2")
    qkv = g.split(linear(g, layer_norm(g, x0, g1, b1), w["wqkv"], w["bqkv"]), [hidden] * 3, axis=2)
    q, k, v = (heads_first(g, t, heads, d) for t in qkv)
    past_k, past_v = (g.squeeze(t, [0]) for t in g.split("past", [1, 1], axis=0))
    k_all, v_all = g.op("Concat", past_k, k, axis=-2), g.op("Concat", past_v, v, axis=-2)
    g.rename(g.op("Concat", g.unsqueeze(k_all, [0]), g.unsqueeze(v_all, [0]), axis=0), "present")

    def length(t):  # Shape(t)[-2] as a scalar, by Slice and Squeeze
        return g.squeeze(g.op("Slice", g.op("Shape", t), g.i64([-2]), g.i64([-1]), g.i64([0])), [0])

    new, total = length(q), length(k_all)
    end = g.unsqueeze(total, [0])
    triangle = g.const(np.tril(np.ones((1, 1, max_seq, max_seq), np.uint8)), np.uint8)
    rows = g.op("Slice", triangle, g.unsqueeze(g.op("Sub", total, new), [0]), end, g.i64([2]), g.i64([1]))
    allowed = g.op("Cast", g.op("Slice", rows, g.i64([0]), end, g.i64([3]), g.i64([1])), to=TensorProto.BOOL)
    scores = g.op("Div", g.op("MatMul", q, g.op("Transpose", k_all, perm=[0, 1, 3, 2])), g.f32(np.sqrt(d)))
    scores = g.op("Where", allowed, scores, g.f32(MASK_FILL))
    mask = g.unsqueeze(g.unsqueeze(g.op("Reshape", "input_mask", g.i64([0, -1])), [1]), [2])
    scores = g.op("Add", scores, g.op("Mul", g.op("Sub", g.f32(1.0), mask), g.f32(MASK_FILL)))
    ctx = merged_heads(g, g.op("MatMul", g.op("Softmax", scores, axis=3), v_all), hidden)
    projected = g.op("Gemm", g.op("Reshape", ctx, g.i64([-1, hidden])), g.weight(w["wo"], "c_proj.weight"),
                     g.weight(w["bo"], "c_proj.bias"))
    out = g.op("Reshape", projected, shape_of(g, ctx, hidden))
    g.rename(layer_norm(g, g.op("Add", out, x0), g2, b2), "output")

    tokens, total_dim = token_dims(), "past_sequence_length + sequence_length"
    inputs = [value("input_1", TensorProto.FLOAT, [*tokens, hidden]),
              value("input_2", TensorProto.FLOAT, [*tokens, hidden]),
              value("input_mask", TensorProto.FLOAT, ["batch_size", total_dim]),
              value("past", TensorProto.FLOAT, [2, "batch_size", heads, "past_sequence_length", d])]
    outputs = [value("output", TensorProto.FLOAT, [*tokens, hidden]),
               value("present", TensorProto.FLOAT, [2, "batch_size", heads, total_dim, d])]
    model = make_model(g, "gpt2_past", inputs, outputs)

    def reference(feeds):
        f = in64(feeds)
        x0 = f["input_1"] + f["input_2"]
        q, k, v = (np_heads(t, heads) for t in np.split(np_layer_norm(x0, g1, b1) @ w["wqkv"] + w["bqkv"], 3, -1))
        k, v = np.concatenate([f["past"][0], k], 2), np.concatenate([f["past"][1], v], 2)
        ctx = np_attention(q, k, v, d**-0.5, np_mask_bias(f["input_mask"]), allowed=causal(q.shape[2], k.shape[2]))
        out = np_merge(ctx) @ w["wo"] + w["bo"]
        return {"output": np_layer_norm(out + x0, g2, b2), "present": np.stack([k, v])}

    def feeds(real, past, new):
        b = real.shape[0]
        return {"input_1": rng.normal(size=(b, new, hidden)).astype(np.float32),
                "input_2": rng.normal(size=(b, new, hidden)).astype(np.float32),
                "input_mask": real.astype(np.float32),
                "past": rng.normal(size=(2, b, heads, past, d)).astype(np.float32)}

    batches = [Batch(case, feeds(real, past, new), real[:, past:], real) for case, real, past, new in cache_cases(3)]
    return ForeignGraph("gpt2_past", model, 1, reference, batches, caches={"present": ("2", *BHTD)})


# ----------------------------------------------------------- Optimum's decoders


@dataclass(frozen=True)
class Decoder:
    layers: int = 2
    hidden: int = 16
    heads: int = 2
    vocab: int = 40
    opset: int = 14  # Optimum's GPT-2 export: LayerNorm decomposed
    kv_heads: int = 0  # fewer than heads: k and v repeated after the cache (grouped-query)
    mask_by_keys: bool = False  # the mask sliced to Shape(k)[-2], as transformers 4.x's Llama does

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        return (self.kv_heads or self.heads) * self.head_size

    def weights(self, rng):
        h = self.hidden
        w = {"wte": dense(rng, self.vocab, h), "wpe": dense(rng, POSITIONS, h), "ln_f": norm_weights(rng, h)}
        for i in range(self.layers):
            w[i] = {"ln_1": norm_weights(rng, h), "ln_2": norm_weights(rng, h), "mlp": mlp_weights(rng, h, 4 * h),
                    "wqkv": dense(rng, h, h + 2 * self.kv_width), "bqkv": vector(rng, h + 2 * self.kv_width),
                    "wo": dense(rng, h, h), "bo": vector(rng, h)}
        return w

    def io(self) -> tuple[list, list]:
        """Optimum's names and dims: the inputs (the cache last) and the outputs."""
        total = "past_sequence_length + sequence_length"
        tokens = token_dims()

        def caches(prefix, length):
            dims = ["batch_size", self.kv_heads or self.heads, length, self.head_size]
            return [value(name, TensorProto.FLOAT, dims) for name in self.cache_names(prefix)]

        inputs = [value("input_ids", TensorProto.INT64, tokens),
                  value("attention_mask", TensorProto.INT64, ["batch_size", total]),
                  value("position_ids", TensorProto.INT64, tokens), *caches("past_key_values", "past_sequence_length")]
        return inputs, [value("logits", TensorProto.FLOAT, [*tokens, self.vocab]), *caches("present", total)]

    def cache_names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def feeds(self, rng, real, past, new) -> Feeds:
        b = real.shape[0]
        feeds = {"input_ids": rng.integers(0, self.vocab, (b, new)), "attention_mask": real.astype(np.int64),
                 "position_ids": position_ids(real, new)}
        for name in self.cache_names("past_key_values"):
            feeds[name] = rng.normal(size=(b, self.kv_heads or self.heads, past, self.head_size)).astype(np.float32)
        return feeds


def decoder_graph(g: GraphBuilder, spec: Decoder, w, with_past: bool, prefix: str = "") -> list[str]:
    """GPT-2 as TorchScript exports it for Optimum: Shape-built reshapes, a causal mask from
    Range and LessOrEqual over past + new joined with the padding, filled with finfo.min.
    With `kv_heads`, k and v are repeated to every head after the cache (Unsqueeze, Expand,
    Reshape from their Shape); with `mask_by_keys` each layer slices the mask to the keys' length.
    Returns the output names: logits, then present.N.key/value for each layer."""
    H, D, KV = spec.heads, spec.head_size, spec.kv_heads or spec.heads
    h = g.op("Add", g.op("Gather", g.weight(w["wte"], "wte"), "input_ids", axis=0),
             g.op("Gather", g.weight(w["wpe"], "wpe"), "position_ids", axis=0))
    new, total = g.size("input_ids", 1), g.size("attention_mask", 1)
    queries = g.op("Add", g.op("Range", g.i64(0), new, g.i64(1)), g.op("Sub", total, new))
    keys = g.op("Range", g.i64(0), total, g.i64(1))
    allowed = g.op("LessOrEqual", g.unsqueeze(keys, [0]), g.unsqueeze(queries, [1]))
    allowed = g.op("And", allowed, g.op("Cast", g.unsqueeze("attention_mask", [1, 2]), to=TensorProto.BOOL))
    bias = g.op("Where", allowed, g.f32(0.0), g.f32(FLOAT32_MIN))

    outputs = []
    for i in range(spec.layers):
        lw = w[i]
        qkv = linear(g, layer_norm(g, h, *lw["ln_1"], style="decomposed"), lw["wqkv"], lw["bqkv"], name=f"h.{i}.c_attn")
        q, k, v = g.split(qkv, [spec.hidden, spec.kv_width, spec.kv_width], 2)
        q, k, v = heads_first_by_shape(g, q, H, D), heads_first_by_shape(g, k, KV, D), heads_first_by_shape(g, v, KV, D)
        if with_past:
            k = g.op("Concat", f"past_key_values.{i}.key", k, axis=2)
            v = g.op("Concat", f"past_key_values.{i}.value", v, axis=2)
        k, v = g.rename(k, f"{prefix}present.{i}.key"), g.rename(v, f"{prefix}present.{i}.value")
        outputs += [k, v]
        if KV < H:
            k, v = repeated_heads(g, k, H // KV), repeated_heads(g, v, H // KV)
        layer_bias = bias
        if spec.mask_by_keys:
            layer_bias = g.op("Slice", bias, g.i64([0]), g.dim(k, 2), g.i64([3]))
        scores = g.op("Div", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.f32(np.sqrt(D)))
        ctx = g.op("MatMul", g.op("Softmax", g.op("Add", scores, layer_bias), axis=-1), v)
        ctx = merged_heads_by_shape(g, ctx, spec.hidden)
        h = g.op("Add", h, linear(g, ctx, lw["wo"], lw["bo"], name=f"h.{i}.c_proj"))
        m = layer_norm(g, h, *lw["ln_2"], style="decomposed")
        h = g.op("Add", h, mlp(g, m, lw["mlp"], gelu_tanh, f"h.{i}.mlp"))
    logits = g.op("MatMul", layer_norm(g, h, *w["ln_f"], style="decomposed"), g.weight(w["wte"].T.copy(), "lm_head"))
    return [g.rename(logits, f"{prefix}logits"), *outputs]


def repeated_heads(g: GraphBuilder, t, times: int):
    """[B, KV, T, D] -> [B, KV * times, T, D] as transformers' repeat_kv exports: Unsqueeze, Expand
    to a shape built from Shape(t), Reshape."""
    b, kv, length, d = (g.dim(t, axis) for axis in range(4))
    expanded = g.op("Expand", g.unsqueeze(t, [2]), g.op("Concat", b, kv, g.i64([times]), length, d, axis=0))
    return g.op("Reshape", expanded, g.op("Concat", b, g.op("Mul", kv, g.i64([times])), length, d, axis=0))


def np_decoder(spec: Decoder, w, feeds: Feeds, with_past: bool) -> list[np.ndarray]:
    f = in64(feeds)
    ids, mask = f["input_ids"], f["attention_mask"]
    h = w["wte"][ids].astype(np.float64) + w["wpe"][f["position_ids"]]
    allowed = causal(ids.shape[1], mask.shape[1]) & mask.astype(bool)[:, None, None, :]
    bias = np.where(allowed, 0.0, FLOAT32_MIN)
    outputs = []
    for i in range(spec.layers):
        lw = w[i]
        qkv = np_layer_norm(h, *lw["ln_1"]) @ lw["wqkv"] + lw["bqkv"]
        kv = spec.kv_heads or spec.heads
        q, k, v = np.split(qkv, [spec.hidden, spec.hidden + spec.kv_width], -1)
        q, k, v = np_heads(q, spec.heads), np_heads(k, kv), np_heads(v, kv)
        if with_past:
            k = np.concatenate([f[f"past_key_values.{i}.key"], k], 2)
            v = np.concatenate([f[f"past_key_values.{i}.value"], v], 2)
        outputs += [k, v]
        k, v = (np.repeat(t, spec.heads // kv, axis=1) for t in (k, v))
        h = h + np_merge(np_attention(q, k, v, spec.head_size**-0.5, bias)) @ lw["wo"] + lw["bo"]
        h = h + np_mlp(np_layer_norm(h, *lw["ln_2"]), lw["mlp"], np_gelu_tanh)
    return [np_layer_norm(h, *w["ln_f"]) @ w["wte"].T, *outputs]


def optimum_decoder_with_past(spec: Decoder = Decoder(), name: str = "optimum_decoder_with_past") -> ForeignGraph:
    """Optimum's decoder_with_past_model.onnx for a GPT-2: the cache as past_key_values.N.key/value."""
    rng = np.random.default_rng(14)
    g = GraphBuilder(constants_as_nodes=True, opset=spec.opset)
    w = spec.weights(rng)
    names = decoder_graph(g, spec, w, with_past=True)
    model = make_model(g, "decoder_with_past", *spec.io())

    def reference(feeds):
        return dict(zip(names, np_decoder(spec, w, feeds, with_past=True)))

    batches = [Batch(case, spec.feeds(rng, real, past, new), real[:, past:], real)
               for case, real, past, new in cache_cases(3)]
    caches = dict.fromkeys(spec.cache_names("present"), BHTD)
    return ForeignGraph(name, model, spec.layers, reference, batches, caches=caches)


def optimum_merged_decoder(spec: Decoder = Decoder(layers=1)) -> ForeignGraph:
    """Optimum's decoder_model_merged.onnx: If(use_cache_branch) with the decoder with past in
    one branch and without in the other; both read the outer graph's inputs and weights."""
    rng = np.random.default_rng(15)
    g = GraphBuilder(constants_as_nodes=True, opset=spec.opset)
    w = spec.weights(rng)
    branches = {}
    for branch, with_past in (("then_branch", True), ("else_branch", False)):
        with g.subgraph() as nodes:
            names = decoder_graph(g, spec, w, with_past, prefix=f"{branch}/")
        branches[branch] = helper.make_graph(nodes, branch, [], [value(n, TensorProto.FLOAT, None) for n in names])
    inputs, outputs = spec.io()
    names = [o.name for o in outputs]
    g.nodes.append(helper.make_node("If", ["use_cache_branch"], names, name="optimum::if", **branches))
    model = make_model(g, "decoder_model_merged", [*inputs, value("use_cache_branch", TensorProto.BOOL, [1])], outputs)

    def reference(feeds):
        return dict(zip(names, np_decoder(spec, w, feeds, with_past=bool(feeds["use_cache_branch"][0]))))

    batches = []
    for case, real, past, new in cache_cases(3):
        feeds = {**spec.feeds(rng, real, past, new), "use_cache_branch": np.array([True])}
        batches.append(Batch(f"branch then, {case}", feeds, real[:, past:], real))
    for case, real in padding_cases(3, 6):  # the first step: no cache yet, its inputs empty
        feeds = {**spec.feeds(rng, real, 0, 6), "use_cache_branch": np.array([False])}
        batches.append(Batch(f"branch else, {case}", feeds, real, real))
    caches = dict.fromkeys(spec.cache_names("present"), BHTD)
    return ForeignGraph("optimum_merged_decoder", model, 2 * spec.layers, reference, batches, caches=caches)


def optimum_bloom_with_past(spec: Decoder = Decoder(layers=1)) -> ForeignGraph:
    """Optimum's BLOOM decoder with past: caches laid out [B*H, D, P] (key) and [B*H, P, D]
    (value), their first dim named `batch_size x num_heads` (a product of dims); q, k, v
    packed per head ([B, S, H, 3, D]); ALiBi from the mask's running count; 3-D attention
    as baddbmm exports it; finfo.min where masked."""
    rng = np.random.default_rng(20)
    H, D, hidden = spec.heads, spec.head_size, spec.hidden
    g = GraphBuilder(constants_as_nodes=True, opset=spec.opset)
    w = {"wte": dense(rng, spec.vocab, hidden), "mlp": mlp_weights(rng, hidden, 4 * hidden),
         **{n: norm_weights(rng, hidden) for n in ("ln_emb", "ln_1", "ln_2", "ln_f")},
         "wqkv": dense(rng, hidden, 3 * hidden), "bqkv": vector(rng, 3 * hidden),
         "wo": dense(rng, hidden, hidden), "bo": vector(rng, hidden)}
    slopes = alibi_slopes(H)
    past_k, past_v = spec.cache_names("past_key_values")
    present_k, present_v = spec.cache_names("present")

    def concat(*parts):  # a shape from dims (1-element tensors) and numbers
        return g.op("Concat", *(g.i64([p]) if isinstance(p, int) else p for p in parts), axis=0)

    def norm(x, params):  # opset 14: decomposed
        return layer_norm(g, x, *params, style="decomposed")

    h = norm(g.op("Gather", g.weight(w["wte"], "word_embeddings"), "input_ids", axis=0), w["ln_emb"])
    batch, new = g.dim("input_ids", 0), g.size("input_ids", 1)
    mask = g.op("Cast", "attention_mask", to=TensorProto.FLOAT)
    # ALiBi: slope[h] * ((cumsum(m) - 1) * m), as [B*H, 1, T]
    counts = g.op("Mul", g.op("Sub", g.op("CumSum", mask, g.i64(1)), g.f32(1.0)), mask)
    alibi = g.op("Mul", g.f32(slopes.reshape(1, H, 1)), g.unsqueeze(counts, [1]))
    alibi = g.op("Reshape", alibi, concat(-1, 1, g.dim("attention_mask", 1)))
    total = g.size("attention_mask", 1)
    queries = g.op("Add", g.op("Range", g.i64(0), new, g.i64(1)), g.op("Sub", total, new))
    future = g.op("Greater", g.unsqueeze(g.op("Range", g.i64(0), total, g.i64(1)), [0]), g.unsqueeze(queries, [1]))
    padded = g.op("Not", g.op("Cast", g.unsqueeze("attention_mask", [1, 2]), to=TensorProto.BOOL))
    masked = g.op("Or", future, padded)  # [B, 1, S, T]

    a = norm(h, w["ln_1"])
    fused = g.op("Reshape", linear(g, a, w["wqkv"], w["bqkv"], name="query_key_value"), concat(batch, -1, H, 3, D))
    q, k, v = (g.squeeze(t, [3]) for t in g.split(fused, [1, 1, 1], axis=3))  # each [B, S, H, D]
    q = g.op("Reshape", g.op("Transpose", q, perm=[0, 2, 1, 3]), concat(-1, g.dim(q, 1), D))  # [B*H, S, D]
    k = g.op("Reshape", g.op("Transpose", k, perm=[0, 2, 3, 1]), concat(-1, D, g.dim(k, 1)))  # [B*H, D, S]
    v = g.op("Reshape", g.op("Transpose", v, perm=[0, 2, 1, 3]), concat(-1, g.dim(v, 1), D))  # [B*H, S, D]
    k = g.rename(g.op("Concat", past_k, k, axis=2), present_k)
    v = g.rename(g.op("Concat", past_v, v, axis=1), present_v)
    scores = g.op("Add", alibi, g.op("Mul", g.op("MatMul", q, k), g.f32(D**-0.5)))  # baddbmm(alibi, q, k)
    scores = g.op("Reshape", scores, concat(batch, H, g.dim(scores, 1), g.dim(scores, 2)))
    probs = g.op("Softmax", g.op("Where", masked, g.f32(FLOAT32_MIN), scores), axis=-1)
    probs = g.op("Reshape", probs, concat(-1, g.dim(probs, 2), g.dim(probs, 3)))
    ctx = g.op("MatMul", probs, v)  # [B*H, S, D]
    ctx = g.op("Transpose", g.op("Reshape", ctx, concat(batch, H, g.dim(ctx, 1), D)), perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", ctx, concat(batch, g.dim(ctx, 1), hidden))
    h = g.op("Add", h, linear(g, ctx, w["wo"], w["bo"], name="dense"))
    h = g.op("Add", h, mlp(g, norm(h, w["ln_2"]), w["mlp"], gelu_tanh))
    logits = g.op("MatMul", norm(h, w["ln_f"]), g.weight(w["wte"].T.copy(), "lm_head"))
    g.rename(logits, "logits")

    heads_dim, total_dim = "batch_size x num_heads", "past_sequence_length + sequence_length"
    tokens = token_dims()
    inputs = [value("input_ids", TensorProto.INT64, tokens),
              value("attention_mask", TensorProto.INT64, ["batch_size", total_dim]),
              value(past_k, TensorProto.FLOAT, [heads_dim, D, "past_sequence_length"]),
              value(past_v, TensorProto.FLOAT, [heads_dim, "past_sequence_length", D])]
    outputs = [value("logits", TensorProto.FLOAT, [*tokens, spec.vocab]),
               value(present_k, TensorProto.FLOAT, [heads_dim, D, total_dim]),
               value(present_v, TensorProto.FLOAT, [heads_dim, total_dim, D])]
    model = make_model(g, "bloom_with_past", inputs, outputs)

    def reference(feeds):
        f = in64(feeds)
        ids, m = f["input_ids"], f["attention_mask"].astype(np.float64)
        b, s = ids.shape
        h = np_layer_norm(w["wte"][ids].astype(np.float64), *w["ln_emb"])
        qkv = (np_layer_norm(h, *w["ln_1"]) @ w["wqkv"] + w["bqkv"]).reshape(b, s, H, 3, D)
        q, k, v = (qkv[:, :, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, H, S, D]
        k = np.concatenate([f[past_k].reshape(b, H, D, -1).transpose(0, 1, 3, 2), k], 2)
        v = np.concatenate([f[past_v].reshape(b, H, -1, D), v], 2)
        alibi = slopes[None, :, None, None] * ((np.cumsum(m, 1) - 1) * m)[:, None, None, :]
        allowed = causal(s, m.shape[1]) & m.astype(bool)[:, None, None, :]
        scores = np.where(allowed, alibi + q @ np.swapaxes(k, -1, -2) * D**-0.5, FLOAT32_MIN)
        h = h + np_merge(np_softmax(scores) @ v) @ w["wo"] + w["bo"]
        h = h + np_mlp(np_layer_norm(h, *w["ln_2"]), w["mlp"], np_gelu_tanh)
        present = {present_k: k.transpose(0, 1, 3, 2).reshape(b * H, D, -1), present_v: v.reshape(b * H, -1, D)}
        return {"logits": np_layer_norm(h, *w["ln_f"]) @ w["wte"].T, **present}

    def feeds(real, past, new):
        b = real.shape[0]
        return {"input_ids": rng.integers(0, spec.vocab, (b, new)), "attention_mask": real.astype(np.int64),
                past_k: rng.normal(size=(b * H, D, past)).astype(np.float32),
                past_v: rng.normal(size=(b * H, past, D)).astype(np.float32)}

    batches = [Batch(case, feeds(real, past, new), real[:, past:], real) for case, real, past, new in cache_cases(3)]
    caches = {present_k: ("bh", "d", "t"), present_v: ("bh", "t", "d")}
    return ForeignGraph("optimum_bloom_with_past", model, spec.layers, reference, batches, caches=caches)


# ------------------------------------------------------ Optimum's seq2seq decoder


def seq2seq_decoder_with_past(hidden=16, heads=2, vocab=40, opset=14) -> ForeignGraph:
    """A BART decoder layer as Optimum exports decoder_with_past_model.onnx: self-attention
    over past_key_values.0.decoder.* and cross-attention straight on the encoder cache
    past_key_values.0.encoder.* (dim `encoder_sequence_length_out`, which must equal the
    mask's `encoder_sequence_length`); attention in BART's 3-D [B*H, S, D] layout with q
    scaled after its projection; post-layernorm."""
    rng = np.random.default_rng(16)
    d = hidden // heads
    g = GraphBuilder(constants_as_nodes=True, opset=opset)
    w = {"embed": dense(rng, vocab, hidden), "pos": dense(rng, POSITIONS + 2, hidden),
         "lm_head": dense(rng, hidden, vocab), "mlp": mlp_weights(rng, hidden, 4 * hidden),
         **{a: attention_weights(rng, hidden, hidden, hidden) for a in ("self", "cross")}}
    norms = {n: norm_weights(rng, hidden) for n in ("emb", "self", "cross", "final")}
    ids, enc_mask = "input_ids", "encoder_attention_mask"
    self_k, self_v, enc_k, enc_v = (f"past_key_values.0.{s}.{kv}" for s in ("decoder", "encoder")
                                    for kv in ("key", "value"))

    def concat(*parts):  # a shape from dims (1-element tensors) and numbers
        return g.op("Concat", *(g.i64([p]) if isinstance(p, int) else p for p in parts), axis=0)

    def to_3d(t):  # [B, H, S, D] -> [B*H, S, D]
        return g.op("Reshape", t, concat(-1, g.dim(t, 2), d))

    def heads_of(t):  # [B, S, hidden] -> [B, H, S, D]
        return g.op("Transpose", g.op("Reshape", t, concat(g.dim(t, 0), -1, heads, d)), perm=[0, 2, 1, 3])

    def attend(x, aw, k4, v4, mask):
        q = heads_of(g.op("Mul", linear(g, x, aw["wq"], aw["bq"], name="q_proj"), g.f32(d**-0.5)))
        scores = g.op("MatMul", to_3d(q), g.op("Transpose", to_3d(k4), perm=[0, 2, 1]))  # [B*H, S, T]
        four_d = concat(g.dim(x, 0), heads, g.dim(scores, 1), g.dim(scores, 2))
        scores = g.op("Reshape", g.op("Add", g.op("Reshape", scores, four_d), mask), g.op("Shape", scores))
        ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), to_3d(v4))
        ctx = g.op("Transpose", g.op("Reshape", ctx, concat(g.dim(x, 0), heads, g.dim(ctx, 1), d)), perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", ctx, concat(g.dim(x, 0), g.dim(x, 1), hidden))
        return linear(g, ctx, aw["wo"], aw["bo"], name="out_proj")

    def cache(x, past, n):
        new = heads_of(linear(g, x, w["self"][f"w{n}"], w["self"][f"b{n}"], name=f"{n}_proj"))
        return g.op("Concat", past, new, axis=2)

    new, past = g.size(ids, 1), g.size(self_k, 2)
    positions = g.op("Add", g.op("Range", past, g.op("Add", past, new), g.i64(1)), g.i64(2))  # BART's offset of 2
    h = g.op("Add", g.op("Gather", g.weight(w["embed"], "embed_tokens"), ids, axis=0),
             g.op("Gather", g.weight(w["pos"], "embed_positions"), positions, axis=0))
    h = layer_norm(g, h, *norms["emb"], style="decomposed")

    # Self-attention, BART's causal mask with past: [zeros(S, P), finfo.min above the diagonal of [S, S]].
    i, j = (g.op("Range", g.i64(0), new, g.i64(1)) for _ in range(2))
    above = g.op("Less", g.unsqueeze(j, [0]), g.op("Add", g.unsqueeze(i, [1]), g.i64(1)))
    triangle = g.op("Where", above, g.f32(0.0), g.f32(FLOAT32_MIN))
    zeros = filled(g, concat(g.unsqueeze(new, [0]), g.unsqueeze(past, [0])), 0.0)
    causal_mask = g.unsqueeze(g.op("Concat", zeros, triangle, axis=1), [0, 1])
    k = g.rename(cache(h, self_k, "k"), "present.0.decoder.key")
    v = g.rename(cache(h, self_v, "v"), "present.0.decoder.value")
    h = layer_norm(g, g.op("Add", h, attend(h, w["self"], k, v, causal_mask)), *norms["self"], "decomposed")

    # Cross-attention, BART's _expand_mask: 1 - m, then finfo.min where that is not 0.
    expanded = g.op("Expand", g.unsqueeze(enc_mask, [1, 2]), concat(g.dim(h, 0), 1, g.dim(h, 1), g.dim(enc_mask, 1)))
    inverted = g.op("Sub", g.f32(1.0), g.op("Cast", expanded, to=TensorProto.FLOAT))
    cross_mask = g.op("Where", g.op("Cast", inverted, to=TensorProto.BOOL), g.f32(FLOAT32_MIN), inverted)
    h = layer_norm(g, g.op("Add", h, attend(h, w["cross"], enc_k, enc_v, cross_mask)), *norms["cross"], "decomposed")

    h = layer_norm(g, g.op("Add", h, mlp(g, h, w["mlp"], gelu_erf)), *norms["final"], "decomposed")
    g.rename(g.op("MatMul", h, g.weight(w["lm_head"], "lm_head")), "logits")

    tokens = ["batch_size", "decoder_sequence_length"]
    total = "past_decoder_sequence_length + decoder_sequence_length"
    cache_dims = {self_k: "past_decoder_sequence_length", self_v: "past_decoder_sequence_length",
                  enc_k: "encoder_sequence_length_out", enc_v: "encoder_sequence_length_out"}
    inputs = [value(ids, TensorProto.INT64, tokens),
              value(enc_mask, TensorProto.INT64, ["batch_size", "encoder_sequence_length"]),
              *(value(name, TensorProto.FLOAT, ["batch_size", heads, n, d]) for name, n in cache_dims.items())]
    outputs = [value("logits", TensorProto.FLOAT, [*tokens, vocab]),
               *(value(f"present.0.decoder.{kv}", TensorProto.FLOAT, ["batch_size", heads, total, d])
                 for kv in ("key", "value"))]
    model = make_model(g, "seq2seq_decoder_with_past", inputs, outputs)

    def reference(feeds):
        f = in64(feeds)
        new, past = f[ids].shape[1], f[self_k].shape[2]
        h = np_layer_norm(w["embed"][f[ids]] + w["pos"][np.arange(past, past + new) + 2], *norms["emb"])

        def attend(x, aw, k, v, bias):
            q = np_heads(x @ aw["wq"] + aw["bq"], heads)
            return np_merge(np_attention(q, k, v, d**-0.5, bias)) @ aw["wo"] + aw["bo"]

        k = np.concatenate([f[self_k], np_heads(h @ w["self"]["wk"] + w["self"]["bk"], heads)], 2)
        v = np.concatenate([f[self_v], np_heads(h @ w["self"]["wv"] + w["self"]["bv"], heads)], 2)
        self_bias = np.where(causal(new, past + new), 0.0, FLOAT32_MIN)
        h = np_layer_norm(h + attend(h, w["self"], k, v, self_bias), *norms["self"])
        cross_bias = np.where(f[enc_mask].astype(bool), 0.0, FLOAT32_MIN)[:, None, None, :]
        h = np_layer_norm(h + attend(h, w["cross"], f[enc_k], f[enc_v], cross_bias), *norms["cross"])
        h = np_layer_norm(h + np_mlp(h, w["mlp"], np_gelu_erf), *norms["final"])
        return {"logits": h @ w["lm_head"], "present.0.decoder.key": k, "present.0.decoder.value": v}

    def feeds(real, past, new):
        b, e = real.shape
        lengths = {self_k: past, self_v: past, enc_k: e, enc_v: e}
        caches = {name: rng.normal(size=(b, heads, n, d)).astype(np.float32) for name, n in lengths.items()}
        return {ids: rng.integers(0, vocab, (b, new)), enc_mask: real.astype(np.int64), **caches}

    batches = []
    for past, new in ((0, 3), (4, 1), (4, 2)):
        for case, real in padding_cases(3, 5):  # the encoder's padding; every decoder token is real
            batches.append(Batch(f"encoder {case}, past {past}, {new} new", feeds(real, past, new), None))
    caches = {f"present.0.decoder.{kv}": BHTD for kv in ("key", "value")}
    return ForeignGraph("seq2seq_decoder_with_past", model, 2, reference, batches, caches=caches)


# ------------------------------------------------------------------------- ViT


def vit_224(hidden=16, heads=2, patch=16, image=224, opset=17) -> ForeignGraph:
    """A ViT layer whose [1, 197, hidden] position embeddings accept 224 x 224 images only,
    while the pixel input's dims are all named (batch_size, num_channels, height, width)."""
    rng = np.random.default_rng(17)
    d, grid = hidden // heads, image // patch
    tokens = grid * grid + 1
    g = GraphBuilder(constants_as_nodes=True, opset=opset)
    w = {"conv": rng.normal(0, (3 * patch * patch) ** -0.5, (hidden, 3, patch, patch)).astype(np.float32),
         "conv_b": vector(rng, hidden), "cls": vector(rng, 1, 1, hidden), "pos": vector(rng, 1, tokens, hidden),
         "mlp": mlp_weights(rng, hidden, 2 * hidden), **attention_weights(rng, hidden, hidden, hidden)}
    norms = [norm_weights(rng, hidden) for _ in range(3)]
    pixels = "pixel_values"

    patches = g.op("Conv", pixels, g.weight(w["conv"], "patch.weight"), g.weight(w["conv_b"], "patch.bias"),
                   kernel_shape=[patch, patch], strides=[patch, patch])
    # flatten(2).transpose(1, 2): [B, hidden, h, w] -> [B, h*w, hidden]
    flat = g.op("Reshape", patches, g.op("Concat", g.dim(pixels, 0), g.i64([hidden, -1]), axis=0))
    cls = g.op("Expand", g.weight(w["cls"], "cls_token"), g.op("Concat", g.dim(pixels, 0), g.i64([1, 1]), axis=0))
    h = g.op("Concat", cls, g.op("Transpose", flat, perm=[0, 2, 1]), axis=1)
    h = g.op("Add", h, g.weight(w["pos"], "position_embeddings"))

    a = layer_norm(g, h, *norms[0])
    q, k, v = (heads_first_by_shape(g, linear(g, a, w[f"w{n}"], w[f"b{n}"]), heads, d) for n in "qkv")
    scores = g.op("Div", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.f32(np.sqrt(d)))
    ctx = merged_heads_by_shape(g, g.op("MatMul", g.op("Softmax", scores, axis=-1), v), hidden)
    h = g.op("Add", linear(g, ctx, w["wo"], w["bo"]), h)
    h = g.op("Add", mlp(g, layer_norm(g, h, *norms[1]), w["mlp"], gelu_erf), h)
    g.rename(layer_norm(g, h, *norms[2]), "last_hidden_state")

    inputs = [value(pixels, TensorProto.FLOAT, ["batch_size", "num_channels", "height", "width"])]
    outputs = [value("last_hidden_state", TensorProto.FLOAT, ["batch_size", tokens, hidden])]
    model = make_model(g, "vit", inputs, outputs)

    def reference(feeds):
        x = feeds[pixels].astype(np.float64)
        b = x.shape[0]
        cut = x.reshape(b, 3, grid, patch, grid, patch).transpose(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, -1)
        embedded = cut @ w["conv"].reshape(hidden, -1).T + w["conv_b"]
        h = np.concatenate([np.broadcast_to(w["cls"], (b, 1, hidden)), embedded], 1) + w["pos"]
        h = h + np_self_attention(np_layer_norm(h, *norms[0]), w, heads)
        h = h + np_mlp(np_layer_norm(h, *norms[1]), w["mlp"], np_gelu_erf)
        return {"last_hidden_state": np_layer_norm(h, *norms[2])}

    images = {pixels: rng.normal(size=(2, 3, image, image)).astype(np.float32)}
    return ForeignGraph("vit_224", model, 1, reference, [Batch("no padding, 224 x 224", images, None)])


# ------------------------------------------------- com.microsoft ops upstream


UPSTREAM_OPS = ("EmbedLayerNormalization", "SkipLayerNormalization", "FastGelu")


def microsoft_op_upstream(op: str, vocab=30) -> ForeignGraph:
    """A file another optimizer went over in part: a com.microsoft `op` ahead of a BERT
    attention that is still unfused, then the residual and a LayerNormalization."""
    rng = np.random.default_rng(18)
    layer = BertLayer()
    hidden = layer.hidden
    g = GraphBuilder(opset=layer.opset)
    w = layer.weights(rng)
    up = {"word": dense(rng, vocab, hidden), "type": dense(rng, 2, hidden), "norm": norm_weights(rng, hidden),
          "mlp": {**mlp_weights(rng, hidden, 2 * hidden), "b2": np.zeros(hidden, np.float32)}}
    g2, b2 = norm_weights(rng, hidden)
    gamma, beta = (g.weight(t, n) for t, n in zip(up["norm"], ("gamma", "beta")))
    tokens = token_dims()
    if op == "EmbedLayerNormalization":
        ids = [g.op("Cast", name, to=TensorProto.INT32) for name in ("input_ids", "token_type_ids")]
        tables = [g.weight(up["word"], "word"), g.weight(position_table(hidden), "pos"), g.weight(up["type"], "type")]
        # its outputs: the embeddings and a mask index that nothing reads here
        x, _ = g.op(op, *ids, *tables, gamma, beta, domain=MS, epsilon=EPS, outputs=2)
        inputs = [value(n, TensorProto.INT64, tokens) for n in ("input_ids", "token_type_ids")]
    elif op == "SkipLayerNormalization":
        x = g.op(op, "input_1", "input_2", gamma, beta, domain=MS, epsilon=EPS)
        inputs = [value(n, TensorProto.FLOAT, [*tokens, hidden]) for n in ("input_1", "input_2")]
    else:  # a residual MLP block with its bias and gelu fused
        projected = g.op("MatMul", "input_1", g.weight(up["mlp"]["w1"], "w1"))
        inner = g.op(op, projected, g.weight(up["mlp"]["b1"], "b1"), domain=MS)
        x = g.op("Add", "input_1", g.op("MatMul", inner, g.weight(up["mlp"]["w2"], "w2")))
        inputs = [value("input_1", TensorProto.FLOAT, [*tokens, hidden])]
    attention = bert_self_attention(g, layer, w, x, bert_mask_bias(g, layer, "attention_mask"))
    g.rename(layer_norm(g, g.op("Add", attention, x), g2, b2), "last_hidden_state")
    inputs.append(value("attention_mask", TensorProto.INT64, tokens))
    outputs = [value("last_hidden_state", TensorProto.FLOAT, [*tokens, hidden])]
    model = make_model(g, f"{op}_upstream", inputs, outputs, domains=(MS,))

    def upstream(f):
        if op == "EmbedLayerNormalization":
            words = up["word"][f["input_ids"]] + position_table(hidden)[: f["input_ids"].shape[1]]
            return np_layer_norm(words + up["type"][f["token_type_ids"]], *up["norm"])
        if op == "SkipLayerNormalization":
            return np_layer_norm(f["input_1"] + f["input_2"], *up["norm"])
        return f["input_1"] + np_mlp(f["input_1"], up["mlp"], np_gelu_tanh)

    def reference(feeds):
        f = in64(feeds)
        x = upstream(f)
        attention = np_self_attention(x, w, layer.heads, np_mask_bias(f["attention_mask"]))
        return {"last_hidden_state": np_layer_norm(x + attention, g2, b2)}

    def feeds(real):
        b, s = real.shape
        made = {"input_ids": rng.integers(0, vocab, (b, s)), "attention_mask": real.astype(np.int64),
                "token_type_ids": (np.arange(s) >= s // 2)[None].repeat(b, 0).astype(np.int64),
                "input_1": rng.normal(size=(b, s, hidden)).astype(np.float32),
                "input_2": rng.normal(size=(b, s, hidden)).astype(np.float32)}
        return {i.name: made[i.name] for i in inputs}

    batches = [Batch(case, feeds(real), real) for case, real in padding_cases(3, 6)]
    return ForeignGraph(f"{op}_upstream", model, 1, reference, batches)


# ----------------------------------------------------------- ALBERT as a Loop


def albert_loop(layers=2, vocab=30) -> ForeignGraph:
    """ALBERT shares one layer's weights across its layers: here a Loop that runs the shared
    post-layernorm BERT layer `layers` times, its body reading the mask and the weights from
    the outer graph."""
    rng = np.random.default_rng(19)
    layer = BertLayer()
    hidden = layer.hidden
    g = GraphBuilder(opset=layer.opset)
    w = layer.weights(rng)
    word, emb_norm = dense(rng, vocab, hidden), norm_weights(rng, hidden)
    norms, ffn = [norm_weights(rng, hidden) for _ in range(2)], mlp_weights(rng, hidden, 2 * hidden)

    words = g.op("Gather", g.weight(word, "word_embeddings"), "input_ids", axis=0)
    h0 = layer_norm(g, g.op("Add", words, positions_of(g, "input_ids", hidden)), *emb_norm)
    bias = bert_mask_bias(g, layer, "attention_mask")
    with g.subgraph() as body:
        h = layer_norm(g, g.op("Add", bert_self_attention(g, layer, w, "hidden_in", bias), "hidden_in"), *norms[0])
        g.rename(layer_norm(g, g.op("Add", mlp(g, h, ffn, gelu_erf), h), *norms[1]), "hidden_out")
        body.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    body_inputs = [value("iteration", TensorProto.INT64, []), value("cond_in", TensorProto.BOOL, []),
                   value("hidden_in", TensorProto.FLOAT, None)]
    body_outputs = [value("cond_out", TensorProto.BOOL, []), value("hidden_out", TensorProto.FLOAT, None)]
    body_graph = helper.make_graph(body, "albert_shared_layer", body_inputs, body_outputs)
    g.nodes.append(helper.make_node("Loop", [g.i64(layers), "", h0], ["last_hidden_state"], body=body_graph))

    tokens = token_dims()
    inputs = [value(n, TensorProto.INT64, tokens) for n in ("input_ids", "attention_mask")]
    model = make_model(g, "albert_loop", inputs, [value("last_hidden_state", TensorProto.FLOAT, [*tokens, hidden])])

    def reference(feeds):
        ids = feeds["input_ids"]
        h = np_layer_norm(word[ids].astype(np.float64) + position_table(hidden)[: ids.shape[1]], *emb_norm)
        bias = np_mask_bias(feeds["attention_mask"])
        for _ in range(layers):
            h = np_layer_norm(h + np_self_attention(h, w, layer.heads, bias), *norms[0])
            h = np_layer_norm(h + np_mlp(h, ffn, np_gelu_erf), *norms[1])
        return {"last_hidden_state": h}

    def feeds(real):
        return {"input_ids": rng.integers(0, vocab, real.shape), "attention_mask": real.astype(np.int64)}

    batches = [Batch(case, feeds(real), real) for case, real in padding_cases(3, 6)]
    return ForeignGraph("albert_loop", model, 1, reference, batches)


# ------------------------------------------------------------ broken on purpose

UNDEFINED_TENSOR = "encoder.layer.0.attention.output.dense.bias_missing"


def reads_undefined_tensor() -> onnx.ModelProto:
    """The BERT layer with its output projection's bias Add reading a tensor nothing defines."""
    model = bert_attention_layer().model
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name.startswith("attention.output.dense.bias"):
                node.input[i] = UNDEFINED_TENSOR
                return model
    raise AssertionError("the layer has no output projection bias")


# ------------------------------------------------------------------- registry

BERT_VARIANTS = {
    "bert_attention": BertLayer(),
    "opset16_layernorm": BertLayer(opset=16),
    "opset11_decomposed_layernorm": BertLayer(opset=11, layernorm="decomposed"),
    "pruned_heads": BertLayer(heads=2),  # q, k, v 8 wide in a 16-wide model
    "qk_wider_than_v": BertLayer(heads=2, qk_head=12, v_head=8),
    "switched_add_operands": BertLayer(switch_add=True),
    "float_mask": BertLayer(mask="float"),
    "mask_3d": BertLayer(mask="3d"),
    "static_shapes": BertLayer(fixed=(1, 3)),
    "first_token_pooler": BertLayer(pooler=True),  # reads a padded position under left padding
}

FOREIGN_GRAPHS: dict[str, Callable[[], ForeignGraph]] = {
    **{name: (lambda n=name, layer=layer: bert_attention_layer(layer, n)) for name, layer in BERT_VARIANTS.items()},
    "tf2onnx_einsum": tf2onnx_einsum_bert,
    "gpt2_past": gpt2_with_past,
    "optimum_decoder_with_past": optimum_decoder_with_past,
    # transformers 4.x's Llama under Optimum: grouped heads repeated after the cache, the mask
    # sliced to the repeated keys' length (a Shape read downstream of the cache)
    "optimum_grouped_decoder": lambda: optimum_decoder_with_past(
        Decoder(hidden=32, heads=4, kv_heads=2, mask_by_keys=True), "optimum_grouped_decoder"),
    "optimum_merged_decoder": optimum_merged_decoder,
    "optimum_bloom_with_past": optimum_bloom_with_past,
    "seq2seq_decoder_with_past": seq2seq_decoder_with_past,
    "vit_224": vit_224,
    **{f"{op}_upstream": (lambda op=op: microsoft_op_upstream(op)) for op in UPSTREAM_OPS},
    "albert_loop": albert_loop,
}
