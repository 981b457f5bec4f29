"""The CPU runtimes a user would deploy instead of attnfuse for an encoder, run the way their users run them,
as contenders of `attnfuse bench` (and, through with_peer, of benchmarks/torch_frontend.py's encode):

- OpenVINO: `ov.convert_model` on the torch model (read straight from torch, it ran 1.12-1.18x faster here than
  the same model read from the bench's dynamo ONNX export), compiled for the CPU with INFERENCE_NUM_THREADS set
  to --threads, at f32 (INFERENCE_PRECISION_HINT) and at the precision OpenVINO picks by itself (bf16 on a CPU
  with AVX512_BF16 or AMX), each with PERFORMANCE_HINT LATENCY (one request runs the batch) and THROUGHPUT (the
  batch split across the requests OpenVINO asks for, run at once, as its documentation says to use that hint).
  The bench keeps the faster hint of each precision.
- CTranslate2: the transformers model folder converted by TransformersConverter, an Encoder on the CPU with
  intra_threads=--threads at compute_type float32 and int8; forward_batch takes each row's real tokens, unpadded.
- OpenVINO int8 (with `attnfuse bench`'s int8 rows): the dynamo export with int8 weights, one scale per output
  channel, what OpenVINO's own int8 weight compression writes (nncf.compress_weights, `optimum-cli export openvino
  --weight-format int8`; symmetric here), OpenVINO quantizing the activations at run time as it does by default.

A runtime that is not installed is one contender whose error says so (bench.NOT_INSTALLED), never a crash.
"""
from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from attnfuse.tools.bench import NOT_INSTALLED, Contender, ModelSpec, Runner

RUNTIMES = {"openvino": "OpenVINO", "ctranslate2": "CTranslate2"}  # --peers name -> the name in tables
OPENVINO_HINTS = ("LATENCY", "THROUGHPUT")
CTRANSLATE2_TYPES = {"f32": "float32", "int8": "int8"}  # our precision -> its compute_type
OPENVINO_PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16"}  # its element type's name -> ours


def installed(runtime: str) -> bool:
    try:
        return importlib.util.find_spec(runtime) is not None
    except (ImportError, ValueError):  # a module that is blocked (sys.modules[name] = None) has no spec
        return False


def peer_contenders(runtimes: list[str], torch_model: torch.nn.Module, model_folder: Callable[[Path], Path],
                    example: dict[str, np.ndarray], threads: int, step: Callable[[str], None] = lambda _: None
                    ) -> list[Contender]:
    """Each runtime's contenders for `torch_model` (forward(input_ids, attention_mask, token_type_ids) ->
    last_hidden_state); `model_folder(scratch)` gives its transformers folder (CTranslate2 converts a folder),
    `example` feeds OpenVINO's conversion. A runtime that is missing or fails to build is one contender
    with the reason."""
    from attnfuse.models._export import quiet
    from attnfuse.models.peers import describe_error

    builders = {"openvino": lambda: openvino_contenders(torch_model, example, threads),
                "ctranslate2": lambda: ctranslate2_contenders(model_folder, threads)}
    contenders: list[Contender] = []
    for runtime in runtimes:
        name = RUNTIMES[runtime]
        step(name)
        if not installed(runtime):
            contenders.append(Contender(name, error=NOT_INSTALLED, precision=None, peer=True))
            continue
        try:
            with quiet():
                contenders += builders[runtime]()
        except Exception as error:  # a peer that cannot be built is a result, not a crash of the bench
            contenders.append(Contender(name, error=describe_error(error), precision=None, peer=True))
    return contenders


# ---- OpenVINO -----------------------------------------------------------------------------------

def openvino_contenders(torch_model: torch.nn.Module, example: dict[str, np.ndarray], threads: int) -> list[Contender]:
    """f32 and OpenVINO's own precision, each under both performance hints."""
    import openvino as ov

    model = ov.convert_model(torch_model, example_input={name: torch.from_numpy(a) for name, a in example.items()})
    return [Contender("OpenVINO f32" if forced else f"OpenVINO default ({precision})", run, precision=precision,
                      setting=hint, peer=True)
            for forced, precision, hint, run in openvino_runners(model, threads, ("f32", None))]


def openvino_runners(model, threads: int, precisions: tuple[str | None, ...]) -> list[tuple[str | None, str, str, Runner]]:
    """`model` (an ov.Model, or an ONNX file's path) compiled for the CPU on `threads` threads at each of `precisions`
    (None: the one OpenVINO picks for this CPU) under each performance hint: (the precision asked for, the one
    it computes in, the hint, its runner)."""
    import openvino as ov

    core = ov.Core()
    runners = []
    for forced in precisions:
        for hint in OPENVINO_HINTS:
            config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": hint}
            if forced:
                config["INFERENCE_PRECISION_HINT"] = forced
            compiled = core.compile_model(model, "CPU", config)
            run = openvino_latency_runner(compiled) if hint == "LATENCY" else openvino_throughput_runner(compiled)
            runners.append((forced, openvino_precision(compiled), hint, run))
    return runners


def openvino_precision(compiled) -> str:
    """The precision the compiled model computes in: "f32", "bf16", ..."""
    element = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return OPENVINO_PRECISIONS.get(element, element)


def input_names(compiled) -> list[str]:
    return [port.get_any_name() for port in compiled.inputs]


def openvino_latency_runner(compiled) -> Runner:
    """One infer request runs the whole batch."""
    request, names = compiled.create_infer_request(), input_names(compiled)

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = request.infer({name: feeds[name] for name in names})
        return [result[port] for port in compiled.outputs]
    return run


def openvino_throughput_runner(compiled) -> Runner:
    """The batch's rows split across OpenVINO's optimal number of requests, run at once, then joined."""
    import openvino as ov

    requests, names = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"), input_names(compiled)
    queue = ov.AsyncInferQueue(compiled, requests)
    parts: dict[int, list[np.ndarray]] = {}
    queue.set_callback(lambda request, index: parts.__setitem__(
        index, [request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]))

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        parts.clear()
        rows = len(feeds[names[0]])
        for index, chunk in enumerate(np.array_split(np.arange(rows), min(requests, rows))):
            queue.start_async({name: feeds[name][chunk[0]: chunk[-1] + 1] for name in names}, index)
        queue.wait_all()
        return [np.concatenate([parts[i][output] for i in sorted(parts)]) for output in range(len(compiled.outputs))]
    return run


# ---- CTranslate2 --------------------------------------------------------------------------------

def ctranslate2_contenders(model_folder: Callable[[Path], Path], threads: int) -> list[Contender]:
    """The folder converted once; an Encoder per compute type (each loads the converted weights itself)."""
    import ctranslate2

    with tempfile.TemporaryDirectory(prefix="attnfuse-ct2-") as scratch:
        converted = Path(scratch) / "ctranslate2"
        ctranslate2.converters.TransformersConverter(str(model_folder(Path(scratch)))).convert(str(converted))
        return [Contender(f"CTranslate2 {precision}", ctranslate2_runner(ctranslate2.Encoder(
                    str(converted), device="cpu", compute_type=compute_type, intra_threads=threads)),
                          precision=precision, peer=True)
                for precision, compute_type in CTRANSLATE2_TYPES.items()]


def ctranslate2_runner(encoder) -> Runner:
    """Each row's real tokens as a list (unpadded, as CTranslate2's users pass them); its output, which is
    padded to the longest row, is laid back at the feeds' real positions (zeros elsewhere)."""
    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        real = feeds["attention_mask"].astype(bool)
        ids = [row[keep].tolist() for row, keep in zip(feeds["input_ids"], real)]
        types = [row[keep].tolist() for row, keep in zip(feeds["token_type_ids"], real)] if "token_type_ids" in feeds else None
        hidden = np.asarray(encoder.forward_batch(ids, token_type_ids=types).last_hidden_state)
        return [at_real_positions(hidden, real)]
    return run


def at_real_positions(packed_rows: np.ndarray, real: np.ndarray) -> np.ndarray:
    """[B, longest, ...] rows whose first length_b positions are row b's real tokens, laid out as `real`
    ([B, width] bool, any padding side) with zeros at its padded positions."""
    lengths = real.sum(1)
    out = np.zeros((*real.shape, *packed_rows.shape[2:]), packed_rows.dtype)
    out[real] = packed_rows[np.arange(packed_rows.shape[1])[None, :] < lengths[:, None]]
    return out


# ---- model folders ------------------------------------------------------------------------------

def transformers_folder(model_module, torch_model: torch.nn.Module) -> Callable[[Path], Path]:
    """Where CTranslate2 converts from: the model's own folder where it has one (attnfuse.models.minilm),
    otherwise (random weights: attnfuse.models.bertbase) the torch model saved into scratch space, with a
    word-piece vocabulary of its size (the converter reads the vocabulary from a tokenizer)."""
    if hasattr(model_module, "model_dir"):
        return lambda _scratch: model_module.model_dir()

    def save(scratch: Path) -> Path:
        folder = scratch / "transformers"
        inner = torch_model.model  # attnfuse.models.wrappers.TextModel holds the transformers model
        inner.save_pretrained(folder)
        vocabulary_tokenizer(inner.config.vocab_size, folder)
        # CTranslate2's BERT loader reads config.position_embedding_type, which transformers 5 no longer writes
        config = folder / "config.json"
        config.write_text(json.dumps({"position_embedding_type": "absolute", **json.loads(config.read_text())}, indent=1))
        return folder
    return save


def vocabulary_tokenizer(size: int, folder: Path) -> None:
    """A BERT tokenizer of `size` made-up word pieces, BERT's special tokens first, saved into `folder`."""
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join([*special, *(f"piece{i}" for i in range(len(special), size))]) + "\n")
    BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)  # reads vocab.txt, writes the tokenizer files


# ---- sentence embeddings ------------------------------------------------------------------------

class RunnerModel(torch.nn.Module):
    """A stand-in for a transformers encoder that a peer's runner computes: called by name as
    sentence-transformers' Transformer module calls its model, it returns last_hidden_state."""

    def __init__(self, run: Runner, config):
        super().__init__()
        self.run, self.config = run, config  # sentence-transformers reads its model's config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                **_flags) -> dict[str, torch.Tensor]:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            feeds["token_type_ids"] = token_type_ids
        hidden = self.run({name: tensor.numpy().astype(np.int64) for name, tensor in feeds.items()})[0]
        return {"last_hidden_state": torch.from_numpy(np.ascontiguousarray(hidden))}


def with_peer(sentence_model, run: Runner):
    """A copy of the SentenceTransformer whose transformer's model is the peer's runner: its encode keeps
    everything else of sentence-transformers' (tokenizer, sorting, batching, padding, pooling, normalize)."""
    from attnfuse.optimizer.torch_sentence import with_model

    transformer = next(module for module in sentence_model if hasattr(module, "auto_model"))
    return with_model(sentence_model, RunnerModel(run, transformer.auto_model.config))


def attnfuse_openvino(spec: ModelSpec, threads: int, step: Callable[[str], None], quantize: str | None = None
                      ) -> list[Contender]:
    """attnfuse's file for OpenVINO (`--target openvino`, verified there at f32 and at bf16 where the CPU has it;
    `quantize="int8"`: with int8 weights, a file for each precision, in its form), compiled at f32 and bf16 under
    both of OpenVINO's performance hints, as the OpenVINO peer is."""
    import attnfuse

    def build(precision: str):
        result = attnfuse.optimize_onnx(str(spec.exported(dynamo=True, attention="sdpa")), target="openvino",
                                        precision=precision, quantize=quantize)
        return result.proto, f"{result.report.attention_fused}/{result.report.attention_total}"
    step(f"{spec.name}: attnfuse{' ' + quantize if quantize else ''} for OpenVINO")
    # int8 weights take a form per precision (optimizer/quantize.py): a file for each
    return _on_openvino(lambda precision: attnfuse_on_openvino(precision, quantize), build, threads, quantize,
                        per_precision=quantize is not None)


def openvino_int8(spec: ModelSpec, threads: int, step: Callable[[str], None]) -> list[Contender]:
    """The OpenVINO int8 peer: the dynamo export with int8 weights per output channel (module docstring)."""
    from attnfuse.optimizer import io
    from attnfuse.optimizer.quantize import weights_int8
    from attnfuse.passes.onnx import standard

    def build(_precision: str):
        export = io.load_model(str(spec.exported(dynamo=True, attention="sdpa")))
        return io.to_proto(weights_int8(io.with_opset(export, standard.OPSET), block=None)), None
    step(f"{spec.name}: OpenVINO int8")
    return _on_openvino(openvino_int8_name, build, threads, "int8", peer=True)


def openvino_int8_name(precision: str) -> str:
    return f"OpenVINO int8 {'f32' if precision == 'f32' else f'default ({precision})'}"


def _on_openvino(name_of: Callable[[str], str], build: Callable, threads: int, quantize: str | None,
                 peer: bool = False, per_precision: bool = False) -> list[Contender]:
    """A contender per precision this CPU computes in (f32, and bf16 where it is native) and performance hint,
    named `name_of(precision)`, running in OpenVINO the ONNX model `build(the highest precision)` gives (with its
    attention count), or with `per_precision`, the model `build(precision)` gives for each; the reason in each
    where it cannot."""
    from attnfuse.models.peers import describe_error
    from attnfuse.optimizer import openvino_run

    precisions = ("f32", "bf16") if openvino_run.installed() and openvino_run.has_bf16() else ("f32",)
    if not openvino_run.installed():
        return [Contender(name_of(p), error=NOT_INSTALLED, precision=quantize, peer=peer) for p in precisions]
    # the precision a model is built for -> those it runs at
    builds = {p: (p,) for p in precisions} if per_precision else {precisions[-1]: precisions}
    contenders = []
    for built_for, runs_at in builds.items():
        try:
            runners, fused = _openvino_built(build, built_for, threads, runs_at)
        except Exception as error:  # a contender that cannot be built is a result, not a crash of the bench
            contenders += [Contender(name_of(p), error=describe_error(error), precision=quantize, peer=peer)
                           for p in runs_at]
            continue
        contenders += [Contender(name_of(forced), run, attention=fused, precision=quantize or precision,
                                 setting=hint, peer=peer) for forced, precision, hint, run in runners]
    return contenders


def _openvino_built(build: Callable, precision: str, threads: int, runs_at: tuple[str, ...]) -> tuple[list, str | None]:
    """openvino_runners at `runs_at` of the model `build(precision)` gives, and its attention count."""
    from attnfuse.models._export import quiet

    with quiet():
        proto, fused = build(precision)
        import openvino as ov

        model = ov.Core().read_model(proto.SerializeToString(), b"")
        return openvino_runners(model, threads, runs_at), fused


def attnfuse_on_openvino(precision: str, quantize: str | None = None) -> str:
    return f"attnfuse{' ' + quantize if quantize else ''} (OpenVINO {precision})"
