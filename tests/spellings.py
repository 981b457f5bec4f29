"""One self-attention layer, written in many of the ways exporters write it.

`build_attention_graph(spec)` makes an ONNX model of

    y = merge(softmax(q @ k^T * scale + alibi + mask) @ v) @ Wo + bo

where every `Spelling` field picks, independently of the others, how one part of
that is spelled: the projections, the head split, the K transpose, where the scale
sits, how the mask is built and applied, what surrounds the softmax, the head merge.
The maths never changes with the spelling; `reference_attention` computes it in
numpy from the meaning alone, which is how the builder itself is checked.

Three fields change the file around the same maths: `opset` (the ops whose signatures
moved between opsets, Split and the reductions, are written as that opset defines them),
`shapes` (symbolic dims, or the batch and sequence fixed in the graph) and `dtype`
(float16 is the float32 graph converted as users convert it, by ONNX Runtime's
`convert_float_to_float16`).

`Spelling(defect=...)` swaps one step for something that is *not* attention (see
`DEFECTS`), for the negative tests.
"""
from __future__ import annotations

import contextlib
import itertools
import warnings
from dataclasses import dataclass, field, fields, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 20
MAX_SEQ = 32  # the stored causal triangle is [MAX_SEQ, MAX_SEQ]
FLOAT32_MIN = float(np.finfo(np.float32).min)
# How far (relative to the output's largest magnitude) two correct computations of a layer
# may be apart. float16 rounds every op's result to an 11-bit significand: the zoo's
# float16 conversions are 0.7e-3 to 1.6e-3 from their float32 originals, so two float16
# computations (original and fused) can be ~3e-3 apart; 2e-2 leaves room for other orders
# of accumulation and is still far below what a wrong mask or scale does (1e-1 and more).
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}


def choice(*options):
    """A spelling field: its default is the first option; the strategy draws from all."""
    return field(default=options[0], metadata={"choices": options})


@dataclass(frozen=True)
class Spelling:
    heads: int = choice(2, 1, 4)
    head_size: int = choice(8, 16)
    # "separate": three MatMul(+Add); "packed_split"/"packed_slice": one MatMul [h, 3h]
    # (+Add) cut into q, k, v by Split or by three Slices.
    projection: str = choice("separate", "packed_split", "packed_slice")
    proj_bias: bool = choice(True, False)
    # Reshape to [B, S, H, D] by a constant [0, 0, H, D], or by a shape computed with
    # Shape/Gather/Unsqueeze/Concat (TorchScript).
    head_split: str = choice("constant_shape", "shape_ops")
    # k^T as [B, H, D, S]: one Transpose(0, 2, 3, 1), or Transpose(0, 2, 1, 3) then (0, 1, 3, 2).
    k_transpose: str = choice("perm_0231", "two_transposes")
    # Where the scale 1/sqrt(d) is applied (see SCALINGS).
    scale: str = choice("mul_scores", "div_scores", "mul_q", "sqrt_split", "computed")
    # Padding: none; "bool": Cast(m, bool) applied with `mask_style`; "inverted":
    # (1 - Cast(m, float)) * -10000 added to the scores.
    padding: str = choice("none", "bool", "inverted")
    # Causal triangle: none; a stored lower triangle sliced to [S, S]; Not(Less(i, j)) from Range.
    causal: str = choice("none", "sliced_triangle", "range_less")
    # How the boolean "allowed" mask (padding And causal) is applied (see MASK_STYLES).
    mask_style: str = choice("add_where", "where_scores", "where_not_scores")
    fill: str = choice("-inf", "finfo_min")
    # ALiBi-style bias [1, H, S, S] built from Range: slope[h] * (j - i), or -slope[h] * |i - j|.
    alibi: str = choice("none", "relative", "distance")
    softmax_axis: int = choice(-1, 3)
    cast_before_softmax: bool = choice(False, True)
    nan_guard: bool = choice(False, True)  # Where(IsNaN(p), 0, p), as SDPA decompositions do
    passthrough: str = choice("none", "identity", "dropout")  # on the probabilities
    head_merge: str = choice("constant_shape", "shape_ops")
    # Small constants as graph initializers (dynamo) or Constant nodes (TorchScript).
    constants: str = choice("initializer", "constant_node")
    opset: int = choice(OPSET, 16, 17, 18)
    # Batch and sequence as named dims, or fixed in the graph to the size it is run at.
    shapes: str = choice("symbolic", "fixed")
    dtype: str = choice("float32", "float16")
    defect: str = "none"  # one of DEFECTS: not attention any more

    @property
    def hidden(self) -> int:
        return self.heads * self.head_size

    @property
    def has_padding(self) -> bool:
        return self.padding != "none"


def spelling_choices() -> dict[str, tuple]:
    """Field name -> the options a property test may draw."""
    return {f.name: f.metadata["choices"] for f in fields(Spelling) if "choices" in f.metadata}


def one_change_each(base: Spelling) -> dict[str, Spelling]:
    """`base` with one field set to each of its other options in turn, by "field=option"."""
    return {
        f"{name}={option}": replace(base, **{name: option})
        for name, options in spelling_choices().items()
        for option in options
        if option != getattr(base, name)
    }


# A padded, causal base, so that every choice (mask style and fill included) shows.
ONE_CHANGE_EACH = one_change_each(Spelling(padding="bool", causal="range_less"))


# --------------------------------------------------------------------------- graph


class GraphBuilder:
    """Appends nodes and constants to a graph; every op returns its output name(s)."""

    def __init__(self, constants_as_nodes: bool = False, opset: int = OPSET):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.constants_as_nodes = constants_as_nodes
        self.opset = opset
        self._ids = itertools.count()

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    def rename(self, value: str, name: str) -> str:
        """Call `value` `name` from now on (a graph output's name), in the node that writes it and its readers."""
        for node in self.nodes:
            for names in (node.input, node.output):
                for i, old in enumerate(names):
                    if old == value:
                        names[i] = name
        return name

    @contextlib.contextmanager
    def subgraph(self):
        """Nodes made inside go to the yielded list (an If branch, a Loop body); weights and
        constant initializers stay in the main graph, which the subgraph reads by outer scope."""
        outer, self.nodes = self.nodes, []
        try:
            yield self.nodes
        finally:
            self.nodes = outer

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(op_type), **attrs))
        return names[0] if outputs == 1 else names

    def weight(self, array: np.ndarray, hint: str) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def const(self, value, dtype) -> str:
        tensor = numpy_helper.from_array(np.asarray(value, dtype), self.fresh("c"))
        if not self.constants_as_nodes:
            self.initializers.append(tensor)
            return tensor.name
        return self.op("Constant", value=tensor)

    def i64(self, value) -> str:
        return self.const(value, np.int64)

    def f32(self, value) -> str:
        return self.const(value, np.float32)

    # Ops whose axes moved from an attribute to an input: written as `self.opset` defines them.

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        if self.opset < 13:
            return self.op("Unsqueeze", x, axes=axes)
        return self.op("Unsqueeze", x, self.i64(axes))

    def squeeze(self, x: str, axes: list[int]) -> str:
        if self.opset < 13:
            return self.op("Squeeze", x, axes=axes)
        return self.op("Squeeze", x, self.i64(axes))

    def split(self, x: str, sizes: list[int], axis: int) -> list[str]:
        """Split into parts of `sizes`; equal parts from opset 18 by `num_outputs`, as exporters write it."""
        n = len(sizes)
        if self.opset < 13:
            return self.op("Split", x, axis=axis, split=sizes, outputs=n)
        if self.opset >= 18 and len(set(sizes)) == 1:
            return self.op("Split", x, axis=axis, num_outputs=n, outputs=n)
        return self.op("Split", x, self.i64(sizes), axis=axis, outputs=n)

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        """ReduceMean, ReduceMax, ...: axes an input from opset 18 (ReduceSum from 13)."""
        if self.opset >= (13 if op_type == "ReduceSum" else 18):
            return self.op(op_type, x, self.i64(axes), keepdims=keepdims)
        return self.op(op_type, x, axes=axes, keepdims=keepdims)

    def size(self, tensor: str, axis: int) -> str:
        """Shape(tensor)[axis] as an int64 scalar (Shape, Gather)."""
        return self.op("Gather", self.op("Shape", tensor), self.i64(axis), axis=0)

    def dim(self, tensor: str, axis: int) -> str:
        """Shape(tensor)[axis] as a 1-element int64 tensor (Shape, Gather, Unsqueeze)."""
        return self.unsqueeze(self.size(tensor, axis), [0])

    def seq_len(self, tensor: str) -> str:
        """Shape(tensor)[1] as an int64 scalar."""
        return self.size(tensor, 1)


# ----------------------------------------------------------------------- weights


def attention_weights(spec: Spelling) -> dict[str, np.ndarray]:
    """The layer's parameters, seeded; biases are zero when the spelling has none."""
    rng = np.random.default_rng(1234)
    h = spec.hidden
    weights = {}
    for name in ("q", "k", "v", "o"):
        weights[f"w{name}"] = rng.normal(0, 1 / np.sqrt(h), (h, h)).astype(np.float32)
        bias = rng.normal(0, 0.1, h).astype(np.float32)
        weights[f"b{name}"] = bias if spec.proj_bias else np.zeros_like(bias)
    return weights


def alibi_slopes(heads: int) -> np.ndarray:
    return np.array([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], np.float32)


# ----------------------------------------------------------------- projections


def linear(g: GraphBuilder, spec: Spelling, x: str, w: np.ndarray, b: np.ndarray, hint: str) -> str:
    y = g.op("MatMul", x, g.weight(w, f"w{hint}"))
    return g.op("Add", y, g.weight(b, f"b{hint}")) if spec.proj_bias else y


def separate_projections(g, spec, w, x):
    return [linear(g, spec, x, w[f"w{n}"], w[f"b{n}"], n) for n in "qkv"]


def packed_projection(g, spec, w, x):
    packed_w = np.concatenate([w["wq"], w["wk"], w["wv"]], axis=1)
    packed_b = np.concatenate([w["bq"], w["bk"], w["bv"]])
    return linear(g, spec, x, packed_w, packed_b, "qkv")


def packed_split(g, spec, w, x):
    return g.split(packed_projection(g, spec, w, x), [spec.hidden] * 3, axis=2)


def packed_slice(g, spec, w, x):
    qkv, h = packed_projection(g, spec, w, x), spec.hidden
    return [g.op("Slice", qkv, g.i64([i * h]), g.i64([(i + 1) * h]), g.i64([2])) for i in range(3)]


PROJECTIONS = {"separate": separate_projections, "packed_split": packed_split, "packed_slice": packed_slice}


# ------------------------------------------------------------ head split / merge


def split_heads(g: GraphBuilder, spec: Spelling, t: str) -> str:
    """[B, S, H*D] -> [B, S, H, D]."""
    if spec.head_split == "constant_shape":
        shape = g.i64([0, 0, spec.heads, spec.head_size])
    else:
        shape = g.op("Concat", g.dim(t, 0), g.dim(t, 1), g.i64([spec.heads]), g.i64([spec.head_size]), axis=0)
    return g.op("Reshape", t, shape)


def to_heads_first(g: GraphBuilder, t: str) -> str:
    """[B, S, H, D] -> [B, H, S, D]."""
    return g.op("Transpose", t, perm=[0, 2, 1, 3])


def transposed_keys(g: GraphBuilder, spec: Spelling, k: str) -> str:
    """[B, S, H, D] -> [B, H, D, S]."""
    if spec.k_transpose == "perm_0231":
        return g.op("Transpose", k, perm=[0, 2, 3, 1])
    return g.op("Transpose", to_heads_first(g, k), perm=[0, 1, 3, 2])


def merge_heads(g: GraphBuilder, spec: Spelling, ctx: str) -> str:
    """[B, H, S, D] -> [B, S, H*D]."""
    if spec.defect == "merge_without_transpose":
        return g.op("Reshape", ctx, g.i64([0, -1, spec.hidden]))
    ctx = g.op("Transpose", ctx, perm=[0, 2, 1, 3])
    if spec.head_merge == "constant_shape":
        shape = g.i64([0, 0, spec.hidden])
    else:
        shape = g.op("Concat", g.dim(ctx, 0), g.dim(ctx, 1), g.i64([spec.hidden]), axis=0)
    return g.op("Reshape", ctx, shape)


# ------------------------------------------------------------------------ scale


def scale_value(spec: Spelling) -> float:
    return 1.0 / np.sqrt(spec.head_size)


def mul_scores(g, spec, q, kt):
    return g.op("Mul", g.op("MatMul", q, kt), g.f32(scale_value(spec)))


def div_scores(g, spec, q, kt):
    return g.op("Div", g.op("MatMul", q, kt), g.f32(np.sqrt(spec.head_size)))


def mul_q(g, spec, q, kt):
    return g.op("MatMul", g.op("Mul", q, g.f32(scale_value(spec))), kt)


def sqrt_split(g, spec, q, kt):
    root = g.f32(np.sqrt(scale_value(spec)))
    return g.op("MatMul", g.op("Mul", q, root), g.op("Mul", kt, root))


def computed_scale(g, spec, q, kt):
    """scale = Div(1, Sqrt(Cast(d))) from an int64 head size."""
    root = g.op("Sqrt", g.op("Cast", g.i64(spec.head_size), to=TensorProto.FLOAT))
    return g.op("Mul", g.op("MatMul", q, kt), g.op("Div", g.f32(1.0), root))


SCALINGS = {
    "mul_scores": mul_scores,
    "div_scores": div_scores,
    "mul_q": mul_q,
    "sqrt_split": sqrt_split,
    "computed": computed_scale,
}


# ------------------------------------------------------------------ mask, bias


def positions(g: GraphBuilder, x: str) -> tuple[str, str]:
    """Query index i as [S, 1] and key index j as [1, S], int64, from Range."""
    r = g.op("Range", g.i64(0), g.seq_len(x), g.i64(1))
    return g.unsqueeze(r, [1]), g.unsqueeze(r, [0])


def padding_as_float(g: GraphBuilder) -> str:
    """attention_mask [B, S] -> [B, 1, 1, S] float, by Unsqueeze twice and Cast."""
    m = g.unsqueeze(g.unsqueeze("attention_mask", [1]), [2])
    return g.op("Cast", m, to=TensorProto.FLOAT)


def inverted_padding(g: GraphBuilder, spec: Spelling) -> str:
    """(1 - m) * -10000; the "boosting_padding" defect writes +10000."""
    value = 10000.0 if spec.defect == "boosting_padding" else -10000.0
    return g.op("Mul", g.op("Sub", g.f32(1.0), padding_as_float(g)), g.f32(value))


def padding_as_bool(g: GraphBuilder) -> str:
    """attention_mask [B, S] -> [B, 1, 1, S] bool."""
    m = g.unsqueeze("attention_mask", [1, 2])
    return g.op("Cast", m, to=TensorProto.BOOL)


def sliced_triangle(g: GraphBuilder, x: str) -> str:
    """A stored [1, 1, MAX, MAX] lower triangle sliced to [1, 1, S, S] (GPT-2's `bias` buffer)."""
    triangle = g.const(np.tril(np.ones((1, 1, MAX_SEQ, MAX_SEQ), bool)), bool)
    s = g.unsqueeze(g.seq_len(x), [0])
    return g.op("Slice", triangle, g.i64([0, 0]), g.op("Concat", s, s, axis=0), g.i64([2, 3]))


def range_less(g: GraphBuilder, x: str) -> str:
    """Not(i < j) over Range positions: [S, S] bool."""
    i, j = positions(g, x)
    return g.op("Not", g.op("Less", i, j))


CAUSAL = {"sliced_triangle": sliced_triangle, "range_less": range_less}


def allowed_keys(g: GraphBuilder, spec: Spelling, x: str) -> str | None:
    """The boolean mask, padding And causal, or None when the spelling has neither."""
    parts = []
    if spec.padding == "bool":
        parts.append(padding_as_bool(g))
    if spec.causal != "none":
        parts.append(CAUSAL[spec.causal](g, x))
    return g.op("And", *parts) if len(parts) == 2 else (parts[0] if parts else None)


def fill_value(spec: Spelling) -> float:
    return -np.inf if spec.fill == "-inf" else FLOAT32_MIN


def add_where(g, spec, scores, allowed):
    return g.op("Add", scores, g.op("Where", allowed, g.f32(0.0), g.f32(fill_value(spec))))


def where_scores(g, spec, scores, allowed):
    return g.op("Where", allowed, scores, g.f32(fill_value(spec)))


def where_not_scores(g, spec, scores, allowed):
    return g.op("Where", g.op("Not", allowed), g.f32(fill_value(spec)), scores)


MASK_STYLES = {"add_where": add_where, "where_scores": where_scores, "where_not_scores": where_not_scores}


def alibi_bias(g: GraphBuilder, spec: Spelling, x: str) -> str:
    """[1, H, S, S]: slope[h] * (j - i), or -slope[h] * |i - j|."""
    i, j = positions(g, x)
    relative = g.op("Cast", g.op("Sub", j, i), to=TensorProto.FLOAT)
    slopes = g.f32(alibi_slopes(spec.heads).reshape(1, spec.heads, 1, 1))
    if spec.alibi == "relative":
        return g.op("Mul", slopes, relative)
    return g.op("Neg", g.op("Mul", slopes, g.op("Abs", relative)))


def biased_and_masked(g: GraphBuilder, spec: Spelling, scores: str, x: str) -> str:
    if spec.alibi != "none":
        scores = g.op("Add", scores, alibi_bias(g, spec, x))
    if spec.padding == "inverted":
        scores = g.op("Add", scores, inverted_padding(g, spec))
    allowed = allowed_keys(g, spec, x)
    return MASK_STYLES[spec.mask_style](g, spec, scores, allowed) if allowed else scores


# ---------------------------------------------------------------- probabilities


def normalised(g: GraphBuilder, spec: Spelling, scores: str) -> str:
    if spec.cast_before_softmax:
        scores = g.op("Cast", scores, to=TensorProto.FLOAT)
    if spec.defect == "sigmoid":
        return g.op("Sigmoid", scores)
    if spec.defect == "unnormalised_exp":
        return g.op("Exp", scores)
    axis = 2 if spec.defect == "softmax_over_queries" else spec.softmax_axis
    return g.op("Softmax", scores, axis=axis)


def guarded(g: GraphBuilder, spec: Spelling, probs: str) -> str:
    if spec.nan_guard:
        probs = g.op("Where", g.op("IsNaN", probs), g.f32(0.0), probs)
    if spec.passthrough == "identity":
        probs = g.op("Identity", probs)
    elif spec.passthrough == "dropout":
        probs = g.op("Dropout", probs, g.f32(0.1))  # no training_mode: inference, a no-op
    if spec.defect == "probs_squared":
        probs = g.op("Mul", probs, probs)
    return probs


def context(g: GraphBuilder, spec: Spelling, probs: str, v: str) -> str:
    if spec.defect == "v_scaled_elementwise":
        return g.op("Mul", g.reduce("ReduceMax", probs, [-1]), v)
    return g.op("MatMul", probs, v)


# ------------------------------------------------------------------------ model


DEFECTS = (
    "sigmoid",  # Sigmoid instead of Softmax
    "unnormalised_exp",  # Exp without the normalisation
    "softmax_over_queries",  # Softmax(axis=2)
    "merge_without_transpose",  # [B, H, S, D] reshaped as if it were [B, S, H, D]
    "v_scaled_elementwise",  # max(p) * v instead of p @ v
    "probs_squared",  # (p * p) @ v
)
# Still attention (an additive bias), but it must not be taken for a padding mask.
BOOSTING_PADDING = "boosting_padding"


def build_attention_graph(spec: Spelling, batch: int = 3, seq: int = 6) -> onnx.ModelProto:
    """The layer as `spec` spells it; `batch` and `seq` are its fixed dims when `spec.shapes` is "fixed"."""
    g = GraphBuilder(constants_as_nodes=spec.constants == "constant_node", opset=spec.opset)
    w = attention_weights(spec)
    x = "x"
    q, k, v = PROJECTIONS[spec.projection](g, spec, w, x)
    q, k, v = (split_heads(g, spec, t) for t in (q, k, v))
    scores = SCALINGS[spec.scale](g, spec, to_heads_first(g, q), transposed_keys(g, spec, k))
    scores = biased_and_masked(g, spec, scores, x)
    probs = guarded(g, spec, normalised(g, spec, scores))
    merged = merge_heads(g, spec, context(g, spec, probs, to_heads_first(g, v)))
    g.rename(linear(g, spec, merged, w["wo"], w["bo"], "o"), "y")

    tokens = [batch, seq] if spec.shapes == "fixed" else ["batch", "seq"]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*tokens, spec.hidden])]
    if spec.has_padding:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, tokens))
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*tokens, spec.hidden])
    model = make_model(g, "attention", inputs, [output])
    return to_float16(model) if spec.dtype == "float16" else model


def make_model(g: GraphBuilder, name: str, inputs: list, outputs: list, domains: tuple[str, ...] = ()):
    """The builder's graph as a model of its opset, with the IR version that opset came with."""
    opsets = [helper.make_opsetid("", g.opset), *(helper.make_opsetid(d, 1) for d in domains)]
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets[:1]))


def to_float16(model: onnx.ModelProto, keep_io_types: bool = False) -> onnx.ModelProto:
    """The model in float16, inputs and outputs included (float32 with `keep_io_types`), converted the way
    users convert."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():  # it warns of every constant it clips to float16's range (-inf, finfo.min)
        warnings.simplefilter("ignore")
        return convert_float_to_float16(model, keep_io_types=keep_io_types)


# The spelling the negative graphs start from: several heads (with one head, merging
# without the transpose happens to be right) and the (1 - m) * -10000 padding (which
# the boosting defect turns into +10000).
NEGATIVE_BASE = Spelling(heads=2, padding="inverted")


def build_not_attention(defect: str, spec: Spelling = NEGATIVE_BASE) -> onnx.ModelProto:
    """A graph shaped like attention with one step changed (see DEFECTS, BOOSTING_PADDING)."""
    return build_attention_graph(replace(spec, defect=defect))


# -------------------------------------------------------------------- reference


def reference_attention(spec: Spelling, weights: dict, x: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
    """softmax(q k^T * scale + alibi + mask) v, merged, projected: in float64, from the meaning."""
    assert spec.defect == "none", "the reference knows attention only"
    w = {name: value.astype(np.float64) for name, value in weights.items()}
    x = x.astype(np.float64)
    b, s, _ = x.shape
    h, d = spec.heads, spec.head_size

    def heads(name):
        return (x @ w[f"w{name}"] + w[f"b{name}"]).reshape(b, s, h, d).transpose(0, 2, 1, 3)

    q, k, v = heads("q"), heads("k"), heads("v")
    scores = q @ k.transpose(0, 1, 3, 2) * scale_value(spec)

    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    slopes = alibi_slopes(h).astype(np.float64)[None, :, None, None]
    if spec.alibi == "relative":
        scores = scores + slopes * (j - i)
    elif spec.alibi == "distance":
        scores = scores - slopes * np.abs(i - j)

    allowed = np.ones((b, 1, s, s), bool)
    if spec.has_padding:
        allowed &= attention_mask.astype(bool)[:, None, None, :]
    if spec.causal != "none":
        allowed &= j <= i
    scores = np.where(allowed, scores, -np.inf)

    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    merged = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, h * d)
    return merged @ w["wo"] + w["bo"]


def attention_inputs(spec: Spelling, lengths: list[int], seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for the built graph: x random (padded rows too), right padding to `lengths`."""
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.normal(size=(len(lengths), seq, spec.hidden)).astype(spec.dtype)}
    if spec.has_padding:
        feeds["attention_mask"] = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return feeds
