"""CTranslate2 int8 at its fastest, beside attnfuse's int8 file for OpenVINO at bf16: all-MiniLM-L6-v2 on the
bench's varlen batch (32 rows of 8..128 tokens).

    python benchmarks/peers/int8_alone.py [--repeats 9] [--threads 2]

`attnfuse bench` runs every contender in one process, interleaved; there CTranslate2 int8 took 114 to 227 ms
on this batch, its time depending on the state of its process (one cause found: an Encoder freed before another
first runs leaves that one 1.5x slower). Here it runs first, alone in a fresh process (its median over
--repeats runs after warm-ups), then interleaved with attnfuse's file (`--target openvino
--precision bf16 --quantize int8`, compiled at bf16 as the bench compiles it); the figure held against
attnfuse is CTranslate2's faster median of the two. Min cosine of the sentence embeddings against torch fp32 for
both, computed after the timing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

WARMUPS = 3


def alone_ms(run, repeats: int) -> float:
    for _ in range(WARMUPS):
        run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from attnfuse.optimizer import openvino_run
    from attnfuse.tools import encoder_peers

    missing = [name for name in ("ctranslate2", "openvino") if not encoder_peers.installed(name)]
    if missing or not openvino_run.has_bf16():
        parser.error(f"needs {' and '.join(missing) or 'a CPU with bf16'} (bash benchmarks/peers/install_encoder_peers.sh)")

    import attnfuse
    from attnfuse.models import minilm
    from attnfuse.tools.bench import model_specs, sentence_cosine, torch_runner
    from attnfuse.tools.timing import interleaved_medians

    feeds = minilm.padded_batch(32, 128, seed=0)
    # Both of the bench's CTranslate2 Encoders kept alive: freeing the f32 one before the int8 one first ran left
    # the int8 one at 190-200 ms a batch here, against 120-130 ms
    contenders = encoder_peers.ctranslate2_contenders(encoder_peers.transformers_folder(minilm, None), args.threads)
    ctranslate2 = next(c for c in contenders if c.precision == "int8")
    ct2_alone = alone_ms(lambda: ctranslate2.run(feeds), args.repeats)

    spec = model_specs("minilm", False)[0]
    mine = attnfuse.optimize_onnx(str(spec.exported(dynamo=True, attention="sdpa")), target="openvino",
                                  precision="bf16", quantize="int8")
    import openvino as ov

    model = ov.Core().read_model(mine.proto.SerializeToString(), b"")
    (_, precision, _, attnfuse_run), = encoder_peers.openvino_runners(model, args.threads, ("bf16",))[:1]
    runners = {"CTranslate2 int8": lambda: ctranslate2.run(feeds), "attnfuse int8 (OpenVINO bf16)": lambda: attnfuse_run(feeds)}
    together = {name: seconds * 1e3 for name, seconds in
                interleaved_medians(runners, args.repeats, warmup=WARMUPS, desc="interleaved").items()}

    cosine, expected = sentence_cosine(feeds["attention_mask"]), torch_runner(minilm.load_torch("sdpa"))(feeds)
    cosines = {"CTranslate2 int8": cosine(ctranslate2.run(feeds), expected),
               "attnfuse int8 (OpenVINO bf16)": cosine(attnfuse_run(feeds), expected)}
    fastest_ct2 = min(ct2_alone, together["CTranslate2 int8"])
    mine_ms = together["attnfuse int8 (OpenVINO bf16)"]
    print(f"all-MiniLM-L6-v2, varlen 32 x 8..128, {args.threads} threads, median of {args.repeats} (ms; min cosine "
          f"against torch fp32); OpenVINO computing in {precision}")
    print(f"CTranslate2 int8: alone first {ct2_alone:.1f}, interleaved {together['CTranslate2 int8']:.1f} "
          f"(cos {cosines['CTranslate2 int8']:.5f})")
    print(f"attnfuse int8 (OpenVINO bf16): interleaved {mine_ms:.1f} (cos {cosines['attnfuse int8 (OpenVINO bf16)']:.5f})")
    print(f"attnfuse against CTranslate2's faster time: {fastest_ct2 / mine_ms:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
