"""Rewrites of ONNX graphs: canonicalise, match attention once, lower to fused ops.

The one entry point the optimizer calls is `run_passes`.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from attnfuse.core import driver
from attnfuse.core.driver import Applied, Candidate
from attnfuse.core.options import PassOptions, Target
from attnfuse.core.outcome import AttentionSite, CacheKind, Fusion
from attnfuse.passes.onnx import padding_free, unpadded_branch
from attnfuse.passes.onnx.activation_qdq import float_outside_int8_kernels
from attnfuse.passes.onnx.canonicalize import canonicalize
from attnfuse.passes.onnx.einsum import lower_einsums
from attnfuse.passes.onnx.functions import expand_functions
from attnfuse.passes.onnx.graph import (
    MS_DOMAIN, NoMatch, graphs_in_order, nodes_on_one_path, opset, remove_unused, speaking_opset,
)
from attnfuse.passes.onnx.adapter import OnnxGraph
from attnfuse.passes.onnx.types import fill_types
from attnfuse.passes.onnx.view import OrtView
from attnfuse.passes.result import PassResult
from attnfuse.passes.rules import attention, pipeline


class Probe(Protocol):
    """Values of every tensor of the *original* graph on two sets of check inputs.

    The two runs use different batch sizes, sequence lengths and data, so a tensor
    that is equal in both is a constant of the graph.
    """

    run_count: int

    def get(self, name: str, run: int | None = None) -> np.ndarray | None: ...  # None: the first run seeing it
    def runs_seeing(self, name: str) -> list[int]: ...  # the runs that computed it (If branches: those taking it)
    def is_constant(self, name: str) -> bool: ...
    def same_as(self, new: str, original: str) -> None: ...  # a proven replacement reads as the original
    def inputs(self, run: int) -> Any: ...  # .feeds, .real (bool [B, S] or None)

    plan: InputNames


class InputNames(Protocol):
    """The graph inputs the passes read, by name, as the optimizer read their roles from the graph."""

    padding_mask: str | None  # integer or bool [B, T]: the padding mask of this step's tokens (and cached ones)
    token_ids: str | None  # [B, S]: this step's token ids


def prepare(model: ir.Model) -> ir.Model:
    """The model in the spellings the matchers know (Einsum as MatMul, opset 23's RMSNormalization and
    RotaryEmbedding as the ops ONNX defines them by; static activation quantization
    only where an int8 MatMul reads it), before it is probed; the model itself when nothing changes.
    A copy shares the weights."""
    copy = model.clone()
    changed = lower_einsums(copy)
    changed += float_outside_int8_kernels(copy)  # first: the ops expanded next then read typed float values
    changed += expand_functions(copy)
    return copy if changed else model


def run_passes(model: ir.Model, probe: Probe, options: PassOptions, excluded: Collection[Candidate] = ()) -> PassResult:
    """Rewrite `model` in place. The `excluded` candidates are left as they are (the optimizer
    rolls a rewrite back by running again without it)."""
    with speaking_opset(opset(model.graph)):
        return _run_passes(model, probe, options, excluded)


def _run_passes(model: ir.Model, probe: Probe, options: PassOptions, excluded: Collection[Candidate]) -> PassResult:
    graph = model.graph
    mask = padding_mask(graph, probe)
    fused_before = attention.already_fused(OnnxGraph(graph, None), nodes_on_one_path(graph))
    result = PassResult(_reported(fused_before))
    applied = result.applied
    rules = pipeline(options)
    for subgraph, in_loop in graphs_in_order(graph):  # the model's graph, then If branches, Loop bodies
        if in_loop and not _observed(subgraph, probe):
            applied += _reported(_in_loop_body(subgraph))
            continue
        canonicalize(subgraph, probe)
        applied += _rules(subgraph, probe, excluded, rules, mask, options.target.standard_onnx)
    remove_unused(model)
    sites = result.sites
    if options.padding_free:
        branch = Candidate(unpadded_branch.NAME, _anchor(mask))
        why_not_branch = _why_no_unpadded_branch(options, branch in excluded, sites)
        graph.sort()  # cloning and padding-free follow the nodes in order (a rewrite may precede what it reads)
        if why_not_branch is None:
            fused = graph.clone()  # what a batch without padding will run
        packed, positions = _padding_free(graph, probe, options, excluded, mask)
        applied.append(packed)
        remove_unused(model)
        if packed.outcome.fused:
            if why_not_branch is None:
                unpadded_branch.add(graph, fused, mask.value, positions)
                remove_unused(model)
            applied.append(Applied(branch, Fusion(unpadded_branch.NAME, "If", why_not_branch is None, why_not_branch)))
    graph.sort()  # a replaced value may be read before the node that now makes it
    _check_replaced(graph, sites)
    fill_types(model)
    if any(node.domain == MS_DOMAIN for node in graph.all_nodes()):
        model.opset_imports[MS_DOMAIN] = 1
    return result


def _rules(graph: ir.Graph, probe, excluded: Collection[Candidate], rules, mask, standard: bool) -> list[Applied]:
    view = OrtView(probe, opset(graph))
    return driver.rewrite(OnnxGraph(graph, view, mask.value if mask else None, standard), view, rules, excluded)


def _reported(sites: list[AttentionSite]) -> list[Applied]:
    """Attention sites reported without a rewrite, each with the candidate its name anchors."""
    return [Applied(Candidate(attention.Attention.name, site.name), site) for site in sites]


def _anchor(mask) -> str:
    """What a rewrite of the whole model (padding-free, its unpadded branch) is anchored at: the padding mask."""
    return mask.value.name if mask is not None else ""


def padding_mask(graph: ir.Graph, probe: Probe) -> padding_free.PaddingMask | None:
    """The padding-mask input the probe's plan names, with the input of this step's token ids."""
    inputs = {value.name: value for value in graph.inputs}
    mask = inputs.get(probe.plan.padding_mask)
    return padding_free.PaddingMask(mask, inputs.get(probe.plan.token_ids)) if mask is not None else None


def _observed(graph: ir.Graph, probe: Probe) -> bool:
    """Whether the probe saw the graph's values (a Loop body's, in its first iteration)."""
    return any(probe.runs_seeing(out.name) for node in graph for out in node.outputs if out.name)


def _in_loop_body(graph: ir.Graph) -> list[AttentionSite]:
    """A loop body whose values the probe could not see (they change shape between iterations,
    or it is a Scan's): its attention is reported, not fused."""
    return [AttentionSite(name=node.name, reason="inside a Loop or Scan body whose values were not observed "
                          "(they change shape between iterations)") for node in graph if node.op_type == "Softmax"]


def _check_replaced(graph: ir.Graph, sites: list[AttentionSite]) -> None:
    """A fused site whose softmax is still computed was not really replaced: say so."""
    alive = {node.name for node in graph.all_nodes() if node.op_type == "Softmax"}
    for site in sites:
        if site.fused and site.name in alive:
            site.fused = False
            site.reason = "the original attention is still computed: another op reads its intermediates"


def _padding_free(graph: ir.Graph, probe: Probe, options: PassOptions, excluded: Collection[Candidate],
                  mask: padding_free.PaddingMask | None) -> tuple[Applied, list[int]]:
    """The padding-free fusion, and the sequence positions the graph reads by index."""
    name = padding_free.NAME
    candidate = Candidate(name, _anchor(mask))
    if candidate in excluded:
        return Applied(candidate, Fusion(name, "PaddingFree", False, driver.EXCLUDED)), []
    try:
        positions = padding_free.apply(graph, probe, mask, options.target, verified=options.verified)
    except NoMatch as why:
        return Applied(candidate, Fusion(name, "PaddingFree", False, str(why))), []
    return Applied(candidate, Fusion(name, "PaddingFree", True)), positions


def _why_no_unpadded_branch(options: PassOptions, excluded: bool, sites: list[AttentionSite]) -> str | None:
    if excluded:
        return driver.EXCLUDED
    if options.target not in (Target.ORT_CPU, Target.OPENVINO):
        return "only for ort-cpu and openvino: packed attention has no copies to skip on CUDA"
    if any(site.cache is CacheKind.PAST for site in sites):
        # Measured on the benchmark Llama: ONNX Runtime pre-packs the weights of each branch's
        # MatMuls apart (957 MB against 621 MB for a decode step), and a generated batch with a
        # padded row keeps it padded at every step, so the unpadded graph would seldom run.
        return "the model has a KV cache: its batches stay padded while they generate, and a second " \
               "graph makes ONNX Runtime pre-pack every weight twice"
    return None
