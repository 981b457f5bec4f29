"""Padding-free on tiny graphs: which ops run packed comes from the fused-op registry, which
attention runs packed from its AttentionFacts, and the padding mask from the inputs' roles.
Every rewrite is compared with the original on padded batches (ONNX Runtime, torch)."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from attnfuse.core import registry
from attnfuse.core.facts import AttentionFacts, attention_facts, is_padding_free, tag_attention
from attnfuse.core.options import PassOptions, Target
from attnfuse.optimizer.config import OptimizeConfig
from attnfuse.optimizer.input_roles import MASK, read_roles
from attnfuse.optimizer.inputs import InputPlan
from attnfuse.optimizer.io import load_model, to_proto
from attnfuse.optimizer.probe import Probe
from attnfuse.passes import fx as fx_passes
from attnfuse.passes.fx.graph import FxProbe
from attnfuse.passes.onnx import padding_free, padding_mask, run_passes, unpadded_branch
from attnfuse.passes.onnx.graph import NoMatch

HIDDEN, HEADS, WIDTH = 8, 2, 10
TOLERANCE = 1e-4
MS = registry.MS_DOMAIN
RNG = np.random.default_rng(0)
ENCODER_MASK = "encoder_attention_mask"


def weight(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array((RNG.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32), name)


def model(nodes, inputs, outputs, initializers) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                   for o in outputs], initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    return load_model(proto)


def fused(form: registry.OnnxForm, inputs: dict[str, str], outputs: list[str], **attributes) -> helper.NodeProto:
    """A node of a fused op, its inputs given by slot name."""
    arguments = [name or "" for name in form.arguments(**inputs)]
    return helper.make_node(form.op_type, arguments, outputs, domain=form.domain, **attributes)


def tokens(name: str = "x") -> helper.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "sequence", HIDDEN])


def token_mask(name: str, length: str = "sequence") -> helper.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", length])


def masks(width: int = WIDTH) -> dict[str, np.ndarray]:
    right = np.array([[1] * n + [0] * (width - n) for n in (width, 6, 1, 0)])
    holes = np.ones((2, width), np.int64)
    holes[0, [2, 5]] = 0
    return {"right": right, "left": right[:, ::-1], "holes": holes, "none": np.ones((2, width), np.int64)}


def session(m: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"])


def assert_same_on_real_tokens(original: ir.Model, rewritten: ir.Model, mask_name: str = "attention_mask",
                               width: int = WIDTH) -> None:
    """Equal at real tokens, zero at padded ones, on every shape of padding."""
    before, after = session(original), session(rewritten)
    encoder = any(value.name == ENCODER_MASK for value in original.graph.inputs)
    for kind, mask in masks(width).items():
        feeds = {"x": RNG.normal(size=(*mask.shape, HIDDEN)).astype(np.float32), mask_name: mask}
        if encoder:
            feeds[ENCODER_MASK] = np.ones((len(mask), 7), np.int64)
        expected, got = before.run(None, feeds)[0], after.run(None, feeds)[0]
        real = mask.astype(bool)
        scale = np.abs(expected[real]).max()
        assert np.abs(expected[real] - got[real]).max() / scale <= TOLERANCE, kind
        assert not got[~real].any(), kind


def packed(m: ir.Model, probe: Probe, target: str = "ort-cpu") -> list[int]:
    positions = padding_free.apply(m.graph, probe, padding_mask(m.graph, probe), target)
    m.graph.sort()  # as the pipeline does after it: a replaced value may be read before its new maker
    return positions


def node_of(m: ir.Model, form: registry.OnnxForm) -> ir.Node:
    return next(node for node in m.graph if (node.domain, node.op_type) == (form.domain, form.op_type))


def shape_of(m: ir.Model, value: ir.Value, feeds: dict[str, np.ndarray]) -> tuple[int, ...]:
    """The shape `value` takes when `m` runs on `feeds` (it is made an output of a copy)."""
    copy = m.clone()
    inside = next(out for node in copy.graph for out in node.outputs if out.name == value.name)
    inside.type = ir.TensorType(ir.DataType.FLOAT)
    copy.graph.outputs.append(inside)
    return session(copy).run(None, feeds)[-1].shape


# --------------------------------------------------------- token-wise ops from the registry

def norms_graph(per_token: bool) -> ir.Model:
    """x @ w -> SkipSimplifiedLayerNormalization(., x) -> RotaryEmbedding(., position ids) -> @ w2; the
    position ids one per token ([B, S]) or an offset shared by the batch ([1])."""
    norm, rotary = registry.SKIP_SIMPLIFIED_LAYER_NORMALIZATION, registry.ROTARY_EMBEDDING
    angles = np.arange(64)[:, None] * 0.1 ** np.arange(HIDDEN // HEADS // 2)  # [positions, half a head]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        fused(norm, dict(input="h", skip="x", gamma="gamma"), ["normed"], epsilon=1e-6),
        fused(rotary, dict(input="normed", position_ids="positions", cos_cache="cos", sin_cache="sin"), ["turned"],
              num_heads=HEADS, rotary_embedding_dim=HIDDEN // HEADS),
        helper.make_node("MatMul", ["turned", "w2"], ["y"]),
    ]
    weights = [weight("w", HIDDEN, HIDDEN), weight("w2", HIDDEN, HIDDEN),
               numpy_helper.from_array(RNG.uniform(0.5, 1.5, HIDDEN).astype(np.float32), "gamma"),
               numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
               numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
    dims = ["batch", "sequence"] if per_token else [1]
    positions = helper.make_tensor_value_info("positions", TensorProto.INT64, dims)
    return model(nodes, [tokens(), token_mask("attention_mask"), positions], ["y"], weights)


@pytest.mark.parametrize("per_token", [True, False])
def test_a_fused_norm_the_registry_calls_token_wise_runs_on_packed_tokens(per_token):
    original = norms_graph(per_token)
    rewritten = original.clone()
    packed(rewritten, Probe.capture(rewritten))
    mask = masks()["left"]
    positions = np.clip(mask.cumsum(-1) - 1, 0, None) if per_token else np.array([3])
    feeds = {"x": RNG.normal(size=(*mask.shape, HIDDEN)).astype(np.float32), "attention_mask": mask,
             "positions": positions}
    norm = node_of(rewritten, registry.SKIP_SIMPLIFIED_LAYER_NORMALIZATION)
    rotary = node_of(rewritten, registry.ROTARY_EMBEDDING)
    assert shape_of(rewritten, norm.outputs[0], feeds) == (1, mask.sum(), HIDDEN)  # the real tokens only
    # One position per token: the rotary runs on the real tokens, its position ids packed with them.
    # Near miss: an offset shared by the batch reads each token's place in its row: the padded layout back.
    assert shape_of(rewritten, rotary.outputs[0], feeds) == ((1, mask.sum()) if per_token else mask.shape) + (HIDDEN,)
    before, after = session(original).run(None, feeds)[0], session(rewritten).run(None, feeds)[0]
    real = mask.astype(bool)
    assert np.allclose(before[real], after[real], atol=1e-5) and not after[~real].any()


# ------------------------------------------------------ fused attention chosen by its facts

def attention_graph() -> ir.Model:
    """q, k, v projections -> MultiHeadAttention(key_padding_mask = the mask) -> output projection."""
    mha = registry.MULTI_HEAD_ATTENTION
    nodes = [
        *(helper.make_node("MatMul", ["x", f"w{p}"], [p]) for p in "qkv"),
        helper.make_node("Cast", ["attention_mask"], ["keys"], to=TensorProto.INT32),
        fused(mha, dict(query="q", key="k", value="v", key_padding_mask="keys"), ["attended"], num_heads=HEADS),
        helper.make_node("MatMul", ["attended", "wo"], ["y"]),
    ]
    weights = [weight(f"w{p}", HIDDEN, HIDDEN) for p in "qkvo"]
    return model(nodes, [tokens(), token_mask("attention_mask")], ["y"], weights)


KEY_PADDING_ONLY = AttentionFacts(masks_padded_keys=True, key_padding_only=True, mask_slot="key_padding_mask")


def tagged(m: ir.Model, facts: AttentionFacts | None) -> ir.Model:
    if facts is not None:
        tag_attention(node_of(m, registry.MULTI_HEAD_ATTENTION), facts)
    return m


@pytest.mark.parametrize("width", [WIDTH, padding_free.PER_SEQUENCE_WIDTH + 4])  # padded layout / per sequence
def test_attention_whose_only_mask_is_key_padding_runs_on_packed_tokens(width):
    original = attention_graph()
    rewritten = tagged(original.clone(), KEY_PADDING_ONLY)
    packed(rewritten, Probe.capture(rewritten))
    assert not any(node.op_type == registry.MULTI_HEAD_ATTENTION.op_type for node in rewritten.graph)  # in an If
    assert_same_on_real_tokens(original, rewritten, width=width)


def test_attention_that_masks_padded_keys_with_another_mask_too_stays_on_the_padded_layout():
    original = attention_graph()
    rewritten = tagged(original.clone(), AttentionFacts(masks_padded_keys=True, key_padding_only=False))
    packed(rewritten, Probe.capture(rewritten))
    mha = node_of(rewritten, registry.MULTI_HEAD_ATTENTION)  # still there, on restored q, k, v
    assert all(is_padding_free(x.producer()) for x in mha.inputs[:3])
    assert_same_on_real_tokens(original, rewritten)


def test_attention_not_known_to_mask_padded_keys_refuses_padding_free():
    m = attention_graph()
    with pytest.raises(NoMatch, match="reads padded keys that its mask does not hide"):
        packed(m, Probe.capture(m))


def test_cuda_writes_packed_attention_by_slot():
    m = tagged(attention_graph(), KEY_PADDING_ONLY)
    packed(m, Probe.capture(m), target="ort-cuda")
    form = registry.PACKED_MULTI_HEAD_ATTENTION
    (node,) = [node for node in m.graph if (node.domain, node.op_type) == (form.domain, form.op_type)]
    sequences = node.inputs[form.slot("cumulative_sequence_length")]
    assert node.inputs[form.slot("token_offset")] is not None
    assert sequences.producer().op_type == "Concat"  # [0, cumsum(lengths)]


def test_the_unpadded_branch_drops_the_padding_mask_by_its_slot():
    original = attention_graph()
    rewritten = tagged(original.clone(), KEY_PADDING_ONLY)
    probe = Probe.capture(rewritten)
    mask = padding_mask(rewritten.graph, probe)
    fused = rewritten.graph.clone()
    positions = padding_free.apply(rewritten.graph, probe, mask)
    unpadded_branch.add(rewritten.graph, fused, mask.value, positions)
    rewritten.graph.sort()
    (branch,) = [node for node in rewritten.graph if node.op_type == "If"]
    unpadded = branch.attributes["then_branch"].value
    mha = registry.MULTI_HEAD_ATTENTION
    (attention,) = [node for node in unpadded if node.op_type == mha.op_type]
    assert attention_facts(attention) == KEY_PADDING_ONLY
    slot = mha.slot("key_padding_mask")
    assert len(attention.inputs) <= slot or attention.inputs[slot] is None
    assert_same_on_real_tokens(original, rewritten)  # "none" takes the unpadded branch


def test_a_model_that_runs_padding_free_already_is_not_packed_twice():
    m = tagged(attention_graph(), KEY_PADDING_ONLY)
    packed(m, Probe.capture(m))
    again = load_model(to_proto(m))  # as from a file: no facts on the nodes
    with pytest.raises(NoMatch, match="runs padding-free already"):
        packed(again, Probe.capture(again))


# ----------------------------------------------------------- the padding mask from the roles

def bert_graph(mask_name: str, encoder_mask: bool = False) -> ir.Model:
    """Two-head self-attention in standard ops, masked by (1 - mask) * -10000, and a residual."""
    size = HIDDEN // HEADS
    heads = [0, 0, HEADS, size]

    def split(name):
        return [helper.make_node("Reshape", [name, "heads"], [f"{name}4"]),
                helper.make_node("Transpose", [f"{name}4"], [f"{name}t"], perm=[0, 2, 1, 3])]

    nodes = [
        *(helper.make_node("MatMul", ["x", f"w{p}"], [p]) for p in "qkv"), *split("q"), *split("k"), *split("v"),
        helper.make_node("Transpose", ["kt"], ["kT"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qt", "kT"], ["qk"]),
        helper.make_node("Div", ["qk", "root"], ["scores"]),
        helper.make_node("Unsqueeze", [mask_name, "axes12"], ["m4"]),
        helper.make_node("Cast", ["m4"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mf"], ["hidden"]),
        helper.make_node("Mul", ["hidden", "fill"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "vt"], ["ctx4"]),
        helper.make_node("Transpose", ["ctx4"], ["ctxt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctxt", "merged"], ["ctx"]),
        helper.make_node("MatMul", ["ctx", "wo"], ["attended"]),
        helper.make_node("Add", ["attended", "x"], ["y"]),
    ]
    constants = [numpy_helper.from_array(np.array(v, dtype), n) for n, v, dtype in (
        ("heads", heads, np.int64), ("merged", [0, 0, HIDDEN], np.int64), ("axes12", [1, 2], np.int64),
        ("root", np.sqrt(size), np.float32), ("one", 1.0, np.float32), ("fill", -10000.0, np.float32))]
    inputs = [tokens(), token_mask(mask_name)]
    if encoder_mask:  # listed first: an encoder's mask covers other tokens than these
        inputs.insert(0, token_mask(ENCODER_MASK, "encoder_sequence"))
    return model(nodes, inputs, ["y"], [*(weight(f"w{p}", HIDDEN, HIDDEN) for p in "qkvo"), *constants])


@pytest.mark.parametrize("name", ["am", "input_mask_2d"])
def test_the_padding_mask_is_the_input_the_roles_call_a_mask(name):
    original = bert_graph(name, encoder_mask=True)
    roles = {role.name: role.role for role in read_roles(original)}
    assert roles[name] == MASK  # "am": because it masks the softmax's scores
    assert InputPlan(original).padding_mask == name  # not the encoder's, listed first
    rewritten = original.clone()
    result = run_passes(rewritten, Probe.capture(rewritten), OptimizeConfig().pass_options())
    assert [(s.fused, s.mask) for s in result.sites] == [(True, "key_padding")]
    assert {f.name: f.fused for f in result.fusions}[padding_free.NAME]
    assert_same_on_real_tokens(original, rewritten, mask_name=name)


def test_an_encoder_mask_alone_is_no_padding_mask():
    m = bert_graph(ENCODER_MASK)  # its dims say the tokens, its name an encoder's
    assert InputPlan(m).padding_mask is None
    with pytest.raises(NoMatch, match="no attention-mask input"):
        packed(m, Probe.capture(m))


# -------------------------------------------------------------------- fx: registry and mask

class SkipNorm(torch.nn.Module):
    """layernorm(x @ w + b + x): the skip + layernorm rule makes it attnfuse::skip_layernorm."""

    def __init__(self):
        super().__init__()
        self.dense = torch.nn.Linear(HIDDEN, HIDDEN)
        self.norm = torch.nn.LayerNorm(HIDDEN)

    def forward(self, x, am):
        return self.norm(self.dense(x) + x)


def test_fx_runs_a_token_wise_fused_op_packed_and_takes_the_signature_s_mask():
    torch.manual_seed(0)
    module = SkipNorm().eval()
    example = {"x": torch.randn(2, WIDTH, HIDDEN), "am": torch.ones(2, WIDTH, dtype=torch.int64)}
    batch, sequence = torch.export.Dim.AUTO, torch.export.Dim.AUTO
    shapes = {"x": {0: batch, 1: sequence}, "am": {0: batch, 1: sequence}}
    graph_module = torch.export.export(module, (), example, dynamic_shapes=shapes, strict=False).module()
    runs = [((), {"x": torch.randn(*m.shape, HIDDEN), "am": torch.from_numpy(m.copy())})
            for m in (masks()["right"], masks()["holes"])]
    result = fx_passes.run_passes(graph_module, runs, PassOptions(Target.TORCH_CPU), mask="am")  # as the captured Signature names it
    assert [f.fused for f in result.fusions] == [True, True]  # skip + layernorm, padding-free
    probe = FxProbe(graph_module, runs)
    (fused,) = [node for node in graph_module.graph.nodes if registry.of_torch(node.target) is registry.SKIP_LAYER_NORM]
    for run, (_, feeds) in enumerate(runs):
        real = feeds["am"].bool()
        assert probe.get(fused, run)[0].shape == (1, int(real.sum()), HIDDEN)  # on the real tokens
        with torch.no_grad():
            expected, got = module(**feeds), graph_module(**feeds)
        assert torch.allclose(expected[real], got[real], atol=1e-5) and not got[~real].any()
