"""attnfuse.optimize: the PyTorch front-end.

capture (torch.export, dynamic batch and sequence) -> probe on check inputs ->
fx passes -> verify against the original -> roll back what does not verify. The
result is an nn.Module called like the original, returning the same structure.
"""
from __future__ import annotations

import copy
import inspect
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.fx.experimental._config  # noqa: F401  (backed_size_oblivious, for captures with a cache)
import torch.utils._pytree as pytree

from attnfuse.kernels import ops
from attnfuse.optimizer.errors import UserError, VerificationError, first_line
from attnfuse.optimizer.report import Report, VerifyResult
from attnfuse.optimizer import torch_cache
from attnfuse.optimizer.torch_inputs import Signature, new_tokens, real_mask
from attnfuse.optimizer.verify import compare
from attnfuse.passes.fx import PassResult, run_passes

TARGETS = ("cpu", "cuda")
FUSED_OPS = {ops.attention: "attention", ops.packed_attention: "packed_attention",
             ops.skip_layernorm: "skip_layernorm", ops.bias_gelu: "bias_gelu",
             ops.rms_norm: "rms_norm", ops.skip_rms_norm: "skip_rms_norm", ops.rotary: "rotary"}


class OptimizedModule(torch.nn.Module):
    """The rewritten graph, called like the original model. `report` says what was fused."""

    def __init__(self, graph_module: torch.fx.GraphModule, signature: inspect.Signature, report: Report,
                 inputs: Signature | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        as_captured = torch_cache.as_captured(inputs.example[inputs.cache]) if inputs and inputs.cache else None

        def forward(*args, **kwargs):
            named = by_name(signature, args, kwargs)
            if as_captured is not None:
                named[inputs.cache] = as_captured(named[inputs.cache])
            return self.graph_module(**named)

        # The original's parameter names, so that torch.export and torch.onnx.export can bind inputs by name.
        forward.__signature__ = signature
        self.forward = forward


def optimize(
    model: torch.nn.Module, example_inputs: tuple | None = None, example_kwargs: dict | None = None, *,
    target: str = "cpu", padding_free: bool = True, attention: str = "exact", verify: bool = True,
    tolerance: float = 1e-4, seed: int = 0,
) -> OptimizedModule:
    """Capture `model` with torch.export, fuse its attention, layernorms and gelus, and run it
    padding-free on real batches. Raises UserError for unusable input and VerificationError
    when even the unfused capture differs from the model."""
    start = time.perf_counter()
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "cuda" and not torch.cuda.is_available():
        raise UserError("target 'cuda' needs a CUDA device, and torch sees none")
    if attention != "exact":
        raise UserError(f"attention={attention!r}: the PyTorch front-end does exact attention only; "
                        "approximations are in optimize_onnx")
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not example_inputs and not example_kwargs:
        raise UserError("give example_inputs or example_kwargs: attnfuse captures the model by running it")
    signature = inspect.signature(model.forward)
    example = by_name(signature, tuple(example_inputs or ()), dict(example_kwargs or {}))
    torch_cache.register_caches(model)
    for name, value in example.items():
        if (reason := torch_cache.unsupported(name, value)) is not None:
            raise UserError(reason)
    inputs = Signature.of(example)
    model = model.eval()
    probe_runs = [((), run) for run in inputs.runs(seed)]
    check_runs = inputs.runs(seed + 100, count=3)
    with torch.no_grad():  # on copies: a model appends to the cache it is given
        expected = [model(**copy.deepcopy(run)) for run in check_runs]

    # Captured on a made-up batch of 2 rows like the example: torch.export fixes a dim of size 1.
    capture_example = inputs.make(2, 1.0, "right", seed)

    def attempt(exclude: frozenset[str], packed: bool) -> tuple[torch.fx.GraphModule, PassResult, VerifyResult]:
        graph_module = capture(model, capture_example, inputs)
        try:
            passes = run_passes(graph_module, probe_runs, packed, exclude)
        except Exception as e:  # the capture does not run on other batch sizes or lengths
            raise UserError(f"the captured model does not run on other batches: {first_line(e)}") from None
        return graph_module, passes, check(graph_module, check_runs, expected, inputs, tolerance)

    graph_module, passes, verdict = attempt(frozenset(), padding_free)
    rolled_back: list[str] = []
    if verify and not verdict.ok:
        graph_module, passes, verdict, rolled_back = _roll_back(attempt, passes, padding_free)
    report = Report(
        model=type(model).__name__, target=f"torch-{target}", attention_mode=attention, sites=passes.sites,
        fusions=passes.fusions, fused_ops=count_fused(graph_module), verify=verdict if verify else None,
        rolled_back=rolled_back, seconds=time.perf_counter() - start,
    )
    if verify and not verdict.ok:
        raise VerificationError(f"verification failed: {verdict.message}", report)
    return OptimizedModule(graph_module, signature, report, inputs)


def _roll_back(attempt, first: PassResult, padding_free: bool):
    """Give up padding-free first, then the other fusions, then attention fusion, until the check passes."""
    fusions = frozenset(f.name for f in first.fusions if f.name != "padding-free")
    sites = frozenset(s.name for s in first.sites if s.fused)
    ladder = [frozenset(), fusions, fusions | sites][0 if padding_free else 1:]
    for exclude in ladder:
        graph_module, passes, verdict = attempt(exclude, False)
        rolled_back = (["padding-free"] if padding_free else []) + sorted(exclude)
        if verdict.ok:
            break
    return graph_module, passes, verdict, rolled_back


def by_name(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Every argument by its parameter name (keyword-only catch-alls spread out)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise UserError(f"the inputs do not fit the model's forward: {e}") from None
    named = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise UserError("models whose forward takes *args are not supported; pass inputs by name")
        else:
            named[name] = value
    return named


def capture(model: torch.nn.Module, example: dict[str, Any], inputs: Signature) -> torch.fx.GraphModule:
    # With a cache, sizes 0 and 1 (no past, one row) must stay dynamic, not be specialised away.
    oblivious = torch.fx.experimental._config.patch(backed_size_oblivious=inputs.cache is not None)
    try:
        with oblivious:
            program = torch.export.export(_by_keyword(model, example), (), copy.deepcopy(example),
                                          dynamic_shapes=inputs.dynamic_shapes(), strict=False)
    except Exception as e:  # torch.export raises many types; the user needs the first line
        raise UserError(f"torch.export could not capture the model: {first_line(e)}") from None
    return program.module()


def _by_keyword(model: torch.nn.Module, example: dict[str, Any]) -> torch.nn.Module:
    """The model itself, or, when an input goes through its **kwargs (transformers' past_key_values),
    a module whose forward names every input: torch.export binds dynamic shapes by parameter name."""
    parameters = inspect.signature(model.forward).parameters
    if all(name in parameters for name in example):
        return model
    return _Keywords(model, list(example))


class _Keywords(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model = model

        def forward(**kwargs):
            return self.model(**kwargs)

        forward.__signature__ = inspect.Signature(
            [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in names])
        self.forward = forward


def check(graph_module, runs: list[dict], expected: list, inputs: Signature, tolerance: float) -> VerifyResult:
    """The rewritten graph against the model's own outputs on the check inputs, at real tokens."""
    worst_abs = worst_rel = 0.0
    message = ""
    try:
        with torch.no_grad():
            for run, want in zip(runs, expected):
                got = graph_module(**run)
                real, new = real_mask(run, inputs), new_tokens(run, inputs)
                abs_error, rel_error = compare(_arrays(want, real, new), _arrays(got, real, new), None)
                worst_abs, worst_rel = max(worst_abs, abs_error), max(worst_rel, rel_error)
    except Exception as e:  # a rewrite that crashes is a failed check, reported, never raised
        worst_abs = worst_rel = float("inf")
        message = f"the optimized graph failed: {first_line(e)}"
    ok = worst_rel <= tolerance
    if not ok and not message:
        message = f"max relative error {worst_rel:.2e} > tolerance {tolerance:.0e}"
    shapes = [{name: list(v.shape) for name, v in run.items() if isinstance(v, torch.Tensor)} for run in runs]
    return VerifyResult(ok, worst_abs, worst_rel, tolerance, shapes, message)


def _arrays(outputs, real: torch.Tensor | None, new: int | None) -> dict[str, np.ndarray]:
    """Every output tensor at its real positions (padded ones are zero in a padding-free module)."""
    leaves = pytree.tree_leaves(outputs)
    return {str(i): torch_cache.real_values(leaf.detach(), real, new).float().cpu().numpy()
            for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)}


def count_fused(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    return dict(Counter(FUSED_OPS[node.target] for node in graph_module.graph.nodes if node.target in FUSED_OPS))
