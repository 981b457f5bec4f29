"""Rewrites of torch.export graphs: rotary, attention, RMSNorm, LayerNorm, gelu, skip+layernorm, padding-free.

The one entry point the optimizer calls is `run_passes`.
"""
from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass

import torch.fx as fx

from attnfuse.core import driver
from attnfuse.core.driver import Applied, Candidate
from attnfuse.core.options import PassOptions
from attnfuse.core.outcome import Fusion
from attnfuse.passes import result
from attnfuse.passes.fx import padding_free
from attnfuse.passes.fx.adapter import FxGraph
from attnfuse.passes.fx.graph import FxProbe, NoMatch, find_tokens, placeholders, remove_dead, remove_no_ops
from attnfuse.passes.fx.view import TorchView
from attnfuse.passes.rules import pipeline


@dataclass
class PassResult(result.PassResult):
    # Sequence positions the padding-free graph reads by index, and the fused graph without
    # padding-free, for batches in which one of them is padded.
    real_positions: tuple[int, ...] = ()
    padded: fx.GraphModule | None = None


def run_passes(module: fx.GraphModule, runs: list[tuple[tuple, dict]], options: PassOptions,
               excluded: Collection[Candidate] = (), *, mask: str | None) -> PassResult:
    """Rewrite `module` in place, probing it on `runs` ((args, kwargs) check inputs); `mask` names
    the padding-mask input. The `excluded` candidates are left as they are."""
    graph = module.graph
    probe = FxProbe(module, runs)
    remove_no_ops(graph)
    mask = _placeholder(graph, probe, runs, mask)
    view = TorchView(probe, mask, find_tokens(graph, probe, mask))
    adapter = FxGraph(graph, view)
    found = []
    for rule in pipeline(options):
        found += driver.rewrite(adapter, view, [rule], excluded)
        remove_dead(graph)  # what a rule replaced is no anchor for the next
    module.recompile()
    passes = PassResult(found)
    if options.padding_free:
        found.append(_padding_free(module, runs, mask, excluded, passes))
    return passes


def _placeholder(graph: fx.Graph, probe: FxProbe, runs: list[tuple[tuple, dict]], name: str | None
                 ) -> fx.Node | None:
    """The placeholder the input `name` is fed to (the very tensor on the first run)."""
    given = runs[0][1].get(name) if name is not None else None
    return next((node for node in placeholders(graph) if given is not None and probe.get(node, 0) is given), None)


def _padding_free(module: fx.GraphModule, runs, mask: fx.Node | None, excluded: Collection[Candidate],
                  passes: PassResult) -> Applied:
    fusion = Fusion(padding_free.NAME, padding_free.OP, fused=False)
    candidate = Candidate(padding_free.NAME, mask.name if mask is not None else "")
    saved = copy.deepcopy(module.graph)  # the pass changes the graph as it goes: keep a way back
    try:
        if mask is None:
            raise NoMatch("the model has no attention-mask input")
        if candidate in excluded:
            raise NoMatch(driver.EXCLUDED)
        # Probe again: the fused ops just added are what padding-free must see.
        packed = padding_free.apply(module.graph, FxProbe(module, runs), mask)
        fusion.fused, fusion.reason, fusion.op = True, None, packed.describe()
        if packed.real_positions:
            passes.real_positions, passes.padded = packed.real_positions, fx.GraphModule(module, saved)
    except NoMatch as e:
        fusion.reason = str(e)
        module.graph = saved
    module.recompile()
    return Applied(candidate, fusion)
