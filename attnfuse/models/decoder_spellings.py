"""RMSNorm and rotary embeddings as small ONNX graphs, spelled as exporters write them.

`norm_model(NormSpelling(...))` makes

    y = x / sqrt(mean(x^2, last axis) + eps) * w        (x = h, or h + r with the sum an output too)

or, with `layer`, the LayerNorm of older exports, written out: the same of x - mean(x), plus b
("centred"), or tf2onnx's x * s + (b - mean(x) * s) with s = w / sqrt(var + eps) ("tf").

and `rotary_model(RotarySpelling(...))` makes q and k ([batch, sequence, heads * head_size]
inputs) split into heads and rotated:

    rotary(x) = x * cos + rotate(x) * sin    on the first `rotary` entries of each head

Each field picks, independently, how one part is spelled (the square, the inverse root, the
weight, the rotate-half or interleaved form, the head layout, where cos and sin come from);
`norm_reference` and `rotary_reference` compute the meaning in numpy. `defect` swaps one step
for something that is not the construct any more, for the negative tests.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
BASE = 10000.0


class _Graph:
    """Nodes and initializers; every op returns its output's name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._ids = itertools.count()

    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        name = f"{op_type.lower()}_{next(self._ids)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attributes))
        return name

    def const(self, value, dtype=np.float32) -> str:
        name = f"c_{next(self._ids)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: dict[str, str]) -> onnx.ModelProto:
        for name, value in outputs.items():  # the graph's output names
            for node in self.nodes:
                node.output[:] = [name if out == value else out for out in node.output]
                node.input[:] = [name if x == value else x for x in node.input]
        graph = helper.make_graph(self.nodes, "decoder_spelling", inputs,
                                  [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
                                  initializer=self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)


def _activation(name: str, width: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "sequence", width])


# --------------------------------------------------------------------------- RMSNorm

NORM_DEFECTS = ("none", "no_eps", "mean_over_tokens", "eps_outside_sqrt", "scaled_mean")


@dataclass(frozen=True)
class NormSpelling:
    hidden: int = 64
    eps: float = 1e-6
    square: str = "pow"  # "pow": Pow(x, 2); "mul": x * x
    inverse: str = "reciprocal"  # x * Reciprocal(Sqrt(.)); "div": x / Sqrt(.); "one_over": x * (1 / Sqrt(.))
    weight: str = "w"  # "w"; "one_plus_w": (1 + w) computed in the graph (Gemma); "none"
    residual: bool = False  # x = h + r, and the sum is an output too (the next residual reads it)
    cast: bool = False  # Cast to float32 around the norm, as transformers writes it
    layer: str = ""  # "": RMSNorm; "centred" or "tf": a LayerNorm written out (see above)
    defect: str = "none"  # one of NORM_DEFECTS


def norm_weight(spec: NormSpelling) -> np.ndarray:
    return np.random.default_rng(1).uniform(0.5, 1.5, spec.hidden).astype(np.float32)


def norm_bias(spec: NormSpelling) -> np.ndarray:
    return np.random.default_rng(2).uniform(-0.5, 0.5, spec.hidden).astype(np.float32)


def norm_model(spec: NormSpelling) -> onnx.ModelProto:
    g = _Graph()
    x = g.op("Add", "h", "r") if spec.residual else "h"
    inner = g.op("Cast", x, to=TensorProto.FLOAT) if spec.cast else x
    if spec.layer:
        mean_x = g.op("ReduceMean", inner, g.const([-1], np.int64), keepdims=1)
        source, inner = inner, g.op("Sub", inner, mean_x)
    square = g.op("Pow", inner, g.const(2.0)) if spec.square == "pow" else g.op("Mul", inner, inner)
    axis = 1 if spec.defect == "mean_over_tokens" else -1
    mean = g.op("ReduceMean", square, g.const([axis], np.int64), keepdims=1)
    if spec.defect == "scaled_mean":
        mean = g.op("Mul", mean, g.const(2.0))
    if spec.defect == "eps_outside_sqrt":
        root = g.op("Add", g.op("Sqrt", mean), g.const(spec.eps))
    else:
        root = g.op("Sqrt", mean if spec.defect == "no_eps" else g.op("Add", mean, g.const(spec.eps)))
    if spec.layer == "tf":  # x * s + (b - mean * s), s = w / sqrt(var + eps)
        scale = g.op("Mul", g.op("Reciprocal", root), g.const(norm_weight(spec)))
        y = g.op("Add", g.op("Mul", source, scale), g.op("Sub", g.const(norm_bias(spec)), g.op("Mul", mean_x, scale)))
        inputs = [_activation("h", spec.hidden)] + ([_activation("r", spec.hidden)] if spec.residual else [])
        return g.model(inputs, {"y": y, **({"sum": x} if spec.residual else {})})
    if spec.inverse == "div":
        normed = g.op("Div", inner, root)
    elif spec.inverse == "one_over":
        normed = g.op("Mul", inner, g.op("Div", g.const(1.0), root))
    else:
        normed = g.op("Mul", inner, g.op("Reciprocal", root))
    if spec.cast:
        normed = g.op("Cast", normed, to=TensorProto.FLOAT)
    weight = norm_weight(spec)
    if spec.weight == "one_plus_w":
        y = g.op("Mul", normed, g.op("Add", g.const(1.0), g.const(weight - 1.0)))
    elif spec.weight == "w":
        y = g.op("Mul", g.const(weight), normed)
    else:
        y = normed
    if spec.layer:
        y = g.op("Add", y, g.const(norm_bias(spec)))
    inputs = [_activation("h", spec.hidden)] + ([_activation("r", spec.hidden)] if spec.residual else [])
    return g.model(inputs, {"y": y, **({"sum": x} if spec.residual else {})})


def norm_reference(spec: NormSpelling, h: np.ndarray, r: np.ndarray | None = None) -> np.ndarray:
    """What the norm computes (the defect-free spelling)."""
    x = (h + r if spec.residual else h).astype(np.float64)
    weight = norm_weight(spec) if spec.weight != "none" or spec.layer == "tf" else 1.0
    if spec.layer:
        x = x - x.mean(-1, keepdims=True)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + spec.eps) * weight
    return y + norm_bias(spec) if spec.layer else y


# --------------------------------------------------------------------------- rotary

ROTARY_DEFECTS = ("none", "sign", "unrotated", "cos_twice")


@dataclass(frozen=True)
class RotarySpelling:
    heads: int = 4
    kv_heads: int = 2
    head_size: int = 16
    rotary: int = 16  # rotated entries per head: partial (Phi) when less than head_size
    form: str = "half"  # "half": rotate_half (-x2, x1); "interleaved": pairs (-x1, x0, ...) as GPT-J
    layout: str = "bhsd"  # heads as [B, H, S, D] (Llama); "bshd": [B, S, H, D] (GPT-J); "flat": back to [B, S, H*D]
    angles: str = "positions"  # inv_freq * position_ids -> Cos, Sin; "table": Gather from constant tables
    # by position_ids; "arange": positions 0..S-1 from the shape, shared by the rows of the batch
    negate: str = "neg"  # "neg": Neg; "mul": Mul by -1
    defect: str = "none"  # one of ROTARY_DEFECTS
    table_rows: int = 64  # positions the "table" spelling's cos and sin tables hold
    scaling: float | None = None  # cos and sin times this (transformers' attention_scaling: YaRN, LongRoPE)

    def inv_freq(self) -> np.ndarray:
        return (1.0 / BASE ** (np.arange(0, self.rotary, 2) / self.rotary)).astype(np.float32)


# The rotary spellings exporters write (tests run each through the rule alone and through the pipeline).
ROTARY_SPELLINGS = {
    "llama": RotarySpelling(),
    "interleaved": RotarySpelling(form="interleaved"),
    "partial (phi)": RotarySpelling(rotary=8),
    "[B, S, H, D] (gpt-j)": RotarySpelling(layout="bshd"),
    "back to [B, S, H*D]": RotarySpelling(layout="flat"),
    "table": RotarySpelling(angles="table"),
    "arange, shared by the batch": RotarySpelling(angles="arange"),
    "negated by Mul": RotarySpelling(negate="mul"),
    "scaled (yarn)": RotarySpelling(scaling=1.25),
    "interleaved, partial, [B, S, H, D], table": RotarySpelling(
        form="interleaved", rotary=8, layout="bshd", angles="table", negate="mul"),
    "partial, [B, S, H*D], scaled table": RotarySpelling(rotary=8, layout="flat", angles="table", scaling=1.0),
}


def rotary_model(spec: RotarySpelling) -> onnx.ModelProto:
    g = _Graph()
    cos, sin = _angles(g, spec)
    outputs = {name: _rotated(g, spec, name[0], heads, cos, sin)
               for name, heads in (("q_rotated", spec.heads), ("k_rotated", spec.kv_heads))}
    inputs = [_activation("q", spec.heads * spec.head_size), _activation("k", spec.kv_heads * spec.head_size)]
    if spec.angles != "arange":
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]))
    return g.model(inputs, outputs)


def _angles(g: _Graph, spec: RotarySpelling) -> tuple[str, str]:
    """cos and sin, [B or 1, S, rotary], duplicated as the form reads them."""
    if spec.angles == "table":
        table = _duplicated(table_angles(spec), spec.form)
        return tuple(_scaled(g, spec, g.op("Gather", g.const(f(table)), "position_ids", axis=0)) for f in (np.cos, np.sin))
    if spec.angles == "arange":
        length = g.op("Gather", g.op("Shape", "q"), g.const(1, np.int64))
        positions = g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), length, g.const(1, np.int64)),
                         g.const([0], np.int64))
    else:
        positions = "position_ids"
    freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", positions, to=TensorProto.FLOAT), g.const([-1], np.int64)),
                 g.const(spec.inv_freq()))
    if spec.form == "interleaved":  # repeat_interleave: [f0, f0, f1, f1, ...]
        pairs = g.op("Concat", *[g.op("Unsqueeze", freqs, g.const([-1], np.int64))] * 2, axis=-1)
        angles = g.op("Reshape", pairs, g.const([0, 0, spec.rotary], np.int64))
    else:
        angles = g.op("Concat", freqs, freqs, axis=-1)
    return _scaled(g, spec, g.op("Cos", angles)), _scaled(g, spec, g.op("Sin", angles))


def _scaled(g: _Graph, spec: RotarySpelling, value: str) -> str:
    return value if spec.scaling is None else g.op("Mul", value, g.const(spec.scaling))


def table_angles(spec: RotarySpelling) -> np.ndarray:
    """[table_rows, rotary / 2]: each position's angles, as a precomputed table holds them."""
    return np.arange(spec.table_rows)[:, None] * spec.inv_freq()[None, :]


def _duplicated(angles: np.ndarray, form: str) -> np.ndarray:
    return np.repeat(angles, 2, axis=-1) if form == "interleaved" else np.concatenate([angles, angles], axis=-1)


def _rotated(g: _Graph, spec: RotarySpelling, x: str, heads: int, cos: str, sin: str) -> str:
    split = g.op("Reshape", x, g.const([0, 0, heads, spec.head_size], np.int64))
    head_axis = 2 if spec.layout in ("bshd", "flat") else 1
    tokens = split if head_axis == 2 else g.op("Transpose", split, perm=[0, 2, 1, 3])
    cos, sin = (g.op("Unsqueeze", c, g.const([head_axis], np.int64)) for c in (cos, sin))
    width = spec.rotary
    if width < spec.head_size:
        part = g.op("Slice", tokens, g.const([0], np.int64), g.const([width], np.int64), g.const([-1], np.int64))
        rest = g.op("Slice", tokens, g.const([width], np.int64), g.const([spec.head_size], np.int64),
                    g.const([-1], np.int64))
    else:
        part, rest = tokens, None
    turned = _turn(g, spec, part)
    if spec.defect == "sign":
        out = g.op("Sub", g.op("Mul", part, cos), g.op("Mul", turned, sin))
    elif spec.defect == "unrotated":
        out = g.op("Add", g.op("Mul", part, cos), g.op("Mul", part, sin))
    elif spec.defect == "cos_twice":
        out = g.op("Add", g.op("Mul", part, cos), g.op("Mul", turned, cos))
    else:
        out = g.op("Add", g.op("Mul", part, cos), g.op("Mul", turned, sin))
    if rest is not None:
        out = g.op("Concat", out, rest, axis=-1)
    if spec.layout == "flat":
        out = g.op("Reshape", out, g.const([0, 0, -1], np.int64))
    return out


def _turn(g: _Graph, spec: RotarySpelling, x: str) -> str:
    """rotate_half(x) = (-x2, x1), or interleaved: (-x1, x0, -x3, x2, ...)."""
    def negative(value: str) -> str:
        return g.op("Neg", value) if spec.negate == "neg" else g.op("Mul", value, g.const(-1.0))

    width = spec.rotary
    ends = g.const([width], np.int64)
    if spec.form == "interleaved":
        step = g.const([2], np.int64)
        axis = g.const([-1], np.int64)
        even = g.op("Slice", x, g.const([0], np.int64), ends, axis, step)
        odd = g.op("Slice", x, g.const([1], np.int64), ends, axis, step)
        last = g.const([-1], np.int64)
        pairs = g.op("Concat", g.op("Unsqueeze", negative(odd), last), g.op("Unsqueeze", even, last), axis=-1)
        return g.op("Reshape", pairs, g.const([0, 0, 0, width], np.int64))
    half = g.const([width // 2], np.int64)
    first = g.op("Slice", x, g.const([0], np.int64), half, g.const([-1], np.int64))
    second = g.op("Slice", x, half, ends, g.const([-1], np.int64))
    return g.op("Concat", negative(second), first, axis=-1)


def rotary_reference(spec: RotarySpelling, x: np.ndarray, heads: int, positions: np.ndarray) -> np.ndarray:
    """The rotated heads of x ([B, S, heads * head_size]) in the spelling's output layout."""
    batch, length, _ = x.shape
    tokens = x.astype(np.float64).reshape(batch, length, heads, spec.head_size)
    angles = _duplicated(positions[..., None] * spec.inv_freq().astype(np.float64), spec.form)[:, :, None, :]
    part, rest = tokens[..., : spec.rotary], tokens[..., spec.rotary:]
    if spec.form == "interleaved":
        turned = np.stack([-part[..., 1::2], part[..., 0::2]], axis=-1).reshape(part.shape)
    else:
        half = spec.rotary // 2
        turned = np.concatenate([-part[..., half:], part[..., :half]], axis=-1)
    scaling = 1.0 if spec.scaling is None else spec.scaling
    out = np.concatenate([(part * np.cos(angles) + turned * np.sin(angles)) * scaling, rest], axis=-1)
    if spec.layout == "flat":
        return out.reshape(batch, length, -1)
    return out if spec.layout == "bshd" else out.transpose(0, 2, 1, 3)
