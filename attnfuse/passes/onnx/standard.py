"""The fused ops in standard ONNX ops (opset 23), for runtimes that do not read ONNX Runtime's contrib ops
(OpenVINO): each contrib form of kernels/onnx_forms.py as what it computes, by its named inputs and
attributes, giving its named outputs. The builder (spelling.py) writes these instead of the contrib node
when its target asks for standard ops; tests/test_standard_spelling.py holds each equal to its contrib
form in ONNX Runtime.

    MultiHeadAttention              Attention-23 (3-D q, k, v; the padding mask as a bool attn_mask)
    SkipLayerNormalization          Add, LayerNormalization
    (Skip)SimplifiedLayerNormalization  (Add,) RMSNormalization
    EmbedLayerNormalization         Gathers, Adds, LayerNormalization
    BiasGelu, FastGelu, Gelu        (Add,) Gelu-20 (erf or tanh)
    RotaryEmbedding                 Gathers of the cos and sin rows, Muls, Adds (OpenVINO 2026.4 does not
                                    read ONNX's own RotaryEmbedding-23)
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from attnfuse.core.rule import NoMatch
from attnfuse.kernels import onnx_forms as forms
from attnfuse.kernels.onnx_forms import OnnxForm

OPSET = 23  # Attention and RMSNormalization are ONNX ops from opset 23 on
Value = ir.Value
# (builder, the form's inputs by name (absent ones left out), its attributes) -> its outputs by name
Spelling = Callable[["object", dict[str, Value], dict], dict[str, Value]]
# Where the standard op takes what the contrib op takes in a slot of its own (facts name the contrib slot).
SLOTS = {forms.MULTI_HEAD_ATTENTION: {"key_padding_mask": "attn_mask", "attention_bias": "attn_mask"}}
# MultiHeadAttention adds this to the scores of a key its key_padding_mask hides.
MASK_FILTER_VALUE = -10000.0


def needs_spelling(form: OnnxForm) -> bool:
    """ONNX Runtime's own ops: its contrib domain, and the ones it registers in the ONNX domain."""
    return form.domain == forms.MS_DOMAIN or form in SPELLINGS


def spell(b, form: OnnxForm, inputs: dict[str, Value], attributes: dict) -> dict[str, Value]:
    """`form`'s outputs, written in standard ops by builder `b`. NoMatch where they cannot be."""
    spelling = SPELLINGS.get(form)
    if spelling is None:
        raise NoMatch(f"{form.op_type} has no spelling in standard ONNX ops")
    return spelling(b, inputs, attributes)


def slot(form: OnnxForm, name: str) -> str:
    """The input of the standard op that takes what `form` takes in its input `name`."""
    return SLOTS.get(form, {}).get(name, name)


# ---- attention -----------------------------------------------------------------------------------

def multi_head_attention(b, x: dict[str, Value], attributes: dict) -> dict[str, Value]:
    """Attention-23 on 3-D q, k and v (k and v given heads first are laid out so): the projections' bias
    added to each, the key padding mask as a bool [B, 1, S, T] attn_mask (expanded over the queries:
    ONNX Runtime takes no other), an attention_bias as a float one (with the key padding mask added
    as MultiHeadAttention adds it)."""
    unknown = (set(x) - {"query", "key", "value", "bias", "key_padding_mask", "attention_bias"}) \
        | (set(attributes) - {"num_heads", "scale"})
    if unknown:
        raise NoMatch(f"MultiHeadAttention with {', '.join(sorted(unknown))} has no standard spelling")
    q, k, v = (_tokens(b, x[name]) for name in ("query", "key", "value"))
    if "bias" in x:
        q, k, v = (b.op("Add", [value, bias]) for value, bias in zip((q, k, v), _bias_parts(b, x["bias"], q, k)))
    mask = _attention_mask(b, x.get("key_padding_mask"), x.get("attention_bias"), q)
    heads = attributes["num_heads"]
    options = {"q_num_heads": heads, "kv_num_heads": heads}
    if attributes.get("scale"):
        options["scale"] = float(attributes["scale"])
    return {"output": b.op(forms.STANDARD_ATTENTION.op_type, forms.STANDARD_ATTENTION.arguments(
        query=q, key=k, value=v, attn_mask=mask), options)}


def _tokens(b, x: Value) -> Value:
    """[B, L, heads * size]; a 4-D [B, heads, L, size] input is laid out so (Attention-23 takes q, k, v of one rank)."""
    if _rank(b, x) != 4:
        return x
    return b.op("Reshape", [b.op("Transpose", [x], {"perm": [0, 2, 1, 3]}), b.const([0, 0, -1], np.int64)])


def _rank(b, x: Value) -> int:
    return b.example(x).ndim


def _bias_parts(b, bias: Value, q: Value, k: Value) -> list[Value]:
    """MultiHeadAttention's bias [q width + k width + v width] as the three vectors."""
    width = lambda x: b.op("Shape", [x], {"start": 2, "end": 3})  # noqa: E731
    q_end = width(q)
    k_end = b.op("Add", [q_end, width(k)])
    ends = [q_end, k_end, b.const([np.iinfo(np.int64).max], np.int64)]
    starts = [b.const([0], np.int64), q_end, k_end]
    return [b.op("Slice", [bias, start, end]) for start, end in zip(starts, ends)]


def _attention_mask(b, key_padding: Value | None, bias: Value | None, q: Value) -> Value | None:
    if key_padding is None:
        return bias
    keys = b.op("Unsqueeze", [b.op("Cast", [key_padding], {"to": ir.DataType.BOOL}), b.const([1, 2], np.int64)])
    if bias is None:  # [B, 1, 1, T] -> [B, 1, S, T]
        queries = b.op("Concat", [b.const([1, 1], np.int64), b.op("Shape", [q], {"start": 1, "end": 2}),
                                  b.const([1], np.int64)], {"axis": 0})
        return b.op("Expand", [keys, queries])
    hidden = b.op("Where", [keys, b.const(np.float32(0)), b.const(np.float32(MASK_FILTER_VALUE))])
    return b.op("Add", [bias, b.op("CastLike", [hidden, bias])])


def group_query_attention(b, x: dict[str, Value], attributes: dict) -> dict[str, Value]:
    raise NoMatch("GroupQueryAttention is not spelled in standard ops here (its cache layout and causal "
                  "alignment differ from Attention-23's); MultiHeadAttention is")


# ---- normalizations ------------------------------------------------------------------------------

def _summed(b, x: dict[str, Value]) -> Value:
    """input + skip (+ bias): what the skip normalizations normalize."""
    total = b.op("Add", [x["input"], x["skip"]])
    return b.op("Add", [total, x["bias"]]) if "bias" in x else total


def _layer_norm(b, x: Value, gamma: Value, beta: Value | None, epsilon: float) -> Value:
    form = forms.LAYER_NORMALIZATION
    return b.op(form.op_type, form.arguments(X=x, Scale=gamma, B=beta), {"axis": -1, "epsilon": float(epsilon)})


def _rms_norm(b, x: Value, gamma: Value, attributes: dict) -> Value:
    form = forms.RMS_NORMALIZATION
    return b.op(form.op_type, form.arguments(X=x, scale=gamma), {"axis": attributes.get("axis", -1),
                                                                 "epsilon": float(attributes.get("epsilon", 1e-5))})


def skip_layer_norm(b, x: dict[str, Value], attributes: dict) -> dict[str, Value]:
    total = _summed(b, x)
    return {"output": _layer_norm(b, total, x["gamma"], x.get("beta"), attributes.get("epsilon", 1e-12)),
            "input_skip_bias_sum": total}


def skip_rms_norm(b, x: dict[str, Value], attributes: dict) -> dict[str, Value]:
    total = _summed(b, x)
    return {"output": _rms_norm(b, total, x["gamma"], attributes), "input_skip_bias_sum": total}


def rms_norm(b, x: dict[str, Value], attributes: dict) -> dict[str, Value]:
    return {"Y": _rms_norm(b, x["X"], x["scale"], attributes)}


def embed_layer_norm(b, x: dict[str, Value], attributes: dict) -> dict[str, Value]:
    """word[ids] + position[position_ids or 0..S-1] (+ segment[segment_ids]), then LayerNormalization."""
    if "position_ids" in x:
        positions = b.op("Gather", [x["position_embedding"], x["position_ids"]])
    else:
        length = b.op("Shape", [x["input_ids"]], {"start": 1, "end": 2})
        positions = b.op("Slice", [x["position_embedding"], b.const([0], np.int64), length])
    total = b.op("Add", [b.op("Gather", [x["word_embedding"], x["input_ids"]]), positions])
    if "segment_embedding" in x:
        total = b.op("Add", [total, b.op("Gather", [x["segment_embedding"], x["segment_ids"]])])
    return {"output": _layer_norm(b, total, x["gamma"], x["beta"], attributes.get("epsilon", 1e-12)),
            "embedding_sum": total}


# ---- gelu ----------------------------------------------------------------------------------------

def _gelu(form: OnnxForm, approximate: str) -> Spelling:
    """gelu(x (+ bias)): the form's inputs are x and, if it has one, the bias."""
    def spelled(b, x: dict[str, Value], attributes: dict) -> dict[str, Value]:
        given = [x[name] for name in form.inputs if name in x]
        value = b.op("Add", given) if len(given) == 2 else given[0]
        return {form.outputs[0]: b.op(forms.STANDARD_GELU.op_type, [value], {"approximate": approximate})}
    return spelled


# ---- rotary --------------------------------------------------------------------------------------

def rotary(b, x: dict[str, Value], attributes: dict) -> dict[str, Value]:
    """RotaryEmbedding: x [B, S, heads * D] (num_heads given) or [B, heads, S, D]; cos and sin rows [P, d / 2]
    picked by position ids [B, S] (or an offset [1]: token s takes row offset + s); the first d
    (rotary_embedding_dim, else D) dims of each head rotated, by halves or interleaved pairs."""
    given = x["input"]
    rank = _rank(b, given)
    heads = attributes.get("num_heads", 0)
    if rank == 3 and not heads:
        raise NoMatch("RotaryEmbedding on 3-D input needs num_heads")
    heads_first = given if rank == 4 else b.op(
        "Transpose", [b.op("Reshape", [given, b.const([0, 0, heads, -1], np.int64)])], {"perm": [0, 2, 1, 3]})
    cos, sin = (_rows(b, x[name], x["position_ids"], given, rank) for name in ("cos_cache", "sin_cache"))
    half = b.op("Shape", [x["cos_cache"]], {"start": 1, "end": 2})
    width = b.op("Mul", [half, b.const([2], np.int64)])
    if attributes.get("rotary_embedding_dim"):
        width = b.const([attributes["rotary_embedding_dim"]], np.int64)
    head_size = b.op("Shape", [heads_first], {"start": 3, "end": 4})
    rotated = b.op("Slice", [heads_first, b.const([0], np.int64), width, b.const([3], np.int64)])
    rest = b.op("Slice", [heads_first, width, head_size, b.const([3], np.int64)])
    turned = (_interleaved if attributes.get("interleaved", 0) else _halves)(b, rotated, cos, sin)
    out = b.op("Concat", [turned, rest], {"axis": 3})
    if rank == 3:
        out = b.op("Reshape", [b.op("Transpose", [out], {"perm": [0, 2, 1, 3]}), b.const([0, 0, -1], np.int64)])
    return {"output": out}


def _rows(b, cache: Value, positions: Value, given: Value, rank: int) -> Value:
    """[B, 1, S, d / 2]: each token's row of the cache."""
    axis = 2 if rank == 4 else 1
    length = b.op("Shape", [given], {"start": axis, "end": axis + 1})
    if b.example(positions).size == 1:  # an offset: token s takes row offset + s
        steps = b.op("Range", [b.const(0, np.int64), b.op("Squeeze", [length, b.const([0], np.int64)]),
                               b.const(1, np.int64)])
        positions = b.op("Unsqueeze", [b.op("Add", [steps, b.op("Reshape", [positions, b.const([1], np.int64)])]),
                                       b.const([0], np.int64)])
    return b.op("Unsqueeze", [b.op("Gather", [cache, positions]), b.const([1], np.int64)])


def _halves(b, x: Value, cos: Value, sin: Value) -> Value:
    first, second = b.op("Split", [x], {"axis": 3, "num_outputs": 2}, num_outputs=2)
    return b.op("Concat", [b.op("Sub", [b.op("Mul", [first, cos]), b.op("Mul", [second, sin])]),
                           b.op("Add", [b.op("Mul", [second, cos]), b.op("Mul", [first, sin])])], {"axis": 3})


def _interleaved(b, x: Value, cos: Value, sin: Value) -> Value:
    pairs = b.op("Reshape", [x, b.const([0, 0, 0, -1, 2], np.int64)])
    even, odd = (b.op("Gather", [pairs, b.const(i, np.int64)], {"axis": 4}) for i in (0, 1))
    turned = [b.op("Sub", [b.op("Mul", [even, cos]), b.op("Mul", [odd, sin])]),
              b.op("Add", [b.op("Mul", [odd, cos]), b.op("Mul", [even, sin])])]
    stacked = b.op("Concat", [b.op("Unsqueeze", [t, b.const([4], np.int64)]) for t in turned], {"axis": 4})
    return b.op("Reshape", [stacked, b.const([0, 0, 0, -1], np.int64)])


SPELLINGS: dict[OnnxForm, Spelling] = {
    forms.MULTI_HEAD_ATTENTION: multi_head_attention,
    forms.GROUP_QUERY_ATTENTION: group_query_attention,
    forms.SKIP_LAYER_NORMALIZATION: skip_layer_norm,
    forms.SKIP_SIMPLIFIED_LAYER_NORMALIZATION: skip_rms_norm,
    forms.SIMPLIFIED_LAYER_NORMALIZATION: rms_norm,
    forms.EMBED_LAYER_NORMALIZATION: embed_layer_norm,
    forms.BIAS_GELU_FORM: _gelu(forms.BIAS_GELU_FORM, "none"),
    forms.FAST_GELU: _gelu(forms.FAST_GELU, "tanh"),
    forms.GELU_FORM: _gelu(forms.GELU_FORM, "none"),
    forms.ROTARY_EMBEDDING: rotary,
}
