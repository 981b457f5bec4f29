"""The passes not yet written as rules, in the driver's terms: they exclude by anchor name and
report bare outcomes, where the rollback excludes and the pipelines return `driver.Candidate`s.
A pass leaves this module when it becomes a rule (the driver does both itself)."""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from attnfuse.core import outcome
from attnfuse.core.driver import Applied, Candidate
from attnfuse.passes import site

SITES = (outcome.AttentionSite, site.AttentionSite)  # a site's report, from a rule or an old pass


def anchors(excluded: Collection[Candidate], rule: str) -> frozenset[str]:
    """The names of the anchors `rule` must leave alone."""
    return frozenset(candidate.anchor for candidate in excluded if candidate.rule == rule)


def applied(rule: str, outcomes: Sequence) -> list[Applied]:
    """`rule`'s outcomes, each with its candidate (anchored at the name it reports)."""
    return [Applied(Candidate(rule, item.name), item) for item in outcomes]


def run(excluded: Collection[Candidate], rule: str, fuse: Callable[..., Sequence], *args, **kwargs) -> list[Applied]:
    """`fuse(*args, exclude=<the anchors rule must leave alone>, **kwargs)`, an old pass's call,
    with its outcomes as `rule`'s entries."""
    return applied(rule, fuse(*args, exclude=anchors(excluded, rule), **kwargs))
