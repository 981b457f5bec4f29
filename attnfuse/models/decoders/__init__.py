"""The decoder zoo: Llama-family, GPT-2, T5 and Whisper decoders with and without a KV cache,
and ModernBERT, as tiny random-weight transformers models exported to ONNX with the flat
signature of deployment files."""
from attnfuse.models.decoders.cases import (
    AVAILABLE, CASES, DecoderCase, build_torch, example, exported, find, signature,
)
from attnfuse.models.decoders.families import FAMILIES
from attnfuse.models.decoders.inputs import DECODES, PREFILL, Step, real_positions

__all__ = [
    "AVAILABLE", "CASES", "DECODES", "FAMILIES", "PREFILL", "DecoderCase", "Step", "build_torch", "example",
    "exported", "find", "real_positions", "signature",
]
