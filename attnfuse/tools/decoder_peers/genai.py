"""onnxruntime-genai: its model builder's fp32 CPU model, run through its Generator as its examples do.

This module imports only numpy and onnxruntime_genai (and the builder runs in a subprocess), so
that a fresh process can load it by path to weigh the peer's peak memory without attnfuse's imports.

genai takes padding only at the end of a row: prompts come right padded with the pad id, from
which genai derives each row's length (its GroupQueryAttention keeps a per-row cache length).
A row ends at the end-of-sequence id: genai cannot be told to go on past it without forbidding it
(min_length), so its generated tokens are compared up to each row's end (generation.token_mismatch).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def build(folder: Path, out: Path, precision: str = "fp32") -> None:
    """`python -m onnxruntime_genai.models.builder` on a transformers folder, for the CPU (`precision`
    fp32 or int4), as its documentation runs it. The builder needs transformers 5 and this env's
    onnxruntime (it asks >= 1.31), so it runs here, in a subprocess: it is a script."""
    with tempfile.TemporaryDirectory(prefix="attnfuse-genai-") as scratch:  # its own cache, "./cache_dir" by default
        done = subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
             "-p", precision, "-e", "cpu", "-c", scratch],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"genai's model builder failed: {last}")


def layout(ids: np.ndarray, lengths: list[int]) -> np.ndarray:
    """Its prompts, from right-padded ids and each row's length: the right-padded ids themselves."""
    return ids


class Model:
    """A built model with `threads` intra-op threads whose workers stop spinning when a run returns,
    as every ONNX Runtime contender's (attnfuse.tools.timing.ort_session)."""

    def __init__(self, model_dir: str | os.PathLike, threads: int):
        import onnxruntime_genai as og

        self._og = og
        config = og.Config(str(model_dir))
        # genai passes session options it does not know as ORT config entries
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1, "log_severity_level": 3,
                   "session.force_spinning_stop": "1"}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.pad = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["pad_token_id"]

    def generator(self, ids: np.ndarray, max_length: int, to_the_end: bool = False):
        """A greedy generator for right-padded `ids` [batch, width] that has run the prompts' forward.
        `to_the_end`: no row stops before max_length (min_length = max_length, which keeps genai from
        choosing the end-of-sequence id at all); else a row ends at that id, as genai's users get it."""
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, batch_size=len(ids), max_length=max_length,
                                  min_length=max_length if to_the_end else 0)
        generator = self._og.Generator(self.model, params)
        generator.append_tokens(np.ascontiguousarray(ids, dtype=np.int32))
        return generator

    def prefill(self, ids: np.ndarray):
        """The prompts' forward (what a prefill is to genai); its logits stay in the generator."""
        return self.generator(ids, ids.shape[1] + 1)

    @staticmethod
    def logits(generator) -> np.ndarray:
        """[batch, width, vocab] of the last forward, right padded like its prompts."""
        return generator.get_output("logits")

    def stepper(self, ids: np.ndarray, steps: int):
        """A function that runs one decoding step per call (the model on each row's last token, then
        the greedy choice), after the prompts' forward and the first token, up to `steps` calls."""
        generator = self.generator(ids, ids.shape[1] + steps + 1, to_the_end=True)
        generator.generate_next_token()  # the first token: taken from the prompts' logits

        def step() -> None:
            if generator.is_done():
                raise RuntimeError(f"genai stepper: more than {steps} steps")
            generator.generate_next_token()
        return step

    def generate(self, ids: np.ndarray, new_tokens: int) -> np.ndarray:
        """[batch, new_tokens] greedy tokens after the right-padded prompts. A row that chose the
        end-of-sequence id gets the pad id after it (all rows done: the generation ends there)."""
        generator = self.generator(ids, ids.shape[1] + new_tokens)
        tokens = np.full((len(ids), new_tokens), self.pad, dtype=np.int64)
        for step in range(new_tokens):
            if generator.is_done():
                break
            generator.generate_next_token()
            tokens[:, step] = generator.get_next_tokens()
        return tokens
