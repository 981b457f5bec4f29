"""The benchmark Llama exported at opset 23 (ONNX's Attention, RMSNormalization, RotaryEmbedding) and at
opset 18, each optimized by attnfuse: its fused ops, and ONNX Runtime's median ms on the bench's prefill
and decode steps, interleaved (2 threads, median of 5).

    python benchmarks/opset23_llama.py   (the opset-23 export is kept in the export cache)
"""
from __future__ import annotations

import attnfuse
from attnfuse.models._export import cached
from attnfuse.models.decoders import wrappers
from attnfuse.models.decoders.bench import (
    BENCH_VERSION, bench_family, bench_inputs, decode_step, llama_bench_model, llama_bench_torch, prefill_step,
)
from attnfuse.models.decoders.cases import export_wrapped
from attnfuse.tools.timing import interleaved_medians, ort_session


def main() -> None:
    opset23 = cached(f"llama-bench-dynamo-sdpa-past-opset23-{BENCH_VERSION}-{bench_family().fingerprint}",
                     lambda tmp: export_wrapped(llama_bench_torch(), wrappers.PAST_MODE, tmp, dynamo=True, opset=23))
    sessions = {}
    for opset, path in (("opset 18", llama_bench_model()[wrappers.PAST_MODE]), ("opset 23", opset23)):
        result = attnfuse.optimize_onnx(str(path))
        print(f"{opset}: {dict(result.report.fused_ops)}, {'verified' if result.report.verify.ok else 'NOT verified'}")
        sessions[opset] = ort_session(result.proto, 2)
    for workload, step in (("prefill", prefill_step()), ("decode", decode_step())):
        feeds = {name: tensor.numpy() for name, tensor in bench_inputs(step).items()}
        runs = {opset: (lambda s=s: s.run(None, {i.name: feeds[i.name] for i in s.get_inputs()}))
                for opset, s in sessions.items()}
        medians = interleaved_medians(runs, repeats=5, warmup=1, desc=workload)
        print(f"{workload}: " + "; ".join(f"{opset} {ms * 1e3:.1f} ms" for opset, ms in medians.items()))


if __name__ == "__main__":
    main()
