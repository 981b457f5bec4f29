"""attnfuse.optimize against torch eager and torch.compile on the real MiniLM, run the way people run it (CPU).

Two workloads, each timed in one process, interleaved, median of --repeats:
- `AutoModel.from_pretrained` (BertModel with its pooler) on batch 32, lengths uniform
  in [8, 128] (the batch of `attnfuse bench`), optimized from one unpadded sentence;
  outputs checked against eager (last_hidden_state at real tokens, pooler_output whole);
- `SentenceTransformer.encode` on --sentences texts (default 256) of one to three of the demo's sentences
  each (minilm.sentence_mix: a few tokens to beyond 128), batch_size 32
  (sentence-transformers' own sorting, padding and pooling); embeddings checked by cosine.
  The CPU runtimes users deploy instead (--peers; attnfuse/tools/encoder_peers.py: OpenVINO f32 and at its
  own precision under both hints, CTranslate2 f32 and int8) run the same encode, the model's own tokenizer
  and pooling around their runtime, in the same rounds; each is also checked against torch at real tokens
  on the sentences as one batch, at its precision's tolerance (attnfuse.tools.bench.TOLERANCES). With
  OpenVINO among them, attnfuse's file for it (`--target openvino`, as `attnfuse bench` builds it) runs the
  same encode in OpenVINO at f32 and bf16: attnfuse's forms beside `optimize(model)`.
torch.compile(dynamic=True) is applied to the same module attnfuse optimizes.

    python benchmarks/torch_frontend.py [--repeats 7] [--threads 2] [--no-compile] [--sentences 256]
                                        [--peers all|none|openvino,...]

sentence-transformers' own `backend="openvino"` is not among the peers: it needs optimum-intel, which pins
transformers < 5.6 (this project's environment has 5.x newer than that) and pulls PyPI's torchvision, which does
not load beside the CPU torch; it runs the same OpenVINO runtime as the OpenVINO peer.

OpenMP's idle threads wait passively (OMP_WAIT_POLICY=PASSIVE unless the environment
says otherwise), as the ONNX Runtime sessions of `attnfuse bench` stop spinning: on
a machine shared with other work, threads that spin between parallel regions take
the cores the working thread needs, and the contender with the most short regions loses
most (benchmarks/packed_attention.py: attnfuse's packed attention one sequence at a time ran 26x slower
under the default policy than under PASSIVE on this loaded machine; in length buckets it makes fewer regions).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch's OpenMP loads: before importing torch

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import attnfuse  # noqa: E402
from attnfuse.models import minilm  # noqa: E402
from attnfuse.tools import bench, bench_command, encoder_peers  # noqa: E402
from attnfuse.tools.demo import (  # noqa: E402
    ATTNFUSE, EAGER, auto_model_comparison, sentence_transformer_comparison, speedup_table,
)

RESULTS = Path(__file__).parent / "results"
COMMAND = "python benchmarks/torch_frontend.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build)")
    parser.add_argument("--sentences", type=int, default=256,
                        help="encode this many texts of one to three of the demo's sentences (minilm.sentence_mix)")
    parser.add_argument("--peers", type=bench_command.peer_list, default=bench_command.peer_list("all"), metavar="LIST",
                        help="runtime peers of the encode workload: openvino, ctranslate2, all or none (default all)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    batch = {name: torch.from_numpy(array) for name, array in minilm.padded_batch(32, 128).items()}
    load_before = os.getloadavg()[0]
    peers = encode_peers(options.peers, options.threads)
    comparisons = [
        auto_model_comparison(minilm, batch, options.repeats, not options.no_compile),
        sentence_transformer_comparison(minilm, options.repeats, not options.no_compile,
                                        peers={c.key: encoder_peers.with_peer(peers.sentence_model, c.run)
                                               for c in peers.built},
                                        sentences=minilm.sentence_mix(options.sentences)),
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
    encode = encode_records(comparisons[1], peers)
    print(peers.summary())
    print(bench.summary_table(encode))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "torch_frontend.json").write_text(json.dumps({
        "threads": options.threads, "repeats": options.repeats, "load": load,
        "workloads": [{"title": c.title, "median_ms": {n: t * 1000 for n, t in c.times.items()},
                       "agreement": c.agreement, "fused_ops": c.report.fused_ops} for c in comparisons],
        "encode_records": encode,
    }, indent=1))
    return 0 if all(c.ok for c in comparisons) else 2


@dataclasses.dataclass
class EncodePeers:
    sentence_model: object  # the SentenceTransformer whose tokenizer and pooling the peers run inside
    built: list[bench.Contender]
    missing: list[bench.Contender]  # not installed, or failed to build: the reason in .error
    errors: dict[str, float]  # by key: max relative error against torch at real tokens, the sentences as one batch

    def summary(self) -> str:
        checked = [f"{c.key} {self.errors[c.key]:.1e}{'' if correct(c, self.errors[c.key]) else ' WRONG'}"
                   for c in self.built]
        lines = [f"runtime peers' last_hidden_state against torch at real tokens, the {len(minilm.SENTENCES)} sentences "
                 f"as one batch (max relative error): {'; '.join(checked) or 'none'}"]
        lines += [f"{c.name}: {c.error}" for c in self.missing]
        return "\n".join(lines)


def correct(contender: bench.Contender, error: float) -> bool:
    return error <= bench.TOLERANCES[contender.precision]


def encode_peers(runtimes: list[str], threads: int) -> EncodePeers:
    """The runtime peers, built from MiniLM as `attnfuse bench` builds them (with OpenVINO, attnfuse's file for
    it too), and checked once."""
    torch_model = minilm.load_torch("sdpa")
    contenders = encoder_peers.peer_contenders(runtimes, torch_model, encoder_peers.transformers_folder(minilm, torch_model),
                                               minilm.padded_batch(2, 16, seed=1), threads)
    if "openvino" in runtimes:
        contenders += encoder_peers.attnfuse_openvino(bench.model_specs("minilm", quick=False)[0], threads, lambda _: None)
    contenders.append(attnfuse_onnx(threads))
    feeds = minilm.tokenize(minilm.SENTENCES)
    expected = bench.torch_runner(torch_model)(feeds)
    real = [feeds["attention_mask"][:, :, None].astype(bool)]
    built = [c for c in contenders if c.run is not None]
    errors = {c.key: bench.max_relative_error(c.run(feeds), expected, real) for c in built}
    return EncodePeers(minilm.load_sentence_transformer(), built, [c for c in contenders if c.run is None], errors)


def attnfuse_onnx(threads: int) -> bench.Contender:
    """attnfuse's ONNX file (the default target, padding-free) in ONNX Runtime: what `optimize(model)` is held to."""
    result = attnfuse.optimize_onnx(str(minilm.exported()))
    return bench.Contender("attnfuse (ONNX Runtime)", bench.ort_runner(result.proto, threads),
                           attention=f"{result.report.attention_fused}/{result.report.attention_total}")


def encode_records(comparison, peers: EncodePeers) -> list[dict]:
    """bench's records for the encode contenders, one per contender (the faster of OpenVINO's hints), so that
    bench's speedups and summary hold attnfuse's forms (optimize(model); its file for OpenVINO) to the fastest
    correct peers; torch eager and torch.compile are f32 peers, checked by their embeddings' cosine."""
    by_key = {c.key: c for c in peers.built}
    records = []
    for key, seconds in comparison.times.items():
        built = by_key.get(key) or bench.Contender(bench.TORCH if key == EAGER else key, peer=key != ATTNFUSE)
        error = peers.errors.get(key)
        records.append(dict(
            model="MiniLM-L6", workload="encode", padding=None, contender=built.name, setting=built.setting or None,
            peer=built.peer, median_ms=seconds * 1e3, precision=built.precision, max_rel_error=error,
            correct=error is None or correct(built, error), min_cosine=comparison.cosines.get(key)))
    records = bench.keep_faster_setting(records)
    bench.add_speedups(records)
    return records


if __name__ == "__main__":
    sys.exit(main())
