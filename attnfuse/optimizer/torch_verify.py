"""Does a rewritten PyTorch model compute what the original computes?

Outputs are compared leaf by leaf (a ModelOutput's fields, a dict's entries): those
laid out [batch, seq, ...] like the padding mask at real tokens only (padding-free
gives zeros at padded positions), present k/v of a KV cache at real positions,
every other output whole (a pooler output, a classifier's logits, a sentence
embedding), to the tolerance of their dtype (core/tolerance.py) unless one is given.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.utils._pytree as pytree

from attnfuse.core import tolerance as precision
from attnfuse.optimizer import torch_cache
from attnfuse.optimizer.errors import first_line
from attnfuse.optimizer.report import VerifyResult
from attnfuse.optimizer.torch_inputs import Signature, new_tokens, real_mask
from attnfuse.optimizer.verify import compare, judge


def check(run_model: Callable, runs: list[dict], expected: list, inputs: Signature,
          tolerance: float | None = None) -> VerifyResult:
    """`run_model(**run)` against the original's outputs `expected` on each check input, to
    `tolerance` (None: the tolerance of the outputs' least precise float dtype)."""
    if tolerance is None:
        tolerance = output_tolerance(expected)
    worst_abs = worst_rel = 0.0
    worst_output = ""
    message = ""
    try:
        with torch.no_grad():
            for run, want in zip(runs, expected):
                real, new = real_mask(run, inputs), new_tokens(run, inputs)
                got = arrays(run_model(**run), real, new)
                for name, reference in arrays(want, real, new).items():
                    abs_error, rel_error = compare({name: reference}, {name: got.get(name)}, None)
                    worst_abs = max(worst_abs, abs_error)
                    if rel_error >= worst_rel:
                        worst_rel, worst_output = rel_error, name
    except Exception as e:  # a rewrite that crashes is a failed check, reported, never raised
        worst_abs = worst_rel = float("inf")
        message = f"the optimized graph failed: {first_line(e)}"
    shapes = [{name: list(v.shape) for name, v in run.items() if isinstance(v, torch.Tensor)} for run in runs]
    return judge(worst_abs, worst_rel, tolerance, shapes, message, worst_output)


def output_tolerance(outputs) -> float:
    """The tolerance of the least precise float tensor among `outputs`."""
    leaves = pytree.tree_leaves(outputs)
    return precision.least_precise(str(leaf.dtype).removeprefix("torch.") for leaf in leaves
                                   if isinstance(leaf, torch.Tensor) and leaf.is_floating_point())


def arrays(outputs, real: torch.Tensor | None = None, new: int | None = None) -> dict[str, np.ndarray]:
    """Every tensor among the outputs at its real positions, named by its place in them
    (`.pooler_output`, `[0]`)."""
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    return {pytree.keystr(path) or "output": torch_cache.real_values(leaf.detach(), real, new).float().cpu().numpy()
            for path, leaf in leaves if isinstance(leaf, torch.Tensor)}
