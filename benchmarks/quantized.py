"""Quantized all-MiniLM-L6-v2: where `--quantize int8` quantizes, and what tells a correct rewrite of a
quantized model from a wrong one. The figures of README "Quantized models".

1. The quantize point. A: `optimize_onnx(export, quantize="int8")` (the export quantized, then optimized and
   verified against the quantized export); B: `optimize_onnx(export)`, then quantize_dynamic of its output with
   EnableSubgraph (the same settings: QInt8 per channel, MatMuls). Their quantized MatMuls per graph, the
   seconds each takes to make, their median ms on the bench's varlen and full batches (interleaved) and the
   min cosine of their sentence embeddings against torch's fp32; and A's weights per tensor, for the cosine.
2. Verification. O = quantize_dynamic(export) (per channel, as a user quantizes), R = attnfuse's rewrite of O,
   and wrong rewrites of R (one bias dropped, one weight's scale x1.1, in the graph a padded batch runs):
   each one's max relative error against O directly and between the twins (optimizer/twin.py), over the
   verifier's check inputs.
3. For OpenVINO (`--target openvino --quantize int8`): attnfuse's f32 file for OpenVINO with its weights in int8
   per output channel (what OpenVINO's own int8 weight compression writes) and in blocks of 128, 64 and 32 along
   K, each run by OpenVINO at f32 and bf16 with its int8 activations (its default), and per channel with float
   activations (DYNAMIC_QUANTIZATION_GROUP_SIZE 0); per channel widened by a Cast and scaled after the product
   (`weights_int8_widened`, what attnfuse writes for bf16) and the float file, at bf16: median ms on the varlen
   and full batches (interleaved) and min cosine against torch's fp32. Needs OpenVINO (skipped without it, or
   with --no-openvino).
4. A statically quantized model: S = quantize_static(export) as users call it (QDQ, int8 weights per channel,
   uint8 activations, calibrated on 4 batches of the real text cut at other places than the measured batch),
   and attnfuse's output for S (activation quantization kept only before the int8 MatMuls,
   passes/onnx/activation_qdq.py): attention fused, median ms on the varlen and full batches (interleaved, ONNX
   Runtime) and min cosine against torch's fp32.

    python -m benchmarks.quantized [--repeats N] [--no-openvino] [--parts 1,2,3,4]   (from the repository root)
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnx
import onnx_ir as ir

import attnfuse
from attnfuse.models import minilm
from attnfuse.optimizer.inputs import InputPlan
from attnfuse.optimizer.io import load_model, session
from attnfuse.optimizer.probe import probe_cases
from attnfuse.optimizer.twin import twin
from attnfuse.optimizer.verify import CHECK_CASES, compare
from attnfuse.passes.onnx import quantized
from attnfuse.passes.onnx.graph import graphs_in_order, nodes_on_one_path
from attnfuse.tools.bench import ort_runner, sentence_cosine, torch_runner, with_lengths
from attnfuse.tools.bench_int8 import quantize_dynamic
from attnfuse.tools.timing import interleaved_medians


def timed(make):
    start = time.perf_counter()
    made = make()
    return made, time.perf_counter() - start


def per_graph(model: onnx.ModelProto) -> list[int]:
    counts = [quantized.count_matmuls(list(graph)).total_quantized for graph, _ in graphs_in_order(ir.from_proto(model).graph)]
    return [count for count in counts if count]


def on_the_bench_batches(runners: dict, repeats: int, label: str) -> None:
    """Each runner's median ms on the bench's varlen and full batches (interleaved) and min sentence cosine
    against torch's fp32, one line per batch."""
    torch_model = minilm.load_torch("sdpa")
    varlen = minilm.padded_batch(32, 128, seed=0)
    for load, feeds in {"varlen": varlen, "full": with_lengths(varlen, np.full(32, 128), 128)}.items():
        cosine = sentence_cosine(feeds["attention_mask"])
        expected = torch_runner(torch_model)(feeds)
        cosines = {name: cosine(run(feeds), expected) for name, run in runners.items()}
        medians = interleaved_medians({name: (lambda run=run: run(feeds)) for name, run in runners.items()}, repeats,
                                      warmup=2, desc=f"{label}, {load}")
        print(f"{label}, {load}: " + "; ".join(
            f"{name} {medians[name] * 1e3:.0f} ms, min cosine {cosines[name]:.5f}" for name in runners))


def quantize_point(export: str, repeats: int) -> None:
    a, a_seconds = timed(lambda: attnfuse.optimize_onnx(export, quantize="int8").proto)
    fp32, fp32_seconds = timed(lambda: attnfuse.optimize_onnx(export).proto)
    b, b_seconds = timed(lambda: quantize_dynamic(fp32, True, op_types_to_quantize=["MatMul"],
                                                  extra_options={"EnableSubgraph": True}))
    _, original_seconds = timed(lambda: quantize_dynamic(onnx.load(export), True, op_types_to_quantize=["MatMul"]))
    per_tensor = attnfuse.optimize_onnx(quantize_dynamic(onnx.load(export), False, op_types_to_quantize=["MatMul"])).proto
    print(f"A quantize, then optimize: quantized MatMuls per graph {per_graph(a)}, made in {a_seconds:.1f} s "
          f"(quantizing, probing, rewriting, checking by the twins)")
    print(f"B optimize, then quantize: quantized MatMuls per graph {per_graph(b)}, made in {fp32_seconds:.1f} + "
          f"{b_seconds:.1f} s, and {original_seconds:.1f} s more to quantize the original its check would compare with")
    print(f"A and B write the same ops: {sorted(op_types(a)) == sorted(op_types(b))}")
    models = {"A": a, "B": b, "A per tensor": per_tensor}
    on_the_bench_batches({name: ort_runner(model, 2) for name, model in models.items()}, repeats, "quantize point")


def openvino_blocks(export: str, repeats: int) -> None:
    import openvino as ov

    from attnfuse.optimizer.io import to_proto
    from attnfuse.optimizer.quantize import weights_int8, weights_int8_widened
    from attnfuse.tools.encoder_peers import openvino_latency_runner

    fp32 = attnfuse.optimize_onnx(export, target="openvino", verify=False).model
    blocks = {"per channel": None, "blocks of 128": 128, "blocks of 64": 64, "blocks of 32": 32}
    models = {name: to_proto(weights_int8(fp32.clone(), block)).SerializeToString() for name, block in blocks.items()}
    core, runners = ov.Core(), {}
    for precision in ("f32", "bf16"):
        for name, model in models.items():
            compiled = core.compile_model(core.read_model(model, b""), "CPU", {
                "INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": precision})
            runners[f"{name}, {precision}"] = openvino_latency_runner(compiled)
    compiled = core.compile_model(core.read_model(models["per channel"], b""), "CPU", {
        "INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})
    runners["per channel, f32, float activations"] = openvino_latency_runner(compiled)
    at_bf16 = {"per channel widened": weights_int8_widened(fp32.clone()), "float weights": fp32}
    for name, model in at_bf16.items():
        compiled = core.compile_model(core.read_model(to_proto(model).SerializeToString(), b""), "CPU", {
            "INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "bf16"})
        runners[f"{name}, bf16"] = openvino_latency_runner(compiled)
    on_the_bench_batches(runners, repeats, "OpenVINO int8 weights")


def static_qdq(export: str, repeats: int) -> None:
    import logging
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Text(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([minilm.padded_batch(16, 128, seed=seed) for seed in range(1, 5)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "static.onnx")
        logging.disable(logging.WARNING)  # its advice to pre-process
        quantize_static(export, path, Text(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        logging.disable(logging.NOTSET)
        result = attnfuse.optimize_onnx(path, reference=export)
        models = {"quantize_static": onnx.load(path), "attnfuse": result.proto}
    report = result.report
    print(f"static QDQ: attention fused {report.attention_fused}/{report.attention_total}, fused ops "
          f"{report.fused_ops}, quantized MatMuls {report.quantized_matmuls}; {report.verify.message}")
    on_the_bench_batches({name: ort_runner(model, 2) for name, model in models.items()}, repeats, "static QDQ")


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for graph, _ in graphs_in_order(ir.from_proto(model).graph) for node in graph]


def wrong(rewrite: ir.Model, name_end: str, factor: float) -> ir.Model:
    """The rewrite with the initializer whose name ends with `name_end` scaled by `factor` (0: dropped)."""
    copy = rewrite.clone()
    value = next(v for name, v in copy.graph.initializers.items() if name.endswith(name_end))
    value.const_value = ir.tensor(value.const_value.numpy() * np.float32(factor))
    return copy


def last_weight_scale(rewrite: ir.Model) -> str:
    """The name of the weight scale of the last quantized MatMul a padded batch runs (quantize_dynamic names
    a weight's scale after the weight: W_quantized, W_scale)."""
    last = [node for node in nodes_on_one_path(rewrite.graph) if quantized.quantized(node) is quantized.MATMUL_INTEGER]
    return last[-1].inputs[1].name.removesuffix("_quantized") + "_scale"


def verification(export: str) -> None:
    quantized_export = quantize_dynamic(onnx.load(export), True)
    original, rewrite = load_model(quantized_export), attnfuse.optimize_onnx(quantized_export).model
    candidates = {"R, attnfuse's rewrite": rewrite,
                  "R with layer 2's attention output bias dropped": wrong(rewrite, "layer.2.attention.output.dense.bias", 0),
                  "R with layer 4's intermediate bias dropped": wrong(rewrite, "layer.4.intermediate.dense.bias", 0),
                  "R with its last MatMul's weight scale x1.1": wrong(rewrite, last_weight_scale(rewrite), 1.1)}
    plan = InputPlan(original)
    sets = [plan.make(case, seed) for seed, case in enumerate([*probe_cases(plan), *CHECK_CASES])]
    names = [value.name for value in original.graph.outputs]

    def outputs(model: ir.Model) -> list[dict[str, np.ndarray]]:
        runner = session(model)
        return [dict(zip(names, runner.run(names, inputs.feeds))) for inputs in sets]

    def worst(reference, candidate) -> float:
        return max(compare(r, c, inputs.real)[1] for inputs, r, c in zip(sets, reference, candidate))

    o, o_twin = outputs(original), outputs(twin(original))
    print(f"O against its twin: {worst(o, o_twin):.3g} (what quantizing activations moves O by)")
    for label, model in candidates.items():
        print(f"{label}: against O {worst(o, outputs(model)):.3g}, twins {worst(o_twin, outputs(twin(model))):.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-openvino", action="store_true", help="skip part 3")
    parser.add_argument("--parts", default="1,2,3,4", help="the parts to run, e.g. 4")
    args = parser.parse_args()
    parts = {int(part) for part in args.parts.split(",")}
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    export = str(minilm.exported(dynamo=True, attention="sdpa"))
    print(os.popen("uptime").read().strip())
    if 1 in parts:
        quantize_point(export, args.repeats)
    if 2 in parts:
        verification(export)
    from attnfuse.optimizer import openvino_run

    if 3 in parts and openvino_run.installed() and not args.no_openvino:
        openvino_blocks(export, args.repeats)
    if 4 in parts:
        static_qdq(export, args.repeats)
    print(os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()
