"""attnfuse.optimize against torch eager and torch.compile on the real MiniLM, run the way people run it (CPU).

Two workloads, each timed in one process, interleaved, median of --repeats:
- `AutoModel.from_pretrained` (BertModel with its pooler) on batch 32, lengths uniform
  in [8, 128] (the batch of `attnfuse bench`), optimized from one unpadded sentence;
  outputs checked against eager (last_hidden_state at real tokens, pooler_output whole);
- `SentenceTransformer.encode` on the demo's 40 sentences, batch_size 32
  (sentence-transformers' own sorting, padding and pooling); embeddings checked by cosine.
torch.compile(dynamic=True) is applied to the same module attnfuse optimizes.

    python benchmarks/torch_frontend.py [--repeats 7] [--threads 2] [--no-compile]

OpenMP's idle threads wait passively (OMP_WAIT_POLICY=PASSIVE unless the environment
says otherwise), as the ONNX Runtime sessions of `attnfuse bench` stop spinning: on
a machine shared with other work, threads that spin between parallel regions take
the cores the working thread needs, and the contender with the most short regions
(attnfuse, whose attention runs one sequence at a time) loses most.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch's OpenMP loads: before importing torch

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from attnfuse.models import minilm  # noqa: E402
from attnfuse.tools.demo import auto_model_comparison, sentence_transformer_comparison, speedup_table  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COMMAND = "python benchmarks/torch_frontend.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    batch = {name: torch.from_numpy(array) for name, array in minilm.padded_batch(32, 128).items()}
    load_before = os.getloadavg()[0]
    comparisons = [
        auto_model_comparison(minilm, batch, options.repeats, not options.no_compile),
        sentence_transformer_comparison(minilm, options.repeats, not options.no_compile),
    ]
    # Other work on the machine slows small parallel regions (per-sequence attention) most: say how busy it was.
    load = (f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores; "
            f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"{COMMAND} {' '.join(sys.argv[1:])}: MiniLM-L6, {options.threads} threads, "
          f"median of {options.repeats} interleaved runs; {load}")
    for comparison in comparisons:
        print()
        print(comparison.summary())
        print(speedup_table("contender", comparison.times, comparison.agreement))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "torch_frontend.json").write_text(json.dumps({
        "threads": options.threads, "repeats": options.repeats, "load": load,
        "workloads": [{"title": c.title, "median_ms": {n: t * 1000 for n, t in c.times.items()},
                       "agreement": c.agreement, "fused_ops": c.report.fused_ops} for c in comparisons],
    }, indent=1))
    return 0 if all(c.ok for c in comparisons) else 2


if __name__ == "__main__":
    sys.exit(main())
