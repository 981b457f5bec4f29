"""attnfuse.optimize: the PyTorch front-end.

capture (torch.export, dynamic batch and sequence) -> probe on check inputs ->
fx passes -> verify against the original -> roll back what does not verify
(optimizer/rollback.py). The result is an nn.Module called like the original,
returning the same structure.
"""
from __future__ import annotations

import copy
import inspect
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx.experimental._config  # noqa: F401  (backed_size_oblivious, for captures with a cache)

from attnfuse.core import registry
from attnfuse.core.driver import Candidate
from attnfuse.core.modes import parse_attention
from attnfuse.core.options import PassOptions, Target
from attnfuse.optimizer import torch_cache, torch_sentence
from attnfuse.optimizer.errors import UserError, VerificationError, first_line
from attnfuse.optimizer.report import Report, VerifyResult
from attnfuse.optimizer.rollback import mark_rolled_back, rewrites, roll_back
from attnfuse.optimizer.torch_inputs import Call, Signature, pad_ids
from attnfuse.optimizer.torch_verify import check
from attnfuse.passes.fx import PassResult, run_passes

TARGETS = (Target.TORCH_CPU, Target.TORCH_CUDA)


class Graphs(torch.nn.Module):
    """The rewritten graph, called with the captured tensors by name. Where the padding-free
    graph reads sequence positions by index (a pooler's first token), a batch in which one of
    them is padded runs `padded`, the fused graph without padding-free, instead."""

    def __init__(self, graph_module: torch.fx.GraphModule, passes: PassResult, mask: str | None):
        super().__init__()
        self.graph_module = graph_module
        self.padded = passes.padded
        self.mask, self.real_positions = mask, list(passes.real_positions)

    def forward(self, **tensors):
        if self.padded is None:
            return self.graph_module(**tensors)
        # torch.export cannot branch on values: an exported module takes the fused graph.
        if torch.compiler.is_exporting() or not bool((tensors[self.mask][:, self.real_positions] != 0).all()):
            return self.padded(**tensors)
        return self.graph_module(**tensors)


class OptimizedModule(torch.nn.Module):
    """The rewritten graph, called like the original model. `report` says what was fused;
    `config` is the original's (transformers models have one). A call with other inputs than
    the capture's (another set of tensors, another value of a flag) runs the original model."""

    def __init__(self, graphs: Graphs, signature: inspect.Signature, call: Call, inputs: Signature,
                 original: torch.nn.Module, report: Report | None = None):
        super().__init__()
        self.graphs = graphs
        self.report = report
        self.config = getattr(original, "config", None)
        self.__dict__["original"] = original  # not a submodule: its weights are the graphs' already
        self.training = False
        as_captured = torch_cache.as_captured(inputs.example[inputs.cache]) if inputs.cache else None
        warned = []

        def forward(*args, **kwargs):
            traced = call.traced_of(by_name(signature, args, kwargs))
            if traced is not None:
                if as_captured is not None:
                    traced[inputs.cache] = as_captured(traced[inputs.cache])
                return self.graphs(**traced)
            if not warned:
                warned.append(True)
                warnings.warn(f"attnfuse: this module was optimized for calls with {call}; other inputs run "
                              "the original model", stacklevel=2)
            return original(*args, **kwargs)

        # The original's parameter names, so that torch.export and torch.onnx.export can bind inputs by name.
        forward.__signature__ = signature
        self.forward = forward

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.graphs.graph_module

    def train(self, mode: bool = True) -> OptimizedModule:
        """eval() is a no-op (torch.export's graphs refuse train() and eval()); training is not supported."""
        if mode:
            raise UserError("an attnfuse-optimized module runs inference only; train the original model")
        self.training = False
        return self


def optimize(
    model: torch.nn.Module, example_inputs: tuple | None = None, example_kwargs: dict | None = None, *,
    target: str = "cpu", padding_free: bool = True, attention: str = "exact", verify: bool = True,
    tolerance: float | None = None, seed: int = 0,
):
    """Capture `model` with torch.export, fuse its attention, layernorms and gelus, and run it
    padding-free on real batches. A sentence-transformers model comes back as one, its
    transformer optimized (see `torch_sentence`). The result must equal the model to `tolerance`
    (relative to each output's largest magnitude; None: by the outputs' dtype, core/tolerance.py).
    Raises UserError for unusable input and VerificationError when even the unfused capture
    differs from the model."""
    options = pass_options(target, padding_free, attention, verify)
    if torch_sentence.is_sentence_transformer(model):
        return torch_sentence.optimize(model, example_inputs, example_kwargs, optimize_module, options,
                                       tolerance=tolerance, seed=seed)
    return optimize_module(model, example_inputs, example_kwargs, options, tolerance=tolerance, seed=seed)


def pass_options(target: str, padding_free: bool, attention: str, verify: bool) -> PassOptions:
    """optimize's options for the passes; UserErrors for what this front-end cannot do."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == Target.TORCH_CUDA and not torch.cuda.is_available():
        raise UserError("target 'cuda' needs a CUDA device, and torch sees none")
    try:
        mode = parse_attention(attention)
    except ValueError as e:
        raise UserError(str(e)) from None
    if mode.approximate:
        raise UserError(f"attention={attention!r}: the PyTorch front-end does exact attention only; "
                        "approximations are in optimize_onnx")
    return PassOptions(Target(target), padding_free, verify, mode)


@dataclass
class _Attempt:
    """One rewrite of the captured program, and its check (None when not verified)."""

    optimized: OptimizedModule
    passes: PassResult
    verify: VerifyResult | None


def optimize_module(
    model: torch.nn.Module, example_inputs: tuple | None, example_kwargs: dict | None, options: PassOptions, *,
    tolerance: float | None, seed: int, check_also: Callable[[OptimizedModule], VerifyResult] | None = None,
) -> OptimizedModule:
    """optimize on a model that is not a sentence-transformers one. `check_also` verifies an
    attempt further where the check against the model passes (a sentence-transformers model whole)."""
    start = time.perf_counter()
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
    call = Call.of(example)
    inputs = Signature.of(example, pad_ids=pad_ids(model))
    model = model.eval()
    probe_runs = [((), run) for run in inputs.runs(seed)]
    check_runs = inputs.runs(seed + 100, count=3)
    if options.verified:
        with torch.no_grad():  # on copies: a model appends to the cache it is given
            expected = [model(**copy.deepcopy(run)) for run in check_runs]

    # Captured on a made-up batch of 2 rows like the example: torch.export fixes a dim of size 1.
    program = capture(model, call, inputs.make(2, 1.0, "right", seed), inputs)

    def attempt(excluded: frozenset[Candidate]) -> _Attempt:
        graph_module = program.module()  # a graph of its own to rewrite, the model's weights shared
        try:
            passes = run_passes(graph_module, probe_runs, options, excluded, mask=inputs.mask)
        except Exception as e:  # the capture does not run on other batch sizes or lengths
            raise UserError(f"the captured model does not run on other batches: {first_line(e)}") from None
        optimized = OptimizedModule(Graphs(graph_module, passes, inputs.mask), signature, call, inputs, model)
        if not options.verified:
            return _Attempt(optimized, passes, None)
        verdict = check(optimized, check_runs, expected, inputs, tolerance)
        if verdict.ok and check_also is not None:
            verdict = check_also(optimized)
        return _Attempt(optimized, passes, verdict)

    first = result = attempt(frozenset())
    culprits: dict[Candidate, str] = {}
    if options.verified:
        result, culprits = roll_back(first, rewrites(first.passes.applied), attempt)
    rolled_back = mark_rolled_back(result.passes.applied, culprits, first.passes.applied)
    optimized, passes = result.optimized, result.passes
    optimized.report = Report(
        model=type(model).__name__, target=f"torch-{options.target}", attention_mode=str(options.attention),
        sites=passes.sites, fusions=passes.fusions, fused_ops=count_fused(optimized.graph_module),
        verify=result.verify, rolled_back=rolled_back, seconds=time.perf_counter() - start,
    )
    if result.verify is not None and not result.verify.ok:
        raise VerificationError(f"verification failed: {result.verify.message}", optimized.report)
    return optimized


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


def capture(model: torch.nn.Module, call: Call, example: dict[str, Any], inputs: Signature
            ) -> torch.export.ExportedProgram:
    """torch.export's program of `model` on the example's tensors and caches, batch and sequence dynamic."""
    traced = {name: example[name] for name in call.traced}
    shapes = {name: shape for name, shape in inputs.dynamic_shapes().items() if name in call.traced}
    named = set(inspect.signature(model.forward).parameters)
    exported = model if not call.constants and set(call.traced) <= named else _TracedOnly(model, call)
    # With a cache, sizes 0 and 1 (no past, one row) must stay dynamic, not be specialised away.
    oblivious = torch.fx.experimental._config.patch(backed_size_oblivious=inputs.cache is not None)
    try:
        with oblivious:
            program = torch.export.export(exported, (), copy.deepcopy(traced), dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch.export raises many types; the user needs the first line
        raise UserError(f"torch.export could not capture the model: {first_line(e)}") from None
    return program


class _TracedOnly(torch.nn.Module):
    """The model called with its tensors and caches by name, its other inputs (flags) fixed at the
    example's: what torch.export can capture whatever the forward's signature (**kwargs included,
    as transformers' past_key_values): it binds dynamic shapes by parameter name."""

    def __init__(self, model: torch.nn.Module, call: Call):
        super().__init__()
        self.model = model

        def forward(**traced):
            return model(**traced, **call.constants)

        kind = inspect.Parameter.KEYWORD_ONLY
        forward.__signature__ = inspect.Signature([inspect.Parameter(name, kind) for name in call.traced])
        self.forward = forward


def count_fused(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    fused = [registry.of_torch(node.target) for node in graph_module.graph.nodes if node.op == "call_function"]
    return dict(Counter(op.name for op in fused if op is not None))
