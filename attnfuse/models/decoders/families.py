"""The decoder families: tiny transformers configs with random weights, built as their own classes.

Each family is the real model class of its kind (LlamaForCausalLM, T5ForConditionalGeneration, ...)
with a config small enough to export in seconds, and chosen so that what distinguishes the
family shows on short test inputs: grouped-query and multi-query heads, q/k/v biases, a fused
qkv projection, partial rotary, a head size that is not hidden / heads, a sliding window of 4
tokens, soft-capping.
"""
from __future__ import annotations

import dataclasses
import hashlib

import torch

from attnfuse.models.zoo import randomise_vectors

VOCAB = 128
HIDDEN, LAYERS, HEADS = 64, 2, 4
PAD, BOS, EOS = 0, 1, 2
WINDOW = 4  # the sliding window, shorter than the test lengths so that it changes the result
# Weights 5x the families' default spread: attention that is far from uniform, so a rewrite that
# loses a scale, a mask or a soft-cap changes the output well beyond the tolerance.
INIT_RANGE = 0.1

CAUSAL, SEQ2SEQ, ENCODER = "causal", "seq2seq", "encoder"

_LLAMA_LIKE = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
    num_attention_heads=HEADS, max_position_embeddings=256, initializer_range=INIT_RANGE,
    pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
)


@dataclasses.dataclass(frozen=True)
class Family:
    kind: str  # CAUSAL (logits, self-attention cache), SEQ2SEQ (a decoder reading an encoder) or ENCODER
    model_class: str  # transformers.<model_class>
    config_class: str  # transformers.<config_class>
    config: dict
    note: str  # what this family adds to the zoo
    # Scales the token embeddings after init. T5 (whose head transformers always ties to them) at
    # full scale makes a random model repeat its input token at every greedy step.
    embedding_scale: float = 1.0

    @property
    def fingerprint(self) -> str:
        """A short hash of the config: part of an export's cache key, so that a changed config re-exports."""
        return hashlib.sha1(repr((sorted(self.config.items()), self.embedding_scale)).encode()).hexdigest()[:8]

    def make_config(self, attention: str, **overrides):
        import transformers

        config = getattr(transformers, self.config_class)(**{**self.config, **overrides})
        config._attn_implementation = attention
        return config


FAMILIES: dict[str, Family] = {
    "llama": Family(CAUSAL, "LlamaForCausalLM", "LlamaConfig", dict(_LLAMA_LIKE, num_key_value_heads=2),
                    "grouped-query attention (4 q heads, 2 kv heads), rotary, RMSNorm, gated MLP"),
    "mistral": Family(CAUSAL, "MistralForCausalLM", "MistralConfig",
                      dict(_LLAMA_LIKE, num_key_value_heads=2, sliding_window=WINDOW),
                      f"grouped-query attention with a sliding window of {WINDOW} tokens"),
    "qwen2": Family(CAUSAL, "Qwen2ForCausalLM", "Qwen2Config", dict(_LLAMA_LIKE, num_key_value_heads=2),
                    "grouped-query attention with q/k/v biases"),
    "phi3": Family(CAUSAL, "Phi3ForCausalLM", "Phi3Config", dict(_LLAMA_LIKE, num_key_value_heads=2),
                   "one fused qkv_proj (and gate_up_proj), grouped-query"),
    "phi": Family(CAUSAL, "PhiForCausalLM", "PhiConfig", dict(_LLAMA_LIKE, partial_rotary_factor=0.5),
                  "partial rotary (half of each head), q/k/v biases, LayerNorm, parallel attention and MLP"),
    # Gemma ties its LM head to the embeddings, scaled by sqrt(hidden): in a random 2-layer model that
    # makes every greedy step repeat the last token, so the tiny ones keep a head of their own.
    "gemma": Family(CAUSAL, "GemmaForCausalLM", "GemmaConfig", dict(_LLAMA_LIKE, num_key_value_heads=1, head_dim=32),
                    "multi-query attention (1 kv head), head size 32 with hidden 64 (heads x head size != hidden)"),
    "gemma2": Family(CAUSAL, "Gemma2ForCausalLM", "Gemma2Config", dict(
        _LLAMA_LIKE, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
        attn_logit_softcapping=5.0, final_logit_softcapping=10.0),
        f"logit soft-capping, scale 24**-0.5 from query_pre_attn_scalar, sliding window of {WINDOW} on layer 0"),
    "gpt2": Family(CAUSAL, "GPT2LMHeadModel", "GPT2Config", dict(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=2 * HIDDEN, n_positions=256,
        initializer_range=INIT_RANGE, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS),
        "fused qkv Conv1D, learned positions, with a cache"),
    "t5": Family(SEQ2SEQ, "T5ForConditionalGeneration", "T5Config", dict(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=2 * HIDDEN, num_layers=LAYERS, num_heads=HEADS,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, initializer_factor=1.0, pad_token_id=PAD, eos_token_id=EOS,
        decoder_start_token_id=PAD),
        "flan-T5 decoder: unscaled scores plus a relative position bias, cross-attention with a key padding mask",
        embedding_scale=0.1),
    "whisper": Family(SEQ2SEQ, "WhisperForConditionalGeneration", "WhisperConfig", dict(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1, decoder_layers=LAYERS, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=2 * HIDDEN, decoder_ffn_dim=2 * HIDDEN, num_mel_bins=8,
        max_source_positions=16, max_target_positions=64, init_std=INIT_RANGE, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=BOS, suppress_tokens=[],
        begin_suppress_tokens=[]),
        "Whisper decoder: q scaled before q k^T, k without bias, cross-attention without a mask"),
    "modernbert": Family(ENCODER, "ModernBertModel", "ModernBertConfig", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=256, local_attention=WINDOW,
        layer_types=["full_attention", "sliding_attention"], initializer_range=INIT_RANGE, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=EOS, cls_token_id=BOS, sep_token_id=EOS),
        f"fused Wqkv viewed as [B, S, 3, H, D], rotary, global layer then local layer (window +-{WINDOW // 2})"),
}


def build(family: str | Family, attention: str = "eager", seed: int = 0, **overrides) -> torch.nn.Module:
    """The family's transformers model with seeded random weights, eval mode, fp32; `overrides`
    change config fields (a test shows what each distinguishing field does)."""
    import transformers

    spec = FAMILIES[family] if isinstance(family, str) else family
    config = spec.make_config(attention, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config)
    randomise_vectors(model)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(spec.embedding_scale)
    return model.float().eval()
