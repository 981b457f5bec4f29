"""Greedy generation over ONNX Runtime sessions of with-cache exports, and the torch reference.

The loop is what a deployment runs: the prompt once with an empty past, then one token at a
time, the mask growing by one column, position ids one past the last, the presents fed back
as the next past. A seq2seq decoder runs its "first" file once (it computes the cross-attention
k/v from the encoder's output) and its "past" file after.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

from attnfuse.models.decoders.inputs import left_padded_mask, positions, right_padded_mask, token_ids

NEW_TOKENS = 20


def session(model: str | onnx.ModelProto | ort.InferenceSession, threads: int = 1) -> ort.InferenceSession:
    """A CPU session; one thread by default: the zoo's models are tiny, and ORT's spinning worker
    threads only slow a test down when other processes share the cores."""
    if isinstance(model, ort.InferenceSession):
        return model
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def causal_prompt(lengths: tuple[int, ...], seed: int = 0, pad: int = 0) -> dict[str, np.ndarray]:
    """Left-padded input_ids and attention_mask, as a tokenizer with padding_side='left' writes them."""
    mask = left_padded_mask(lengths, max(lengths))
    ids = token_ids(mask, torch.Generator().manual_seed(seed), pad)
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def encoder_output(lengths: tuple[int, ...], hidden: int, seed: int = 0, masked: bool = True) -> dict[str, np.ndarray]:
    """A random encoder output [B, E, hidden], and its right-padded mask when the decoder takes one."""
    generator = torch.Generator().manual_seed(seed)
    made = {"encoder_hidden_states": torch.randn(len(lengths), max(lengths), hidden, generator=generator).numpy()}
    if masked:
        made["encoder_attention_mask"] = right_padded_mask(lengths, max(lengths)).numpy()
    return made


def _empty_past(sess: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values.")}


def _past_from(names: list[str], outputs: list[np.ndarray], prefix: str = "present.") -> dict[str, np.ndarray]:
    return {name.replace(prefix, "past_key_values.", 1): value for name, value in zip(names, outputs)
            if name.startswith(prefix)}


def greedy_causal(model, prompt: dict[str, np.ndarray], new_tokens: int = NEW_TOKENS) -> np.ndarray:
    """Token ids [B, new_tokens] that a with-cache causal LM export generates greedily from `prompt`."""
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    mask = prompt["attention_mask"].astype(np.int64)
    feeds = {"input_ids": prompt["input_ids"], "attention_mask": mask,
             "position_ids": positions(torch.from_numpy(mask)).numpy(), **_empty_past(sess, len(mask))}
    generated = []
    for _ in range(new_tokens):
        outputs = sess.run(None, feeds)
        token = outputs[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        generated.append(token)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        feeds = {"input_ids": token, "attention_mask": mask, "position_ids": feeds["position_ids"][:, -1:] + 1,
                 **_past_from(names, outputs)}
    return np.concatenate(generated, axis=1)


def greedy_seq2seq(first_model, past_model, encoder: dict[str, np.ndarray], start_token: int,
                   new_tokens: int = NEW_TOKENS) -> np.ndarray:
    """Token ids [B, new_tokens] from a seq2seq decoder's "first" and "past" exports, greedily."""
    first, past = session(first_model), session(past_model)
    batch = len(encoder["encoder_hidden_states"])
    token = np.full((batch, 1), start_token, np.int64)
    mask = {k: v for k, v in encoder.items() if k == "encoder_attention_mask"}
    names = [o.name for o in first.get_outputs()]
    outputs = first.run(None, {"input_ids": token, **encoder})
    cache = _past_from(names, outputs)  # decoder and encoder k/v
    past_names = [o.name for o in past.get_outputs()]
    generated = []
    for step in range(new_tokens):
        token = outputs[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        generated.append(token)
        if step == new_tokens - 1:
            break
        outputs = past.run(None, {"input_ids": token, **mask, **cache})
        cache.update(_past_from(past_names, outputs))
    return np.concatenate(generated, axis=1)


def greedy_torch_causal(model: torch.nn.Module, prompt: dict[str, np.ndarray], new_tokens: int = NEW_TOKENS) -> np.ndarray:
    """transformers' own greedy `generate` on the same model: the reference for greedy_causal.

    Generation does not stop at the end-of-sequence id (neither does greedy_causal): generate fills
    an unset eos_token_id from the model's generation config, so that one is cleared for the call."""
    ids = torch.from_numpy(prompt["input_ids"])
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.from_numpy(prompt["attention_mask"]),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id)
    finally:
        model.generation_config.eos_token_id = eos
    return out[:, ids.shape[1]:].numpy()


def greedy_torch_seq2seq(model: torch.nn.Module, encoder: dict[str, np.ndarray], start_token: int,
                         new_tokens: int = NEW_TOKENS) -> np.ndarray:
    """The seq2seq model's own forward with its own cache, one greedy token at a time."""
    hidden = torch.from_numpy(encoder["encoder_hidden_states"])
    mask = encoder.get("encoder_attention_mask")
    mask = None if mask is None else torch.from_numpy(mask)
    token = torch.full((len(hidden), 1), start_token, dtype=torch.long)
    cache, generated = None, []
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=token, cache=cache,
                        use_cache=True)
            cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(token)
    return torch.cat(generated, dim=1).numpy()
