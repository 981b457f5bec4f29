"""How ONNX spells each fused op (ONNX Runtime's contrib ops, or its own ops in the ONNX domain),
and which attention op to write.

This is the lowest layer: the ONNX passes (through core/registry.py) and the torch export
(kernels/ops.py) both read the forms, and both choose between GroupQueryAttention and
MultiHeadAttention with `attention_form`, so a model optimized in PyTorch and exported
gets the op the ONNX path would write.
"""
from __future__ import annotations

from dataclasses import dataclass

MS_DOMAIN = "com.microsoft"
ONNX_DOMAIN = ""


@dataclass(frozen=True)
class OnnxForm:
    """One ONNX spelling of a fused op: its type, domain and named input and output slots
    (in the op's order, as ONNX Runtime's schema names them)."""

    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    domain: str = MS_DOMAIN

    def slot(self, name: str) -> int:
        """The position of the input named `name`."""
        return self.inputs.index(name)

    def output(self, name: str) -> int:
        return self.outputs.index(name)

    def arguments(self, **named) -> list:
        """The op's inputs in slot order from keyword arguments (None where not given), trailing
        absent inputs dropped. ValueError for a name the op does not have."""
        unknown = set(named) - set(self.inputs)
        if unknown:
            raise ValueError(f"{self.op_type} has no input {', '.join(sorted(unknown))}")
        values = [named.get(name) for name in self.inputs]
        while values and values[-1] is None:
            values.pop()
        return values


MULTI_HEAD_ATTENTION = OnnxForm(
    "MultiHeadAttention",
    ("query", "key", "value", "bias", "key_padding_mask", "attention_bias", "past_key", "past_value",
     "past_sequence_length", "cache_indirection"),
    ("output", "present_key", "present_value", "qk"))
GROUP_QUERY_ATTENTION = OnnxForm(
    "GroupQueryAttention",
    ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
     "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight",
     "k_norm_weight", "query_seqlens"),
    ("output", "present_key", "present_value", "output_qk"))
PACKED_MULTI_HEAD_ATTENTION = OnnxForm(
    "PackedMultiHeadAttention",
    ("query", "key", "value", "bias", "token_offset", "cumulative_sequence_length", "attention_bias"), ("output",))
SKIP_LAYER_NORMALIZATION = OnnxForm(
    "SkipLayerNormalization", ("input", "skip", "gamma", "beta", "bias"),
    ("output", "mean", "inv_std_var", "input_skip_bias_sum"))
SKIP_SIMPLIFIED_LAYER_NORMALIZATION = OnnxForm(
    "SkipSimplifiedLayerNormalization", ("input", "skip", "gamma", "bias"),
    ("output", "mean", "inv_std_var", "input_skip_bias_sum"))
# ONNX Runtime's own op in the ONNX domain: it registers it nowhere else.
SIMPLIFIED_LAYER_NORMALIZATION = OnnxForm(
    "SimplifiedLayerNormalization", ("X", "scale"), ("Y", "inv_std_var"), domain=ONNX_DOMAIN)
LAYER_NORMALIZATION = OnnxForm("LayerNormalization", ("X", "Scale", "B"), ("Y", "Mean", "InvStdDev"),
                               domain=ONNX_DOMAIN)
EMBED_LAYER_NORMALIZATION = OnnxForm(
    "EmbedLayerNormalization",
    ("input_ids", "segment_ids", "word_embedding", "position_embedding", "segment_embedding", "gamma", "beta",
     "mask", "position_ids"),
    ("output", "mask_index", "embedding_sum"))
BIAS_GELU_FORM = OnnxForm("BiasGelu", ("A", "B"), ("C",))
FAST_GELU = OnnxForm("FastGelu", ("X", "bias"), ("Y",))
GELU_FORM = OnnxForm("Gelu", ("X",), ("Y",))
ROTARY_EMBEDDING = OnnxForm("RotaryEmbedding", ("input", "position_ids", "cos_cache", "sin_cache"), ("output",))
# ONNX's own (opset 23), which runtimes other than ONNX Runtime read (passes/onnx/standard.py writes them).
# Attention's q, k and v are named as the other attention forms name them (ONNX's schema: Q, K, V).
STANDARD_ATTENTION = OnnxForm(
    "Attention", ("query", "key", "value", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen"),
    ("output", "present_key", "present_value", "qk_matmul_output"), domain=ONNX_DOMAIN)
RMS_NORMALIZATION = OnnxForm("RMSNormalization", ("X", "scale"), ("Y",), domain=ONNX_DOMAIN)
STANDARD_GELU = OnnxForm("Gelu", ("X",), ("Y",), domain=ONNX_DOMAIN)  # opset 20: erf or tanh, by `approximate`


# ONNX Runtime's quantized ops: attnfuse reads them in the models it is given (passes/onnx/quantized.py
# says how each one computes on packed rows) and writes none itself (its --quantize lets ONNX Runtime's
# quantizers write them). QuantizeLinear / DequantizeLinear also exist in com.microsoft, in the same form.
DYNAMIC_QUANTIZE_LINEAR = OnnxForm("DynamicQuantizeLinear", ("x",), ("y", "y_scale", "y_zero_point"),
                                   domain=ONNX_DOMAIN)
MATMUL_INTEGER = OnnxForm("MatMulInteger", ("A", "B", "a_zero_point", "b_zero_point"), ("Y",), domain=ONNX_DOMAIN)
DYNAMIC_QUANTIZE_MATMUL = OnnxForm("DynamicQuantizeMatMul", ("A", "B", "b_scale", "b_zero_point", "bias"), ("Y",))
MATMUL_INTEGER_TO_FLOAT = OnnxForm(
    "MatMulIntegerToFloat", ("A", "B", "a_scale", "b_scale", "a_zero_point", "b_zero_point", "bias"), ("Y",))
MATMUL_NBITS = OnnxForm("MatMulNBits", ("A", "B", "scales", "zero_points", "g_idx", "bias"), ("Y",))
QUANTIZE_LINEAR = OnnxForm("QuantizeLinear", ("x", "y_scale", "y_zero_point"), ("y",), domain=ONNX_DOMAIN)
DEQUANTIZE_LINEAR = OnnxForm("DequantizeLinear", ("x", "x_scale", "x_zero_point"), ("y",), domain=ONNX_DOMAIN)

def gelu_form(approximate: str, bias: bool) -> OnnxForm:
    """How ONNX spells bias + gelu: FastGelu (tanh), BiasGelu (erf), com.microsoft's Gelu (erf, no bias)."""
    if approximate == "tanh":
        return FAST_GELU
    return BIAS_GELU_FORM if bias else GELU_FORM


@dataclass(frozen=True)
class AttentionForm:
    """The attention op to write, and why GroupQueryAttention is not it where it was wanted."""

    form: OnnxForm | None  # None: no op ONNX Runtime has computes these scores
    why_not_grouped: str | None = None


def attention_form(num_heads: int, kv_heads: int, head_size: int, value_head_size: int, *, cache: bool,
                   causal: bool, softcap: bool) -> AttentionForm:
    """GroupQueryAttention where it pays and ONNX Runtime takes it: k and v with fewer heads than q
    (it reads them unrepeated), a KV cache (appended inside, measured 3.5x faster per decode step
    than MultiHeadAttention over the concatenated, repeated cache) or soft-capped scores (only it
    soft-caps). MultiHeadAttention otherwise, or when GroupQueryAttention cannot take the site."""
    if not (kv_heads < num_heads or cache or softcap):
        return AttentionForm(MULTI_HEAD_ATTENTION)
    why = _why_not_grouped(num_heads, kv_heads, head_size, value_head_size, cache, causal)
    if why is None:
        return AttentionForm(GROUP_QUERY_ATTENTION)
    return AttentionForm(None if softcap else MULTI_HEAD_ATTENTION, why)


def _why_not_grouped(num_heads: int, kv_heads: int, head_size: int, value_head_size: int, cache: bool,
                     causal: bool) -> str | None:
    if value_head_size != head_size:
        return "GroupQueryAttention needs one head size for q, k and v"
    if not kv_heads or num_heads % kv_heads:
        return f"GroupQueryAttention repeats k and v heads a whole number of times; here {num_heads} of {kv_heads}"
    if head_size % 8:
        return f"ONNX Runtime's GroupQueryAttention needs a head size that is a multiple of 8, not {head_size}"
    if cache and not causal:
        return "GroupQueryAttention reads a KV cache causally (bottom-right); these scores are not causal"
    return None
