"""Padding-free attnfuse against torch eager and the peers on MiniLM and a BERT-base-sized model,
with a sweep of padding fractions: writes benchmarks/results/padding_free.{json,png}.

    python -m benchmarks.padding_free [extra attnfuse bench options]   (from the repository root)
"""
from __future__ import annotations

import sys
from pathlib import Path

from attnfuse.tools import bench_command

RESULTS = Path(__file__).parent / "results"


def main(extra: list[str]) -> int:
    return bench_command.main(["--model", "all", "--sweep", "--json", str(RESULTS / "padding_free.json"),
                       "--plot", str(RESULTS / "padding_free.png"), *extra])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
