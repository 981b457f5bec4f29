"""What a pipeline run did, for both front-ends: an entry per place a rule looked at, in the
order the rewrites were made, each with the candidate a rollback excludes to undo it."""
from __future__ import annotations

from dataclasses import dataclass, field

from attnfuse.core.driver import Applied
from attnfuse.core.outcome import AttentionSite, Outcome


def is_site(outcome: Outcome) -> bool:
    """An attention site's report (every other outcome is a Fusion)."""
    return isinstance(outcome, AttentionSite)


@dataclass
class PassResult:
    applied: list[Applied] = field(default_factory=list)

    @property
    def sites(self) -> list:
        """The attention sites' reports."""
        return [entry.outcome for entry in self.applied if is_site(entry.outcome)]

    @property
    def fusions(self) -> list:
        """Every other rewrite's report."""
        return [entry.outcome for entry in self.applied if not is_site(entry.outcome)]
