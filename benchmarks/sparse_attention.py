"""Windowed and linear attention against exact fused attention on long sequences (CPU).

A 1-layer encoder (hidden 128, 2 heads, random weights), batch 1, in ONNX Runtime
with 2 threads: exact fused attention (MultiHeadAttention), `window=256` and
`performer=128`, at 2048, 4096 and 8192 tokens. Time is the median of interleaved
runs; peak memory is each model's own process's maximum resident set. Then the
real MiniLM: how close windowed and Performer attention keep its sentence
embeddings to exact ones.

    python benchmarks/sparse_attention.py [--lengths 2048 4096 8192] [--repeats 11]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import attnfuse
from attnfuse.tools.memory import ort_peak_memory_mb
from attnfuse.tools.timing import interleaved_medians, ort_session, table

MODES = ("exact", "window=256", "performer=128")
RESULTS = Path(__file__).parent / "results"


def long_inputs(length: int, vocab: int = 256) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(1, vocab, (1, length))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def optimized_models(path: str) -> dict[str, bytes]:
    # Verification runs on short check inputs; the long runs below are what is measured.
    return {mode: attnfuse.optimize_onnx(path, attention=mode).proto.SerializeToString() for mode in MODES}


def long_sequences(lengths: list[int], repeats: int, threads: int, workdir: Path) -> list[dict]:
    from attnfuse.models import sparse

    models = optimized_models(str(sparse.exported("long_encoder")))
    files = {}
    for mode, blob in models.items():
        files[mode] = workdir / f"long-{mode.replace('=', '-')}.onnx"
        files[mode].write_bytes(blob)
    rows = []
    for length in lengths:
        feeds = long_inputs(length)
        sessions = {mode: ort_session(blob, threads) for mode, blob in models.items()}
        times = interleaved_medians({m: (lambda s=s: s.run(None, feeds)) for m, s in sessions.items()},
                                    repeats, desc=f"{length} tokens")
        exact = sessions["exact"].run(None, feeds)[0]
        for mode, seconds in times.items():
            got = sessions[mode].run(None, feeds)[0]
            rows.append({
                "length": length, "mode": mode, "seconds": seconds,
                "speedup_vs_exact": times["exact"] / seconds,
                "peak_mb": ort_peak_memory_mb(files[mode], feeds, threads),
                "max_rel_error": float(np.abs(got - exact).max() / np.abs(exact).max()),
            })
    return rows


def growth(rows: list[dict], mode: str, short: int, long: int) -> float:
    seconds = {r["length"]: r["seconds"] for r in rows if r["mode"] == mode}
    return seconds[long] / seconds[short]


def minilm_embeddings(windows=(16, 32, 64), features=(64, 128, 256)) -> list[dict]:
    """Mean cosine similarity of sentence embeddings, approximate vs exact attention."""
    from attnfuse.models import minilm

    path = str(minilm.exported())
    feeds = minilm.tokenize(minilm.SENTENCES)
    exact = ort_session(path, 2).run(None, feeds)[0]
    reference = minilm.sentence_embeddings(exact, feeds["attention_mask"])
    rows = []
    for mode in [f"window={w}" for w in windows] + [f"performer={f}" for f in features]:
        model = attnfuse.optimize_onnx(path, attention=mode, padding_free=False).proto.SerializeToString()
        got = minilm.sentence_embeddings(ort_session(model, 2).run(None, feeds)[0], feeds["attention_mask"])
        cosine = (reference * got).sum(-1) / (np.linalg.norm(reference, axis=-1) * np.linalg.norm(got, axis=-1))
        rows.append({"mode": mode, "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min())})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for mode in MODES:
        points = sorted((r["length"], r["seconds"]) for r in rows if r["mode"] == mode)
        axis.plot(*zip(*points), marker="o", label=mode)
    axis.set_xlabel("sequence length (tokens)")
    axis.set_ylabel("median seconds (1 layer, batch 1)")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_title("Attention on a long sequence, ONNX Runtime CPU, 2 threads")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as workdir:
        rows = long_sequences(args.lengths, args.repeats, args.threads, Path(workdir))
    print(table(["tokens", "attention", "median s", "vs exact", "peak MB", "max rel error"],
                [[r["length"], r["mode"], f"{r['seconds']:.3f}", f"{r['speedup_vs_exact']:.2f}x",
                  f"{r['peak_mb']:.0f}", f"{r['max_rel_error']:.2g}"] for r in rows]))
    short, long = args.lengths[-2:] if len(args.lengths) > 1 else (args.lengths[0],) * 2
    growths = {mode: growth(rows, mode, short, long) for mode in MODES}
    print(f"time growth {short} -> {long} tokens: " + ", ".join(f"{m} {g:.2f}x" for m, g in growths.items()))
    plot(rows, args.out / "sparse_attention.png")
    result = {"long_sequences": rows, "growth": growths}
    if not args.skip_minilm:
        embeddings = minilm_embeddings()
        print(table(["MiniLM attention", "mean cosine", "min cosine"],
                    [[r["mode"], f"{r['mean_cosine']:.5f}", f"{r['min_cosine']:.5f}"] for r in embeddings]))
        result["minilm"] = embeddings
    (args.out / "sparse_attention.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'sparse_attention.json'} and {args.out / 'sparse_attention.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
