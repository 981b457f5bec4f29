"""attnfuse on the Llama-shaped benchmark decoder (prefill of 16 left-padded prompts, decode of one
token over a 512-token KV cache, greedy generation) against torch eager and the peers, with each
contender's peak memory: writes benchmarks/results/llama.{json,png} and prints README-ready tables,
the last a row per contender (prefill, decode step, end to end, tokens equal to torch's).

    python -m benchmarks.llama [extra attnfuse bench options, e.g. --repeats 7 or --vocab 8000]

The runtime peers (onnxruntime-genai, CTranslate2) run where benchmarks/peers/install_decoder_peers.sh
installed them; elsewhere their rows say "not installed".
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from attnfuse.tools import bench_command, bench_decoder

RESULTS = Path(__file__).parent / "results"


def main(extra: list[str]) -> int:
    out = RESULTS / "llama.json"
    code = bench_command.main(["--model", "llama", "--json", str(out), "--plot", str(RESULTS / "llama.png"), *extra])
    print()
    print(bench_decoder.summary_table(json.loads(out.read_text())["results"]))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
