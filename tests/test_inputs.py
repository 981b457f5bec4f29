"""Check inputs derived from the graph: roles, dims written as expressions, KV caches and their
flags, position ids that follow the mask, image sizes read from the patch grid, padding at fixed
shapes, and sizes the user gives."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from attnfuse.optimizer.errors import UserError
from attnfuse.optimizer.input_roles import CACHE, CACHE_FLAG, IDS, MASK, PIXELS, POSITIONS, read_roles
from attnfuse.optimizer.inputs import Case, InputPlan, row_lengths
from attnfuse.optimizer.io import load_model

HIDDEN, HEADS, VOCAB = 16, 2, 30


def graph(inputs, nodes=(), initializers=()):
    """Every input passes through Identity (so each is used), plus `nodes`."""
    outs = [helper.make_node("Identity", [i.name], [f"{i.name}_out"]) for i in inputs]
    outputs = [helper.make_value_info(f"{i.name}_out", helper.TypeProto()) for i in inputs]
    model = helper.make_model(helper.make_graph([*outs, *nodes], "g", inputs, outputs, list(initializers)),
                              opset_imports=[helper.make_opsetid("", 17)])
    return load_model(model)


def tensor(name, dtype, dims):
    return helper.make_tensor_value_info(name, dtype, dims)


def decoder_inputs(mask_dim="past_sequence_length + sequence_length"):
    """Optimum's decoder-with-past signature: ids into an embedding table, the mask over past + new."""
    table = numpy_helper.from_array(np.zeros((VOCAB, HIDDEN), np.float32), "table")
    return graph(
        [tensor("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         tensor("attention_mask", TensorProto.INT64, ["batch_size", mask_dim]),
         tensor("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         tensor("past_key_values.0.key", TensorProto.FLOAT, ["batch_size", HEADS, "past_sequence_length", 8]),
         tensor("past_key_values.0.value", TensorProto.FLOAT, ["batch_size", HEADS, "past_sequence_length", 8])],
        nodes=[helper.make_node("Gather", ["table", "input_ids"], ["embedded"])], initializers=[table])


def test_roles_are_read_from_the_graph():
    roles = {role.name: role for role in read_roles(decoder_inputs())}
    assert [roles[n].role for n in ("input_ids", "attention_mask", "position_ids", "past_key_values.0.key")] == \
        [IDS, MASK, POSITIONS, CACHE]
    assert roles["input_ids"].table_rows == VOCAB and roles["input_ids"].table_width == HIDDEN


def test_a_mask_over_past_and_new_tokens_adds_up():
    plan = InputPlan(decoder_inputs())
    check = plan.make(Case(3, 4, "left", past=5), seed=0)
    feeds = check.feeds
    assert feeds["input_ids"].shape == (3, 4) and feeds["attention_mask"].shape == (3, 9)
    assert feeds["past_key_values.0.key"].shape == (3, HEADS, 5, 8)
    assert feeds["input_ids"].max() < VOCAB
    mask = feeds["attention_mask"].astype(bool)
    assert mask[:, -4:].all()  # the new tokens are real; left padding sits in the past
    assert not mask.all()
    # Position ids count the real tokens before each new one, as generation does.
    expected = (np.cumsum(mask, axis=1) - 1)[:, -4:]
    np.testing.assert_array_equal(feeds["position_ids"], expected)
    np.testing.assert_array_equal(check.real, mask[:, -4:])
    np.testing.assert_array_equal(check.real_total, mask)
    assert "past 5" in check.case and "left padding" in check.case


def test_a_cache_of_length_zero():
    feeds = InputPlan(decoder_inputs()).make(Case(2, 6), seed=0).feeds
    assert feeds["past_key_values.0.value"].shape == (2, HEADS, 0, 8) and feeds["attention_mask"].shape == (2, 6)


def test_a_cache_flag_follows_the_cache():
    flag = tensor("use_cache_branch", TensorProto.BOOL, [1])
    branch = helper.make_graph([helper.make_node("Identity", ["use_cache_branch"], ["b_out"])], "b", [],
                               [helper.make_value_info("b_out", helper.TypeProto())])
    decides = helper.make_node("If", ["use_cache_branch"], ["chosen"], then_branch=branch, else_branch=branch)
    model = graph([tensor("input_ids", TensorProto.INT64, ["b", "s"]),
                   tensor("past_key_values.0.key", TensorProto.FLOAT, ["b", HEADS, "p", 8]), flag], nodes=[decides])
    roles = {role.name: role.role for role in read_roles(model)}
    assert roles["use_cache_branch"] == CACHE_FLAG
    plan = InputPlan(model)
    assert plan.make(Case(2, 3, past=4), 0).feeds["use_cache_branch"].tolist() == [True]
    assert plan.make(Case(2, 3), 0).feeds["use_cache_branch"].tolist() == [False]


def test_a_product_of_dims_in_a_cache():
    """BLOOM's caches are [batch x heads, head size, past]; the heads come from the embedding width."""
    table = numpy_helper.from_array(np.zeros((VOCAB, HIDDEN), np.float32), "table")
    model = graph([tensor("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                   tensor("past_key_values.0.key", TensorProto.FLOAT, ["batch_size x num_heads", 8, "past_sequence_length"])],
                  nodes=[helper.make_node("Gather", ["table", "input_ids"], ["embedded"])], initializers=[table])
    feeds = InputPlan(model).make(Case(3, 4, "left", past=6), 0).feeds
    assert feeds["past_key_values.0.key"].shape == (3 * HIDDEN // 8, 8, 6)


def test_image_side_and_channels_from_the_patch_grid():
    """A ViT whose position table holds 14 x 14 patches + 1: 224-pixel images of 3 channels, patch 16."""
    conv_w = numpy_helper.from_array(np.zeros((HIDDEN, 3, 16, 16), np.float32), "patch_w")
    positions = numpy_helper.from_array(np.zeros((1, 14 * 14 + 1, HIDDEN), np.float32), "positions")
    nodes = [helper.make_node("Conv", ["pixel_values", "patch_w"], ["patches"], strides=[16, 16]),
             helper.make_node("Flatten", ["patches"], ["flat"], axis=2),
             helper.make_node("Add", ["flat", "positions"], ["tokens"])]
    model = graph([tensor("pixel_values", TensorProto.FLOAT, ["batch", "channels", "height", "width"])], nodes,
                  [conv_w, positions])
    (role,) = read_roles(model)
    assert role.role == PIXELS
    assert InputPlan(model).make(Case(2, 5), 0).feeds["pixel_values"].shape == (2, 3, 224, 224)


def test_fixed_shapes_still_get_padding():
    model = graph([tensor("input_ids", TensorProto.INT64, [1, 3]), tensor("attention_mask", TensorProto.INT64, [1, 3])])
    plan = InputPlan(model)
    masks = [plan.make(case, seed).feeds["attention_mask"] for seed, case in enumerate([Case(3, 12), Case(2, 9)])]
    assert all(mask.shape == (1, 3) and 0 < mask.sum() < 3 for mask in masks)
    assert plan.make(Case(2, 9, "none"), 0).feeds["attention_mask"].all()


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.BOOL])
def test_float_and_bool_masks(dtype):
    model = graph([tensor("input_ids", TensorProto.INT64, ["b", "s"]), tensor("attention_mask", dtype, ["b", "s"])])
    check = InputPlan(model).make(Case(3, 6), 0)
    mask = check.feeds["attention_mask"]
    assert mask.dtype == (np.float32 if dtype == TensorProto.FLOAT else np.bool_)
    np.testing.assert_array_equal(mask.astype(bool), check.real)
    assert not check.real.all()


def test_a_four_dimensional_mask_hides_padded_keys():
    model = graph([tensor("input_ids", TensorProto.INT64, ["b", "s"]), tensor("attention_mask", TensorProto.INT64,
                                                                           ["b", 1, "s", "s"])])
    check = InputPlan(model).make(Case(3, 6), 0)
    mask = check.feeds["attention_mask"]
    assert mask.shape == (3, 1, 6, 6)
    np.testing.assert_array_equal(mask[:, 0, 0, :].astype(bool), check.real)


def test_sizes_the_user_gives_win():
    model = graph([tensor("pixel_values", TensorProto.FLOAT, ["b", "c", "h", "w"])])
    plan = InputPlan(model, {"pixel_values": [1, 3, 64, 48]})
    assert plan.make(Case(3, 12), 0).feeds["pixel_values"].shape == (1, 3, 64, 48)
    with pytest.raises(UserError, match="does not take as inputs"):
        InputPlan(model, {"pixels": [1, 3, 8, 8]})
    with pytest.raises(UserError, match="3 dims given"):
        InputPlan(model, {"pixel_values": [1, 3, 8]})


def test_row_lengths_pad_a_batch_of_one():
    rng = np.random.default_rng(0)
    assert row_lengths(3, 12, rng)[:2] == [12, 1]
    assert all(0 < length < 7 for length in (row_lengths(1, 7, rng)[0] for _ in range(20)))
    assert min(row_lengths(4, 9, rng, at_least=5)) >= 5


def genai_style_decoder():
    """onnxruntime-genai's builder's shape of a decoder: q, k and v packed into one MatMul feeding
    GroupQueryAttention with its cache; the caches' head size left open ("kv_cache_dim")."""
    rng = np.random.default_rng(0)
    heads, kv_heads, head = 2, 1, 8
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name) for name, shape in
               (("table", (VOCAB, HIDDEN)), ("qkv", (HIDDEN, (heads + 2 * kv_heads) * head)), ("head", (HIDDEN, VOCAB)))]
    weights += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("one", [1]), ("axis", [1]))]
    cache = ["batch_size", kv_heads, "past_sequence_length", "kv_cache_dim"]
    present = ["batch_size", kv_heads, "total_sequence_length", "kv_cache_dim"]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["x"]),
        helper.make_node("MatMul", ["x", "qkv"], ["packed"]),
        helper.make_node("ReduceSum", ["attention_mask", "axis"], ["lengths"], keepdims=0),
        helper.make_node("Sub", ["lengths", "one"], ["last"]),
        helper.make_node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "one"], ["total"], axis=0),
        helper.make_node("Squeeze", ["total"], ["total_scalar"]),
        helper.make_node("Cast", ["total_scalar"], ["total_sequence_length"], to=TensorProto.INT32),
        helper.make_node("GroupQueryAttention", ["packed", "", "", "past_key_values.0.key", "past_key_values.0.value",
                                                 "seqlens_k", "total_sequence_length"],
                         ["attended", "present.0.key", "present.0.value"], domain="com.microsoft",
                         num_heads=heads, kv_num_heads=kv_heads),
        helper.make_node("MatMul", ["attended", "head"], ["logits"]),
    ]
    inputs = [tensor("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              tensor("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
              tensor("past_key_values.0.key", TensorProto.FLOAT, cache),
              tensor("past_key_values.0.value", TensorProto.FLOAT, cache)]
    outputs = [tensor("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", VOCAB]),
               tensor("present.0.key", TensorProto.FLOAT, present), tensor("present.0.value", TensorProto.FLOAT, present)]
    model = helper.make_model(helper.make_graph(nodes, "genai", inputs, outputs, weights),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return load_model(model)


def test_an_open_cache_head_size_is_read_from_the_attention_that_reads_the_cache():
    roles = {role.name: role for role in read_roles(genai_style_decoder())}
    assert roles["past_key_values.0.key"].dims[3].size == 8  # 32 packed columns over 2 + 2 x 1 heads


def test_a_decoder_that_continues_prompts_one_row_at_a_time_is_probed_and_verified():
    """GroupQueryAttention takes several new tokens after a past only for a batch of one: the probe
    continues a prompt so, and the model is optimized and verified."""
    import attnfuse

    from attnfuse.optimizer.io import to_proto

    report = attnfuse.optimize_onnx(to_proto(genai_style_decoder())).report
    assert report.attention_total == report.attention_fused == 1
    assert report.verify.ok and report.verify.max_rel_error == 0
