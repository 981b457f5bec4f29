"""attnfuse::packed_attention on the CPU: the packed sequences grouped into SDPA calls several ways.

MiniLM's attention (12 heads of 32) on the real tokens of two workloads, the six layers' calls each:
- varlen: batch 32, lengths uniform in [8, 128] (the batch of `attnfuse bench`);
- encode: the batches `SentenceTransformer.encode(minilm.sentence_mix(256), batch_size=32)` makes (the texts
  sorted by length, 32 at a time, each batch's real tokens).
Groupings: one call per sequence (the loop this replaced), one call on the whole batch padded to its longest,
K buckets of equal count (sorted by length), and kernels/ops.length_buckets (what the op runs). Each under
OpenMP's default wait policy and under PASSIVE (a process each: OpenMP reads the policy when torch loads),
on 1 and 2 threads; medians of interleaved runs, in ms.

    python benchmarks/packed_attention.py [--repeats 30] [--threads 1,2]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys

POLICIES = ("default", "PASSIVE")
HEADS, HEAD_SIZE, LAYERS = 12, 32, 6


def workloads() -> dict[str, list[list[int]]]:
    """Each workload's batches, as the real lengths of their rows."""
    from attnfuse.models import minilm

    varlen = minilm.padded_batch(32, 128)["attention_mask"].sum(1).tolist()
    texts = sorted(minilm.sentence_mix(256), key=len, reverse=True)  # as sentence-transformers orders them
    encode = [minilm.tokenize(texts[i:i + 32], max_length=256)["attention_mask"].sum(1).tolist()
              for i in range(0, len(texts), 32)]
    return {"varlen 32 x [8, 128]": [varlen], "encode 256 sentences, batch 32": encode}


def equal_buckets(count: int):
    def buckets(lengths: list[int]) -> list[list[int]]:
        order = sorted((i for i, n in enumerate(lengths) if n), key=lengths.__getitem__)
        size = -(-len(order) // count)
        return [order[i:i + size] for i in range(0, len(order), size)]
    return buckets


def groupings() -> dict[str, object]:
    from attnfuse.kernels import ops, reference

    return {
        "per sequence": lambda lengths: [[i] for i, n in enumerate(lengths) if n],
        "one padded call": equal_buckets(1),
        **{f"{k} equal buckets": equal_buckets(k) for k in (4, 8)},
        **{f"waste <= {n}^2": functools.partial(ops.length_buckets, call_cost=n * n) for n in (32, 64, 128, 181)},
    }


def measure(threads: int, repeats: int) -> dict[str, dict[str, float]]:
    """{workload: {grouping: median ms}} in this process (its wait policy)."""
    import torch

    from attnfuse.kernels import ops, reference
    from attnfuse.tools.timing import interleaved_medians

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    results = {}
    for workload, batches in workloads().items():
        calls = []
        for lengths in batches:
            mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
            q, k, v = (torch.randn(sum(lengths), HEADS * HEAD_SIZE, generator=generator) for _ in range(3))
            calls.append((q, k, v, reference.token_indices(mask), mask))

        def run(buckets, calls=calls):
            with torch.inference_mode():
                for _ in range(LAYERS):
                    for q, k, v, indices, mask in calls:
                        ops._packed_attention(q, k, v, indices, mask, None, HEADS, HEAD_SIZE ** -0.5, False,
                                              buckets=buckets)
        times = interleaved_medians({name: (lambda b=b: run(b)) for name, b in groupings().items()}, repeats)
        results[workload] = {name: t * 1e3 for name, t in times.items()}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one measurement, in this process
    options = parser.parse_args()
    if options.child:
        print(json.dumps(measure(options.child, options.repeats)))
        return 0
    print(f"{' '.join(sys.argv)}: load average {os.getloadavg()[0]:.1f} before, on {os.cpu_count()} cores")
    for threads in map(int, options.threads.split(",")):
        columns = {policy: child(policy, threads, options.repeats) for policy in POLICIES}
        for workload in columns[POLICIES[0]]:
            print(f"\n{workload}, {threads} thread(s), {LAYERS} layers' calls, median ms "
                  f"(load average {os.getloadavg()[0]:.1f})")
            print(f"{'grouping':<18}" + "".join(f"{f'OMP {p}':>14}" for p in POLICIES))
            for grouping in columns[POLICIES[0]][workload]:
                print(f"{grouping:<18}" + "".join(f"{columns[p][workload][grouping]:>14.2f}" for p in POLICIES))
    return 0


def child(policy: str, threads: int, repeats: int) -> dict:
    env = {name: value for name, value in os.environ.items() if name != "OMP_WAIT_POLICY"}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    command = [sys.executable, __file__, "--child", str(threads), "--repeats", str(repeats)]
    return json.loads(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)


if __name__ == "__main__":
    sys.exit(main())
