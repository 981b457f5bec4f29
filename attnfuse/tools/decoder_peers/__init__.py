"""The runtimes people deploy a Llama-style decoder with on a CPU, as contenders of `attnfuse bench
--model llama`: onnxruntime-genai (its model builder, fp32) and CTranslate2 (its converter, float32),
each built from the benchmark model's transformers folder (models.decoders.bench.transformers_folder).

Unlike the ONNX contenders they take their own inputs and keep their own KV cache:
  prefill   the prompts' forward (genai: right padded; CTranslate2: unpadded lists), its logits
            checked against torch's at the real tokens;
  decode    one step of a batch whose prompts have the decode workload's row lengths, the
            prompts' forward and the first token taken once, untimed; judged by its greedy tokens;
  generate  N greedy tokens from the prefill prompts, which must equal torch's.
A peer that is not installed (benchmarks/peers/install_decoder_peers.sh) is a contender with that
reason, never a crash. Modules: prompts (layouts), genai and ct2 (each runtime, importable
without attnfuse), generation (end to end), peers (the registry and the timing alongside bench's).
"""
