"""CTranslate2: its transformers converter (float32), run through its Generator as its documentation does.

This module imports only numpy and ctranslate2 when it runs a model (the converter imports
transformers), so that a fresh process can load it by path to weigh the peer's peak memory.

CTranslate2 takes prompts as lists of tokens, unpadded. Its `forward_batch` is the prompts'
forward (logits of every position, right padded). Its `generate_batch` forwards the prompts'
common length at once and feeds each longer prompt's rest one step at a time (forced decoding)
before it generates: that is what a user of a batch of different lengths gets, and what the
end-to-end time measures. A decoding step is timed as the time between two steps of the
generation, which its step callback paces (`Stepper`).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np


def build(folder: Path, out: Path) -> None:
    """CTranslate2's transformers converter on a transformers folder, float32."""
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(folder)).convert(str(out), quantization="float32", force=True)


def layout(ids: np.ndarray, lengths: list[int]) -> list[list[int]]:
    """Its prompts, from right-padded ids and each row's length: one list of ids per row, unpadded."""
    return [row[:n].tolist() for row, n in zip(ids, lengths)]


class Model:
    """A converted model on the CPU with `threads` intra-op threads (one worker: one batch at a time)."""

    def __init__(self, model_dir: str | os.PathLike, threads: int):
        import ctranslate2

        self.generator = ctranslate2.Generator(str(model_dir), device="cpu", compute_type="float32",
                                               intra_threads=threads, inter_threads=1)
        self.vocabulary = json.loads((Path(model_dir) / "vocabulary.json").read_text())

    def tokens(self, rows: list[list[int]]) -> list[list[str]]:
        """generate_batch reads tokens, not ids."""
        return [[self.vocabulary[i] for i in row] for row in rows]

    def prefill(self, rows: list[list[int]]):
        """The prompts' forward (forward_batch): a StorageView [batch, longest, vocab] of logits, right padded."""
        return self.generator.forward_batch(rows)

    @staticmethod
    def logits(output) -> np.ndarray:
        return np.asarray(output)

    def generate_options(self, rows: list[list[int]], new_tokens: int) -> dict:
        """Greedy, no end token (torch's reference does not stop either), the prompts in the result;
        max_length counts from each prompt's first token, so the longest prompt gets `new_tokens`."""
        return dict(max_length=max(map(len, rows)) - 1 + new_tokens, sampling_topk=1, end_token=[],
                    include_prompt_in_result=True)

    def generate(self, rows: list[list[int]], new_tokens: int) -> np.ndarray:
        """[batch, new_tokens] greedy tokens after each prompt (shorter prompts generate more: cut)."""
        results = self.generator.generate_batch(self.tokens(rows), **self.generate_options(rows, new_tokens))
        return np.array([r.sequences_ids[0][len(row):len(row) + new_tokens] for r, row in zip(results, rows)],
                        dtype=np.int64)

    def stepper(self, rows: list[list[int]], steps: int) -> Stepper:
        return Stepper(self, rows, steps)


class Stepper:
    """One decoding step per call, once every row generates (after the prompts' forced steps).

    CTranslate2 keeps a batch's cache only within one generate_batch call, so the generation runs
    asynchronously and its step callback (called in the decoding loop, for each row at each step)
    waits at the first row of every step until the next call lets it go on: a call's time is one
    step's forward and choice, and the forced steps before are taken once, untimed."""

    def __init__(self, model: Model, rows: list[list[int]], steps: int):
        self._go, self._arrived = threading.Semaphore(0), threading.Semaphore(0)
        self._first_free_step = max(map(len, rows)) - 1  # step s writes position s + 1: the longest prompt is done
        self._step, self._left, self._closed = -1, steps + 1, False
        self._results = model.generator.generate_batch(model.tokens(rows), asynchronous=True, callback=self._callback,
                                                       **model.generate_options(rows, steps + 1))
        self._wait()

    def _callback(self, result) -> bool:
        if result.step != self._step and result.step >= self._first_free_step and not self._closed:
            self._step = result.step
            self._arrived.release()
            self._go.acquire()
        return self._closed  # True stops this row's decoding

    def _wait(self) -> None:
        while not self._arrived.acquire(timeout=1.0):  # a generation that ended or failed never arrives
            if all(r.done() for r in self._results):
                for r in self._results:
                    r.result()  # raises the generation's error, if any
                raise RuntimeError("CTranslate2 stepper: the generation ended")

    def __call__(self) -> None:
        self._left -= 1
        if self._left <= 0:
            raise RuntimeError("CTranslate2 stepper: more steps than it was made for")
        self._go.release()
        self._wait()

    def close(self) -> None:
        """Lets the paused generation stop at its next step and waits for it."""
        self._closed = True
        self._go.release()
        for r in self._results:
            r.result()
