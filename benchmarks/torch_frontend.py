"""attnfuse.optimize(model) against torch eager and torch.compile, on the real MiniLM (CPU).

Batch 32, max length 128, lengths uniform in [8, 128] (the same batch as `attnfuse
bench`), 2 threads. All three run on the same inputs, interleaved, median of
--repeats; outputs are checked against eager at real tokens.

    python benchmarks/torch_frontend.py [--repeats 5] [--threads 2] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from attnfuse.models import minilm
from attnfuse.tools.demo import torch_minilm
from attnfuse.tools.timing import table, time_modules

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    model, optimized = torch_minilm(minilm)
    batch = {name: torch.from_numpy(array) for name, array in minilm.padded_batch(32, 128).items()}
    contenders = {"torch eager (sdpa)": model, "attnfuse.optimize": optimized}
    if not options.no_compile:
        contenders["torch.compile (inductor)"] = torch.compile(model, dynamic=True)
    real = batch["attention_mask"].bool()
    times, errors = time_modules(contenders, batch, real, options.repeats, desc="MiniLM")
    eager = times["torch eager (sdpa)"]
    rows = [[name, f"{t * 1000:.1f}", f"{eager / t:.2f}x", f"{errors[name]:.1e}"] for name, t in times.items()]
    print(f"MiniLM-L6, batch 32, max length 128, {int(real.sum())} real tokens of {real.numel()}, "
          f"{options.threads} threads, median of {options.repeats}")
    print(table(["contender", "ms", "vs eager", "max rel error"], rows))
    print(f"attnfuse: {optimized.report.attention_fused}/{optimized.report.attention_total} attention fused, "
          f"ops {optimized.report.fused_ops}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "torch_frontend.json").write_text(json.dumps(
        {"threads": options.threads, "repeats": options.repeats, "median_ms": {n: t * 1000 for n, t in times.items()},
         "max_rel_error": errors, "fused_ops": optimized.report.fused_ops}, indent=1))


if __name__ == "__main__":
    main()
