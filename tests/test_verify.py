"""Check inputs, the probe, output comparison, and rolling back rewrites that change results."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from test_io import VOCAB, toy_attention_model

from attnfuse.core.driver import Applied, Candidate
from attnfuse.core.options import PassOptions
from attnfuse.optimizer import api, optimize_onnx
from attnfuse.optimizer.errors import VerificationError
from attnfuse.optimizer.inputs import make_inputs
from attnfuse.optimizer.io import load_model
from attnfuse.optimizer.probe import Probe
from attnfuse.optimizer.verify import Verifier, check_inputs, compare, vector_cosines, verify
from attnfuse.passes.onnx.padding_free import PER_SEQUENCE_WIDTH
from attnfuse.passes.onnx import Fusion, PassResult

# --- compare -----------------------------------------------------------------

REAL = np.array([[True, True, True], [True, False, False]])


def test_compare_ignores_padded_positions():
    reference = {"hidden": np.ones((2, 3, 4)), "pooled": np.ones((2, 4))}
    candidate = {"hidden": np.ones((2, 3, 4)) * REAL[..., None], "pooled": np.ones((2, 4))}
    assert compare(reference, candidate, REAL) == (0.0, 0.0)


def test_compare_catches_a_difference_at_a_real_position():
    reference = {"hidden": np.full((2, 3, 4), 4.0)}
    candidate = {"hidden": reference["hidden"].copy()}
    candidate["hidden"][1, 0, 2] += 0.5
    assert compare(reference, candidate, REAL) == (0.5, 0.5 / 4.0)


def test_vector_cosines_count_two_zero_vectors_as_equal_and_one_as_apart():
    """A pad id's zero embedding in both models is no disagreement; a vector zeroed in one of them is."""
    reference = {"hidden": np.ones((2, 3, 4))}
    reference["hidden"][0, 1] = 0.0
    candidate = {"hidden": reference["hidden"].copy()}
    (same,) = vector_cosines(reference, candidate, REAL)
    assert np.allclose(same, 1.0)
    candidate["hidden"][1, 0] = 0.0
    (apart,) = vector_cosines(reference, candidate, REAL)
    assert apart.min() == 0.0 and np.sum(apart < 1.0) == 1


def test_compare_counts_every_position_of_outputs_not_shaped_like_the_mask():
    reference, candidate = {"pooled": np.zeros((2, 4))}, {"pooled": np.zeros((2, 4))}
    candidate["pooled"][1, 3] = 1e-3
    max_abs, max_rel = compare(reference, candidate, REAL)
    assert max_abs == pytest.approx(1e-3) and max_rel == pytest.approx(1e-3)  # zero scale: relative = absolute


@pytest.mark.parametrize(
    "candidate",
    [{"hidden": np.ones((2, 4))}, {}, {"hidden": np.array([[1.0, np.nan, 1.0], [1.0, 1.0, 1.0]])}],
    ids=["shape mismatch", "missing output", "nan"],
)
def test_compare_makes_broken_outputs_infinitely_wrong(candidate):
    assert compare({"hidden": np.ones((2, 3))}, candidate, None) == (np.inf, np.inf)


def test_compare_accepts_matching_infinities():
    reference = {"scores": np.array([[0.0, -np.inf], [2.0, -np.inf]])}
    assert compare(reference, {"scores": reference["scores"].copy()}, None) == (0.0, 0.0)


# --- make_inputs ---------------------------------------------------------------


def _model(inputs: list[onnx.ValueInfoProto], nodes=(), initializers=()) -> ir.Model:
    """A graph that passes every input through Identity (plus `nodes`), so each is used."""
    identities = [helper.make_node("Identity", [i.name], [f"{i.name}_out"]) for i in inputs]
    outputs = [helper.make_value_info(f"{i.name}_out", helper.TypeProto()) for i in inputs]
    graph = helper.make_graph([*identities, *nodes], "g", inputs, outputs, list(initializers))
    return load_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_make_inputs_follows_the_input_names():
    model = load_model(toy_attention_model())
    inputs = make_inputs(model, batch=4, seqlen=10, seed=0)
    ids, mask = inputs.feeds["input_ids"], inputs.feeds["attention_mask"]
    assert ids.shape == mask.shape == (4, 10) and ids.dtype == mask.dtype == np.int64
    assert 0 <= ids.min() and ids.max() < VOCAB  # the vocabulary is the embedding table's rows
    lengths = inputs.lengths["attention_mask"]
    assert lengths[:2] == [10, 1] and len(set(lengths)) >= 3
    np.testing.assert_array_equal(mask.sum(axis=1), lengths)
    np.testing.assert_array_equal(inputs.real, mask.astype(bool))
    assert mask[1, 0] == 1  # right padding: real tokens first
    described = {d["name"]: d for d in inputs.describe()}
    assert described["attention_mask"]["lengths"] == lengths and described["input_ids"]["shape"] == [4, 10]


def test_make_inputs_left_padding_puts_real_tokens_last():
    inputs = make_inputs(load_model(toy_attention_model()), batch=3, seqlen=6, seed=0, padding="left")
    mask = inputs.feeds["attention_mask"]
    assert mask[1].tolist() == [0, 0, 0, 0, 0, 1] and mask[0].all()


def test_make_inputs_without_padding_and_the_verifier_checks_such_a_batch():
    model = load_model(toy_attention_model())
    inputs = make_inputs(model, batch=3, seqlen=6, seed=0, padding="none")
    assert inputs.feeds["attention_mask"].all() and inputs.real.all()
    checks = check_inputs(model, Probe.capture(model), seed=0)
    assert [bool(c.real.all()) for c in checks] == [False, False, False, True, False]
    assert checks[-1].feeds["attention_mask"].shape[1] == PER_SEQUENCE_WIDTH  # padding-free's wide branch


def test_the_verifier_leaves_out_a_set_the_original_cannot_take():
    """A wide set the original model fails on (as one with fewer positions would) is left out."""
    model = load_model(toy_attention_model())
    checks = check_inputs(model, Probe.capture(model), seed=0)
    checks[-1].feeds["input_ids"][:] = VOCAB + 100  # past the embedding table: the original fails
    verifier = Verifier(model, PassOptions(), checks)
    assert verifier.inputs_list == checks[:-1] and len(verifier.references) == len(checks) - 1


def test_make_inputs_static_dims_win():
    inputs = make_inputs(load_model(toy_attention_model(batch=2, seq=7)), batch=5, seqlen=30, seed=0)
    assert inputs.feeds["input_ids"].shape == inputs.feeds["attention_mask"].shape == (2, 7)


def test_make_inputs_for_token_types_positions_pixels_and_others():
    token_types = helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["b", "s"])
    type_table = helper.make_tensor("type_table", TensorProto.FLOAT, [2, 3], np.zeros(6))
    model = _model(
        [
            token_types,
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "s"]),
            helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["b", 3, "h", "w"]),
            helper.make_tensor_value_info("past_length", TensorProto.INT32, []),
            helper.make_tensor_value_info("noise", TensorProto.FLOAT16, ["b", 5]),
        ],
        nodes=[helper.make_node("Gather", ["type_table", "token_type_ids"], ["types"])],
        initializers=[type_table],
    )
    feeds = make_inputs(model, batch=2, seqlen=6, seed=0).feeds
    assert feeds["token_type_ids"].tolist() == [[0, 0, 0, 1, 1, 1]] * 2  # two types: sentence A, then B
    assert feeds["position_ids"].tolist() == [list(range(6))]
    assert feeds["pixel_values"].shape == (2, 3, 224, 224) and feeds["pixel_values"].std() > 0.5
    assert feeds["past_length"].dtype == np.int32 and feeds["past_length"] == 0
    assert feeds["noise"].dtype == np.float16 and feeds["noise"].shape == (2, 5)


# --- probe -----------------------------------------------------------------------


def test_probe_sees_every_tensor_and_leaves_the_model_alone():
    model = load_model(toy_attention_model())
    before = ir.to_proto(model).SerializeToString()
    probe = Probe.capture(model)
    assert ir.to_proto(model).SerializeToString() == before
    assert probe.shape("scores", run=0) == (3, 12, 12) and probe.shape("scores", run=1) == (2, 9, 9)
    assert probe.inputs(1).feeds["input_ids"].shape == (2, 9)
    assert probe.is_constant("scale") and probe.is_constant("wq")  # initializers
    assert not probe.is_constant("mask_bias") and probe.get("no such tensor") is None
    np.testing.assert_allclose(probe.get("mask_bias", run=1), (1 - probe.inputs(1).feeds["attention_mask"]) * -10000.0)


# --- verify and roll back ---------------------------------------------------------


def _fake_passes(bad: str, wrong_when_excluded: bool = False):
    """A stand-in for run_passes: 'fuses' ok_fusion harmlessly and `bad` by doubling wq (a
    wrong rewrite); excluded candidates are left alone, unless the damage is elsewhere."""

    def run_passes(model, probe, options, excluded=()):
        candidates = [Candidate("fake", name) for name in ("ok_fusion", bad)]
        if Candidate("fake", bad) not in excluded or wrong_when_excluded:
            wq = model.graph.initializers["wq"]
            wq.const_value = ir.tensor(wq.const_value.numpy() * 2)
        return PassResult([Applied(c, Fusion(c.anchor, "Fake", fused=c not in excluded)) for c in candidates])

    return run_passes


def test_verify_reports_the_error_of_a_wrong_rewrite():
    original = load_model(toy_attention_model())
    probe = Probe.capture(original)
    changed = original.clone()
    _fake_passes("bad")(changed, probe, None)
    options = PassOptions()
    result = verify(original, changed, options, [probe.inputs(0), probe.inputs(1)])
    assert not result.ok and result.max_rel_error > result.tolerance == 1e-4 and len(result.inputs) == 2
    assert verify(original, original.clone(), options, [probe.inputs(0)]).ok


def test_a_wrong_rewrite_is_rolled_back(monkeypatch):
    monkeypatch.setattr(api, "run_passes", _fake_passes("bad"))
    result = optimize_onnx(toy_attention_model())
    assert result.report.verify.ok and result.report.rolled_back == ["bad"]
    fusions = {f.name: f for f in result.report.fusions}
    assert fusions["ok_fusion"].fused and not fusions["bad"].fused
    assert fusions["bad"].reason.startswith("rolled back: max relative error")


def test_a_failure_that_nothing_explains_raises_unless_forced(monkeypatch):
    monkeypatch.setattr(api, "run_passes", _fake_passes("bad", wrong_when_excluded=True))
    with pytest.raises(VerificationError, match="verification failed: max relative error") as error:
        optimize_onnx(toy_attention_model())
    assert error.value.report.verify.ok is False
    forced = optimize_onnx(toy_attention_model(), force=True)
    assert forced.report.verify.ok is False and forced.model.graph.initializers["wq"].const_value is not None

