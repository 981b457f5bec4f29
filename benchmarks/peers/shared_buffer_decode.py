"""What a decode step of attnfuse's file costs when its past and present share one buffer, as
onnxruntime-genai's runtime keeps its cache, against the step as Optimum runs it and genai's own step,
in one interleaved run (2 threads, median of 15).

The file keeps Optimum's inputs and outputs (past_key_values.N in, present.N out); ONNX Runtime's
GroupQueryAttention appends in place when its past and present are the same buffer, so a caller that binds
both to one [batch, kv heads, max length, head size] OrtValue (IO binding) skips copying the cache every
step. The file is attnfuse's output for the bench Llama without padding-free (its GroupQueryAttention must sit
in the main graph to see the bound buffers: an If branch's outputs are the branch's own). Prints the logits'
difference between the two ways (0: the same numbers) and the three medians.

    python benchmarks/peers/shared_buffer_decode.py   (onnxruntime-genai from install_decoder_peers.sh)
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

import attnfuse
from attnfuse.models.decoders import wrappers
from attnfuse.models.decoders.bench import bench_inputs, decode_step, llama_bench_model
from attnfuse.tools.bench_decoder import decoder_bench, decoder_workloads, peer_prompts
from attnfuse.tools.decoder_peers import peers
from attnfuse.tools.timing import interleaved_medians

REPEATS, MAX_LENGTH = 15, 1024


def main() -> None:
    model = attnfuse.optimize_onnx(str(llama_bench_model()[wrappers.PAST_MODE]), padding_free=False).proto
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {name: tensor.numpy() for name, tensor in bench_inputs(decode_step()).items()}
    names = [i.name for i in session.get_inputs()]
    pasts = [name for name in names if name.startswith("past_key_values.")]
    expected = session.run(["logits"], {name: feeds[name] for name in names})[0]

    length = feeds[pasts[0]].shape[2]
    buffers = {}
    for name in pasts:  # [B, kv heads, MAX_LENGTH, head size], the past in its first `length` positions
        shared = np.zeros((*feeds[name].shape[:2], MAX_LENGTH, feeds[name].shape[3]), np.float32)
        shared[:, :, :length] = feeds[name]
        buffers[name] = ort.OrtValue.ortvalue_from_numpy(shared)
    logits = ort.OrtValue.ortvalue_from_shape_and_type(expected.shape, np.float32)
    others = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[name]))
              for name in names if name not in buffers}

    def shared_step() -> None:  # writes position `length` of each buffer: the same work every call
        binding = session.io_binding()
        for name, value in others.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in buffers.items():
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        binding.bind_ortvalue_output("logits", logits)
        session.run_with_iobinding(binding)

    shared_step()
    print(f"logits, shared buffer against the plain run: max difference {np.abs(logits.numpy() - expected).max():.3g}")
    runs = {"attnfuse's file as Optimum runs it": lambda: session.run(None, {name: feeds[name] for name in names}),
            "attnfuse's file, past and present one buffer": shared_step}
    genai = next(peer for peer in peers.runtime_peers() if peer.name == "onnxruntime-genai")
    if genai.missing() is None:
        bench = decoder_bench()
        step = genai.open(genai.built(bench.folder()), 2).decode(
            peer_prompts(bench, decoder_workloads(bench)[1]), REPEATS + 10)
        runs["onnxruntime-genai's step"] = step.run
    medians = interleaved_medians(runs, repeats=REPEATS, warmup=2, desc="decode step")
    for name, seconds in medians.items():
        print(f"{name}: {seconds * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
