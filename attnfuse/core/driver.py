"""The one driver: every rule, on every graph, of both front-ends.

For each rule in order and each of its anchors: match; skip what a rollback excluded;
build the replacements the rule offers, prove each on the probe's runs (every claimed
value must come out equal, to the tolerance of its dtype, at real tokens) and commit the
first that proves; report every anchor with what happened to it. Nothing is committed
unproven (but an opt-in approximation, whose error its rule measures and reports), and
every failure is a reason in the report. A rule that fails on a spelling it did not foresee
(any error but NoMatch, before it committed) leaves that site as it is, with the error as
its reason, and the run goes on (with ATTNFUSE_DEBUG set, the error is raised).
"""
from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from attnfuse.core import tolerance
from attnfuse.core.graph import Graph
from attnfuse.core.outcome import AttentionSite, Outcome
from attnfuse.core.rule import NoMatch, Replacement, Rule
from attnfuse.core.view import View

EXCLUDED = "excluded (rolled back)"


@dataclass(frozen=True)
class Candidate:
    """A rewrite one run can make: what a rollback excludes from the next run. The anchor's label
    is the same on every run over the same input, which is what makes it an identity here."""

    rule: str
    anchor: str


@dataclass
class Applied:
    """What the driver did at one anchor."""

    candidate: Candidate
    outcome: Outcome


def rewrite(graph: Graph, view: View, rules: Sequence[Rule], excluded: Collection[Candidate] = ()) -> list[Applied]:
    """Run `rules` over `graph` in order; returns an entry per anchor that matched or was refused."""
    applied = []
    for rule in rules:
        for anchor in list(rule.anchors(graph, view)):
            if not graph.alive(anchor):
                continue  # replaced by an earlier rewrite
            try:
                entry = _at(rule, anchor, graph, view, excluded)
            finally:
                graph.settle()
            if entry is not None:
                applied.append(entry)
    return applied


def _at(rule: Rule, anchor, graph: Graph, view: View, excluded: Collection[Candidate]) -> Applied | None:
    candidate = Candidate(rule.name, graph.label(anchor))
    try:
        match = rule.match(anchor, graph, view)
    except NoMatch as why:
        return Applied(candidate, _refused(rule.report(anchor, None, graph), str(why)))
    except Exception as error:  # a spelling the rule did not foresee: this site stays, the others go on
        return Applied(candidate, _refused(rule.report(anchor, None, graph), _defect(error)))
    if match is None:
        return None
    outcome = rule.report(anchor, match, graph)
    if candidate in excluded:
        return Applied(candidate, _refused(outcome, EXCLUDED))
    failed: list[tuple[str, str]] = []
    replacements = iter(rule.lower(match, graph, view))
    while True:
        replacement = None
        try:
            replacement = next(replacements, None)  # a NoMatch raised here ends the rule's offers
            if replacement is None:
                break
            if replacement.why_not is not None:
                raise NoMatch(replacement.why_not)
            if replacement.exact:
                prove(replacement, view)
        except NoMatch as why:
            failed.append((replacement.label if replacement is not None else "", str(why)))
            continue
        except Exception as error:  # nothing is committed yet: the site stays as it is
            failed.append(("", _defect(error)))
            break
        graph.commit(replacement)
        view.committed(replacement)
        outcome = rule.report(anchor, match, graph)
        for name, value in replacement.facts.items():  # what lowering learned (an approximation's error)
            setattr(outcome, name, value)
        outcome.fused, outcome.reason = True, None
        _note(outcome, replacement.label, failed)
        return Applied(candidate, outcome)
    return Applied(candidate, _refused(outcome, failed[-1][1] if failed else "no replacement to build"))


def _defect(error: Exception) -> str:
    """The reason for a site a rule failed on; the error itself with ATTNFUSE_DEBUG set."""
    if os.environ.get("ATTNFUSE_DEBUG"):
        raise error
    first = str(error).splitlines()[0] if str(error) else ""
    return f"attnfuse failed on this site ({type(error).__name__}: {first}); it is left as it is (please report it)"


def prove(replacement: Replacement, view: View) -> None:
    """Each claimed value equals the original it replaces on every run that computed them all, at
    real tokens, to its dtype's tolerance. NoMatch (with the error) otherwise."""
    originals = [old for old, _ in replacement.claims]
    news = [new for _, new in replacement.claims]
    for run in view.runs(*originals):
        got = view.evaluate(replacement.nodes, news, {}, run)
        for old, value in zip(originals, got):
            expected = view.value(old, run)
            error = tolerance.relative_error(expected, value, view.real(run))
            if not error <= tolerance.tolerance(expected.dtype):
                raise NoMatch(f"the fused op does not reproduce the original (relative error {error:.2g})")


def _refused(outcome: Outcome, reason: str) -> Outcome:
    outcome.fused, outcome.reason = False, reason
    return outcome


def _note(outcome: Outcome, kept: str, failed: list[tuple[str, str]]) -> None:
    """Say why a preferred form was not used (a site's note)."""
    if failed and isinstance(outcome, AttentionSite):
        label, why = failed[0]
        outcome.note = f"kept {kept}, not {label}: {why}"
