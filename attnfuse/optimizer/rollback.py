"""One rollback policy for both front-ends: find the rewrites that break verification by bisection.

A run makes its rewrites (its candidates) in order. When its result fails verification, the
run again with only a prefix of them enabled tells whether the failure lies in that prefix: the
shortest failing prefix ends with a culprit. The prefix is searched from the end, stepping back
1, 2, 4, ... rewrites until one verifies and then halving the interval between the two, so one
culprit among n costs at most about 2*log2(n) + 2 runs (enabling them one at a time cost n + 1),
and the one made last, padding-free, the usual culprit, costs a single run. The culprit is
excluded, the rewrites before it kept, and the search goes on over those after it until the
rest verify together. When even no rewrite at all verifies, the failure is not a rewrite's:
the first result stands, as it was.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from attnfuse.core.driver import Applied, Candidate
from attnfuse.optimizer.report import VerifyResult


class Verified(Protocol):
    """A run of the passes, verified."""

    verify: VerifyResult


Run = TypeVar("Run", bound=Verified)
Attempt = Callable[[frozenset[Candidate]], Run]  # a verified run with these candidates excluded


def rewrites(applied: Sequence[Applied]) -> list[Candidate]:
    """The rewrites a run made, in order: what a rollback can exclude (a fused op the input came
    with is not one)."""
    return [entry.candidate for entry in applied
            if entry.outcome.fused and not getattr(entry.outcome, "already_fused", False)]


def roll_back(first: Run, candidates: Sequence[Candidate], attempt: Attempt,
              progress: Callable[[str], None] | None = None) -> tuple[Run, dict[Candidate, str]]:
    """The run that excludes the culprits of `first`'s failed verification, and each culprit with
    the verification message of the run that enabled it; `first` and none when `first` verifies,
    made no rewrite, or fails even with every rewrite excluded."""
    if first.verify.ok or not candidates:
        return first, {}
    search = _Search(list(candidates), attempt, progress or (lambda stage: None))
    return search.run(first)


class _Search:
    def __init__(self, candidates: list[Candidate], attempt: Attempt, progress: Callable[[str], None]):
        self.candidates, self.attempt, self.progress = candidates, attempt, progress
        self.kept: list[Candidate] = []  # verified together, with every other candidate excluded
        self.culprits: dict[Candidate, str] = {}

    def run(self, first: Run) -> tuple[Run, dict[Candidate, str]]:
        rest, failing = self.candidates, first  # kept + all of rest enabled: fails
        passing = None  # kept alone enabled: verifies (None: not tried yet)
        while True:
            found = self._culprit(rest, failing, passing)
            if found is None:  # nothing enabled fails too: no rewrite explains the failure
                return first, {}
            culprit_at, passing, failed = found
            self.culprits[rest[culprit_at]] = failed.verify.message
            self.kept += rest[:culprit_at]
            rest = rest[culprit_at + 1:]
            if not rest:
                return passing, self.culprits
            failing = self._enable(rest, len(rest))
            if failing.verify.ok:
                return failing, self.culprits

    def _culprit(self, rest: list[Candidate], failing: Run, passing: Run | None) -> tuple[int, Run, Run] | None:
        """Where in `rest` the shortest failing prefix ends, the runs just before and at it; None
        when the empty prefix fails (only asked when nothing has verified yet)."""
        bad, bad_run = len(rest), failing
        step = 1
        while True:  # step back from the end, doubling the step, until a prefix verifies
            enabled = max(bad - step, 0)
            if enabled == 0 and passing is not None:
                good, good_run = 0, passing
                break
            trial = self._enable(rest, enabled)
            if trial.verify.ok:
                good, good_run = enabled, trial
                break
            if enabled == 0:
                return None
            bad, bad_run, step = enabled, trial, step * 2
        while bad - good > 1:  # halve the interval
            middle = (good + bad) // 2
            trial = self._enable(rest, middle)
            if trial.verify.ok:
                good, good_run = middle, trial
            else:
                bad, bad_run = middle, trial
        return bad - 1, good_run, bad_run

    def _enable(self, rest: list[Candidate], count: int) -> Run:
        """A run with the kept candidates and the first `count` of `rest` enabled, the others excluded."""
        enabled = {*self.kept, *rest[:count]}
        self.progress(f"roll back: {len(enabled)} of {len(self.candidates)} rewrites")
        return self.attempt(frozenset(c for c in self.candidates if c not in enabled))


def mark_rolled_back(applied: list[Applied], culprits: dict[Candidate, str], first: Sequence[Applied]) -> list[str]:
    """Mark each culprit's entry in `applied` (the final run's) rolled back, with the verification
    message that condemned it; a culprit the final run did not reach is added as the first run
    reported it. Returns the culprits' names, for the report's `rolled_back`."""
    entries = {entry.candidate: entry for entry in applied}
    made = {entry.candidate: entry for entry in first}
    names = []
    for candidate, message in culprits.items():
        entry = entries.get(candidate)
        if entry is None:
            entry = Applied(candidate, copy.copy(made[candidate].outcome))
            applied.append(entry)
        entry.outcome.fused, entry.outcome.reason = False, f"rolled back: {message}"
        names.append(entry.outcome.name)
    return names
