"""A rewrite rule: where to look, what it found there, and what replaces it.

    class SkipLayerNorm(Rule):
        name = "skip_layernorm"
        def anchors(self, graph, view):          every LAYER_NORM node
        def match(self, anchor, graph, view):    layernorm(a + b (+ bias)) -> a typed match, or
                                                 None (not this rule's construct), or NoMatch(reason)
        def lower(self, match, graph, view):     yields Replacements, the preferred first
        def report(self, anchor, match):         the Fusion / AttentionSite the report shows

The driver (driver.py) runs every rule on every graph: it skips excluded candidates,
proves each replacement on the probe's runs before it commits it, and turns every
NoMatch into the reported reason. A rule never touches the graph itself.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from attnfuse.core.graph import Graph, Node, Value
from attnfuse.core.outcome import Outcome
from attnfuse.core.view import View

M = TypeVar("M")


class NoMatch(Exception):
    """The first thing that did not fit; its message is the reason in the report."""


@dataclass
class Replacement:
    """One way to rewrite a match: the nodes a builder made (not in the graph yet) and the claims
    they must prove, each (a value of the graph, the new value that replaces it)."""

    label: str  # what it is, for notes ("GroupQueryAttention")
    nodes: list[Node]
    claims: list[tuple[Value, Value]]
    builder: Any = None  # the adapter's builder that made the nodes (it commits them)
    facts: dict[str, Any] = field(default_factory=dict)  # what the rule learned by building it: fields of
    # the report's entry, set there when this replacement is committed
    exact: bool = True  # False: an opt-in approximation, whose error the rule measured instead of proving it
    why_not: str | None = None  # a preferred form that could not be built (no nodes): why, for the note

    @classmethod
    def unbuilt(cls, label: str, why: str) -> "Replacement":
        """A preferred form that does not apply here, kept in the order so the report says why."""
        return cls(label, [], [], why_not=why)


class Rule(Protocol, Generic[M]):
    name: str

    def anchors(self, graph: Graph, view: View) -> Iterable[Node]:
        """Where this rule may apply, in the order to try them."""

    def match(self, anchor: Node, graph: Graph, view: View) -> M | None:
        """What is at `anchor`: a typed match, None if it is not this rule's construct at all, or
        NoMatch(reason) if it is one that cannot be fused (the report says why)."""

    def lower(self, match: M, graph: Graph, view: View) -> Iterator[Replacement]:
        """Replacements for the match, the preferred first; NoMatch when none can be built."""

    def report(self, anchor: Node, match: M | None, graph: Graph) -> Outcome:
        """The report's entry for the anchor (the driver fills in fused and reason)."""
