"""The embedding rule on tiny graphs: layernorm(word[ids] + position[positions] (+ segment[types]))
becomes one EmbedLayerNormalization in ONNX, with the positions as the graph computes them, and
computes what numpy says; torch has no such op, and the fx rule says so."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from run_rules import fx_rewrite, fx_targets, onnx_rewrite, onnx_run, op_types, relative_error

from attnfuse.core import registry
from attnfuse.passes.rules.embed_layer_norm import EmbedLayerNorm

VOCAB, POSITIONS, HIDDEN, EPS = 100, 64, 32, 1e-12
EMBED = registry.EMBED_LAYER_NORMALIZATION.op_type
PAD = 1  # RoBERTa's padding id: its positions count the real tokens from PAD + 1


def tables() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"word": rng.standard_normal((VOCAB, HIDDEN)), "position": rng.standard_normal((POSITIONS, HIDDEN)),
            "segment": rng.standard_normal((2, HIDDEN)), "gamma": rng.uniform(0.5, 1.5, HIDDEN),
            "beta": rng.uniform(-0.5, 0.5, HIDDEN)}


def embedding_model(positions: str = "arange", segments: bool = True, ids_shifted: bool = False, bias: bool = True,
                    sum_read: bool = False):
    """layernorm(word[ids] + position[positions] (+ segment[token_type_ids])): positions 0..S-1
    ("arange") or RoBERTa's, counted over the real tokens ("roberta")."""
    t = tables()
    nodes, initializers = [], [numpy_helper.from_array(t[name].astype(np.float32), name) for name in t]
    ids = "input_ids"
    if ids_shifted:  # the word table read at ids - 1: no lookup reads the ids input
        nodes.append(helper.make_node("Sub", ["input_ids", "one"], ["shifted"]))
        initializers.append(numpy_helper.from_array(np.array(1, np.int64), "one"))
        ids = "shifted"
    if positions == "arange":
        nodes += [helper.make_node("Shape", ["input_ids"], ["shape"], start=1, end=2),
                  helper.make_node("Squeeze", ["shape"], ["length"]),
                  helper.make_node("Range", ["zero", "length", "step"], ["range"]),
                  helper.make_node("Unsqueeze", ["range", "axis0"], ["position_ids"])]
        initializers += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                         (("zero", 0), ("step", 1), ("axis0", [0]))]
    else:  # cumsum(ids != PAD) * (ids != PAD) + PAD
        nodes += [helper.make_node("Equal", ["input_ids", "pad"], ["is_pad"]), helper.make_node("Not", ["is_pad"], ["real"]),
                  helper.make_node("Cast", ["real"], ["real_int"], to=TensorProto.INT64),
                  helper.make_node("CumSum", ["real_int", "axis1"], ["counted"]),
                  helper.make_node("Mul", ["counted", "real_int"], ["real_counted"]),
                  helper.make_node("Add", ["real_counted", "pad"], ["position_ids"])]
        initializers += [numpy_helper.from_array(np.array(PAD, np.int64), "pad"),
                         numpy_helper.from_array(np.array(1, np.int64), "axis1")]
    nodes += [helper.make_node("Gather", ["word", ids], ["words"]),
              helper.make_node("Gather", ["position", "position_ids"], ["places"]),
              helper.make_node("Add", ["words", "places"], ["summed"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    total = "summed"
    if segments:
        nodes += [helper.make_node("Gather", ["segment", "token_type_ids"], ["types"]),
                  helper.make_node("Add", ["summed", "types"], ["total"])]
        inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "sequence"]))
        total = "total"
    nodes.append(helper.make_node("LayerNormalization", [total, "gamma"] + (["beta"] if bias else []), ["y"],
                                  epsilon=EPS))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ["y"] + [total] * sum_read]
    graph = helper.make_graph(nodes, "embeddings", inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def feeds(segments: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    ids = rng.integers(2, VOCAB, (3, 11))
    ids[1, 8:] = PAD  # padding at the end of one row
    out = {"input_ids": ids}
    if segments:
        out["token_type_ids"] = (np.arange(11) >= 5).astype(np.int64)[None].repeat(3, 0)
    return out


def expected(inputs: dict[str, np.ndarray], positions: str) -> tuple[np.ndarray, np.ndarray]:
    """(layernorm of the sum, the sum) in numpy."""
    t, ids = tables(), inputs["input_ids"]
    if positions == "arange":
        places = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    else:
        real = (ids != PAD).astype(np.int64)
        places = np.cumsum(real, 1) * real + PAD
    total = t["word"][ids] + t["position"][places]
    if "token_type_ids" in inputs:
        total = total + t["segment"][inputs["token_type_ids"]]
    centred = total - total.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + EPS) * t["gamma"] + t["beta"], total


@pytest.mark.parametrize("positions, segments, sum_read", [
    ("arange", True, False), ("roberta", True, False), ("arange", False, False), ("arange", True, True),
], ids=["bert", "roberta positions", "no segments", "the sum read elsewhere"])
def test_onnx_embeddings_and_layer_norm_become_one_op(positions, segments, sum_read):
    fused, outcomes = onnx_rewrite(embedding_model(positions, segments, sum_read=sum_read), [EmbedLayerNorm()])
    assert [(o.op, o.fused) for o in outcomes] == [(EMBED, True)]
    assert op_types(fused).count(EMBED) == 1 and not {"Gather", "LayerNormalization"} & set(op_types(fused))
    inputs = feeds(segments)
    got = onnx_run(fused, inputs)
    want, total = expected(inputs, positions)
    assert relative_error(want, got[0]) <= 1e-4
    if sum_read:  # the op's embedding sum replaces the original's
        assert relative_error(total, got[1]) <= 1e-4


@pytest.mark.parametrize("defect, reason", [(dict(ids_shifted=True, segments=False), "no lookup reads the token ids input"),
                                            (dict(bias=False), "not over the last axis with a bias")],
                         ids=["ids shifted", "no bias"])
def test_onnx_near_misses_are_refused_with_their_reason(defect, reason):
    model = embedding_model(**defect)
    fused, outcomes = onnx_rewrite(model, [EmbedLayerNorm()])
    (outcome,) = outcomes
    assert not outcome.fused and reason in outcome.reason
    assert EMBED not in op_types(fused)
    inputs = feeds(defect.get("segments", True))
    assert relative_error(onnx_run(model, inputs)[0], onnx_run(fused, inputs)[0]) == 0.0


def test_onnx_one_lookup_is_not_an_embedding_sum():
    """A layernorm of a single lookup (GPT-2's is word + position: here the position is left out)."""
    model = embedding_model(segments=False)
    graph = model.graph
    norm = next(node for node in graph.node if node.op_type == "LayerNormalization")
    norm.input[0] = "words"
    fused, outcomes = onnx_rewrite(model, [EmbedLayerNorm()])
    assert outcomes == [] and op_types(fused).count("LayerNormalization") == 1


class Embeddings(torch.nn.Module):
    def __init__(self):
        super().__init__()
        t = {name: torch.from_numpy(array).float() for name, array in tables().items()}
        self.word = torch.nn.Embedding.from_pretrained(t["word"])
        self.position = torch.nn.Embedding.from_pretrained(t["position"])
        self.segment = torch.nn.Embedding.from_pretrained(t["segment"])
        self.norm = torch.nn.LayerNorm(HIDDEN, eps=EPS)
        self.norm.weight.data, self.norm.bias.data = t["gamma"], t["beta"]

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1])[None]
        return self.norm(self.word(input_ids) + self.position(positions) + self.segment(token_type_ids))


def test_fx_has_no_embed_layer_norm_and_says_so():
    module = Embeddings().eval()
    runs = [tuple(torch.from_numpy(v) for v in feeds().values()),
            (torch.randint(2, VOCAB, (3, 11)), torch.ones(3, 11, dtype=torch.int64))]
    fused, outcomes = fx_rewrite(module, runs, [EmbedLayerNorm()])
    (outcome,) = outcomes
    assert (outcome.op, outcome.fused) == (registry.EMBED_LAYER_NORM.name, False)
    assert outcome.reason == f"{EMBED} has no torch form"
    assert torch.ops.aten.layer_norm.default in fx_targets(fused)
    inputs = feeds()
    with torch.no_grad():
        got = fused(*(torch.from_numpy(v) for v in inputs.values()))
    assert relative_error(expected(inputs, "arange")[0], got) <= 1e-4
