"""The rollback policy both front-ends share (optimizer/rollback.py), on fake runs: which candidates
it blames, and how many runs of the passes it takes to find them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from attnfuse.core.driver import Applied, Candidate
from attnfuse.core.outcome import AttentionSite, Fusion
from attnfuse.optimizer.report import VerifyResult
from attnfuse.optimizer.rollback import mark_rolled_back, rewrites, roll_back


@dataclass
class Run:
    excluded: frozenset[Candidate]
    verify: VerifyResult


class Passes:
    """Fake runs of n rewrites: a run fails when it enables a culprit, or all of a group that
    fails only together, or always (a failure no rewrite explains)."""

    def __init__(self, n: int, culprits=(), together=(), always=False):
        self.candidates = [Candidate("rule", f"node_{i}") for i in range(n)]
        self.culprits = {self.candidates[i] for i in culprits}
        self.together = {self.candidates[i] for i in together}
        self.always = always
        self.runs: list[frozenset[Candidate]] = []

    def attempt(self, excluded: frozenset[Candidate]) -> Run:
        self.runs.append(excluded)
        return self.run(excluded)

    def run(self, excluded: frozenset[Candidate]) -> Run:
        enabled = {c for c in self.candidates if c not in excluded}
        failing = sorted(c.anchor for c in self.culprits & enabled)
        if self.together and self.together <= enabled:
            failing.append("+".join(sorted(c.anchor for c in self.together)))
        ok = not failing and not self.always
        message = "ok" if ok else f"max relative error 1 over tolerance 0.0001 with {', '.join(failing) or 'none'}"
        return Run(excluded, VerifyResult(ok, 0.0, 0.0 if ok else 1.0, 1e-4, message=message))

    def roll_back(self):
        first = self.run(frozenset())
        return first, *roll_back(first, self.candidates, self.attempt)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 11, 16, 33, 100])
def test_one_culprit_anywhere_among_n_costs_about_2_log2_n_runs(n):
    for position in range(n):
        passes = Passes(n, culprits=[position])
        _, result, culprits = passes.roll_back()
        culprit = passes.candidates[position]
        assert culprits == {culprit: f"max relative error 1 over tolerance 0.0001 with node_{position}"}
        assert result.verify.ok and result.excluded == {culprit}  # every other rewrite kept
        assert len(passes.runs) <= 2 * math.log2(n) + 2, (position, len(passes.runs))


def test_the_rewrite_made_last_costs_one_run():
    """Padding-free runs last and is the usual culprit (a pooling that reads padded positions)."""
    passes = Passes(12, culprits=[11])
    _, result, culprits = passes.roll_back()
    assert list(culprits) == [passes.candidates[11]] and passes.runs == [{passes.candidates[11]}]


def test_against_one_run_per_candidate_before():
    """11 rewrites (the zoo BERT's): the run per candidate took 12 runs wherever the culprit was."""
    worst = 0
    for position in range(11):
        passes = Passes(11, culprits=[position])
        passes.roll_back()
        worst = max(worst, len(passes.runs))
    assert worst == 7


def test_two_culprits_are_both_rolled_back_and_the_rest_kept():
    passes = Passes(20, culprits=[4, 13])
    _, result, culprits = passes.roll_back()
    assert list(culprits) == [passes.candidates[4], passes.candidates[13]]
    assert culprits[passes.candidates[4]].endswith("with node_4")
    assert culprits[passes.candidates[13]].endswith("with node_13")
    assert result.verify.ok and result.excluded == set(culprits)
    assert len(passes.runs) <= 2 * (2 * math.log2(20) + 2)


def test_every_rewrite_a_culprit():
    passes = Passes(5, culprits=range(5))
    _, result, culprits = passes.roll_back()
    assert list(culprits) == passes.candidates and result.excluded == set(passes.candidates) and result.verify.ok


def test_rewrites_that_fail_only_together_lose_the_later_one():
    """The shortest failing prefix ends with the rewrite that completes the failure: it goes, the
    one before it stays."""
    passes = Passes(10, together=[2, 7])
    _, result, culprits = passes.roll_back()
    assert list(culprits) == [passes.candidates[7]] and culprits[passes.candidates[7]].endswith("node_2+node_7")
    assert result.verify.ok and result.excluded == {passes.candidates[7]}


def test_a_failure_no_rewrite_explains_leaves_the_first_run():
    passes = Passes(11, always=True)
    first, result, culprits = passes.roll_back()
    assert result is first and culprits == {}
    assert passes.runs[-1] == set(passes.candidates)  # it ended on the run with nothing enabled
    assert len(passes.runs) <= math.log2(11) + 2


def test_nothing_to_do():
    passes = Passes(4)
    first, result, culprits = passes.roll_back()
    assert result is first and culprits == {} and passes.runs == []
    failing = Passes(0, always=True)
    first, result, culprits = failing.roll_back()
    assert result is first and culprits == {} and failing.runs == []


def test_progress_says_how_many_rewrites_each_run_enables():
    passes = Passes(8, culprits=[7])
    said = []
    roll_back(passes.run(frozenset()), passes.candidates, passes.attempt, said.append)
    assert said == ["roll back: 7 of 8 rewrites"]


# --- what the report gets ----------------------------------------------------------


def entry(anchor: str, fused: bool = True, **site) -> Applied:
    outcome = AttentionSite(anchor, fused=fused, **site) if site or anchor.startswith("softmax") \
        else Fusion(anchor, "SkipLayerNormalization", fused)
    return Applied(Candidate("attention" if isinstance(outcome, AttentionSite) else "skip", anchor), outcome)


def test_the_candidates_are_the_rewrites_made_in_order():
    applied = [entry("softmax_0", already_fused=True), entry("ln_0"), entry("softmax_1"),
               entry("ln_1", fused=False), entry("ln_2")]
    assert [c.anchor for c in rewrites(applied)] == ["ln_0", "softmax_1", "ln_2"]


def test_rolled_back_entries_say_why_and_are_named():
    first = [entry("softmax_0"), entry("ln_0"), entry("ln_1")]
    final = [entry("softmax_0"), entry("ln_1")]  # the final run did not reach ln_0
    final[1].outcome.fused, final[1].outcome.reason = False, "excluded (rolled back)"
    culprits = {first[2].candidate: "max relative error 0.3 over tolerance 0.0001",
                first[1].candidate: "max relative error 0.2 over tolerance 0.0001"}
    assert mark_rolled_back(final, culprits, first) == ["ln_1", "ln_0"]
    reasons = {e.outcome.name: (e.outcome.fused, e.outcome.reason) for e in final}
    assert reasons == {"softmax_0": (True, None),
                       "ln_1": (False, "rolled back: max relative error 0.3 over tolerance 0.0001"),
                       "ln_0": (False, "rolled back: max relative error 0.2 over tolerance 0.0001")}
    assert first[1].outcome.fused  # the first run's report is left as it was


# --- on a model --------------------------------------------------------------------


def test_a_forced_rollback_on_the_zoo_bert_keeps_every_other_rewrite(monkeypatch):
    """Verification made to fail whenever a run made one chosen rewrite: that rewrite alone is
    rolled back, each run of the passes fusing the rest as the first did (a run's probe keeps no
    aliases from another's), in a few runs where one per candidate took 12."""
    from attnfuse.optimizer import api, optimize_onnx
    from attnfuse.models import zoo

    path = str(zoo.exported(zoo.ZooCase("bert", "dynamo", "sdpa")))
    plain = optimize_onnx(path).report
    culprit = "node_layer_norm_2"
    runs, real_passes, real_check = [], api.run_passes, api.Verifier.check

    def run_passes(*args):
        runs.append(real_passes(*args))
        return runs[-1]

    def check(self, model):
        made = any(item.name == culprit and item.fused for item in runs[-1].fusions)
        verdict = real_check(self, model)
        verdict.ok, verdict.message = not made, "max relative error 1 over tolerance 0.0001" if made else "ok"
        return verdict

    monkeypatch.setattr(api, "run_passes", run_passes)
    monkeypatch.setattr(api.Verifier, "check", check)
    report = optimize_onnx(path).report
    assert report.rolled_back == [culprit] and report.verify.ok
    fused = lambda r: {item.name for item in [*r.sites, *r.fusions] if item.fused}  # noqa: E731
    assert fused(report) == fused(plain) - {culprit}
    reasons = [f.reason for f in report.fusions if f.name == culprit]
    assert reasons == ["rolled back: max relative error 1 over tolerance 0.0001"]
    assert len(runs) <= 8
