"""attnfuse on the Llama-shaped benchmark decoder (prefill of 16 left-padded prompts, decode of one
token over a 512-token KV cache) against torch eager and the peers, with each contender's peak
memory: writes benchmarks/results/llama.{json,png} and prints a README-ready table.

    python -m benchmarks.llama [extra attnfuse bench options, e.g. --repeats 7 or --vocab 8000]
"""
from __future__ import annotations

import sys
from pathlib import Path

from attnfuse.tools import bench

RESULTS = Path(__file__).parent / "results"


def main(extra: list[str]) -> int:
    return bench.main(["--model", "llama", "--json", str(RESULTS / "llama.json"), "--plot", str(RESULTS / "llama.png"),
                       *extra])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
