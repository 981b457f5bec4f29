"""Attention in many spellings: every one is found and fused; things that are not
attention are left alone. The graphs come from `tests/spellings.py`."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from spellings import (
    BOOSTING_PADDING,
    DEFECTS,
    NEGATIVE_BASE,
    ONE_CHANGE_EACH,
    TOLERANCE,
    Spelling,
    attention_inputs,
    attention_weights,
    build_attention_graph,
    build_not_attention,
    reference_attention,
    scale_value,
    spelling_choices,
)

spellings = st.builds(Spelling, **{name: st.sampled_from(options) for name, options in spelling_choices().items()})


@st.composite
def padded_shapes(draw):
    """(lengths, seq): a full row, a row of length 1, and maybe one more of any length."""
    seq = draw(st.integers(1, 8))
    extra = draw(st.lists(st.integers(1, seq), max_size=1))
    return [seq, 1, *extra], seq


def stable(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no explain phase: it is slow
        suppress_health_check=[HealthCheck.too_slow],
    )


def run(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], feeds)[0]


def optimize(model):
    from attnfuse import optimize_onnx  # imported here: the builder tests need no matcher

    return optimize_onnx(model, verify=False)


def assert_close_on_real_positions(actual, expected, feeds, tolerance):
    """Within `tolerance` of the expected output's largest magnitude, at positions with mask 1."""
    real = feeds["attention_mask"].astype(bool) if "attention_mask" in feeds else np.ones(expected.shape[:2], bool)
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    error = float(np.abs(actual[real] - expected[real]).max())
    limit = tolerance * float(np.abs(expected[real]).max())
    assert error <= limit, f"max abs error {error:.3g} on real positions, allowed {limit:.3g}"


def expected_mask(spec: Spelling) -> str:
    if spec.causal == "none":
        return "key_padding" if spec.has_padding else "none"
    return "causal+key_padding" if spec.has_padding else "causal"


# ------------------------------------------------------------------- the builder


def check_builder(spec: Spelling, lengths: list[int], seq: int):
    model = build_attention_graph(spec, len(lengths), seq)
    onnx.checker.check_model(model, full_check=True)
    feeds = attention_inputs(spec, lengths, seq)
    expected = reference_attention(spec, attention_weights(spec), feeds["x"], feeds.get("attention_mask"))
    got = run(model, feeds)
    assert got.dtype == np.dtype(spec.dtype)
    if spec.dtype == "float32":
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    else:  # float16 weights are rounded, so the whole output is within float16's tolerance
        assert_close_on_real_positions(got, expected, feeds, TOLERANCE[spec.dtype])


@stable(30)
@given(spec=spellings, shape=padded_shapes())
def test_builder_matches_numpy(spec, shape):
    check_builder(spec, *shape)


@pytest.mark.parametrize("change", ONE_CHANGE_EACH)
def test_builder_matches_numpy_for_each_choice(change):
    check_builder(ONE_CHANGE_EACH[change], [6, 1, 4], 6)


@pytest.mark.parametrize("defect", DEFECTS + (BOOSTING_PADDING,))
def test_negative_graphs_are_not_the_attention(defect):
    """The negative builders really change the result (else their tests prove nothing)."""
    feeds = attention_inputs(NEGATIVE_BASE, [5, 1, 3], 5)
    attention = reference_attention(NEGATIVE_BASE, attention_weights(NEGATIVE_BASE), feeds["x"], feeds["attention_mask"])
    changed = run(build_not_attention(defect), feeds)
    assert not np.allclose(changed, attention, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------- the matcher


def check_fused_and_equal(spec: Spelling, lengths: list[int], seq: int):
    model = build_attention_graph(spec, len(lengths), seq)
    result = optimize(model)
    report = result.report

    assert report.attention_total == 1, report.to_dict()["attention"]
    site = report.sites[0]
    assert site.fused, site.reason
    assert (site.num_heads, site.head_size) == (spec.heads, spec.head_size)
    # A float16 scale is rounded to 11 significant bits.
    assert site.scale == pytest.approx(scale_value(spec), rel=1e-5 if spec.dtype == "float32" else 1e-3)
    assert site.mask == expected_mask(spec)
    assert site.causal == (spec.causal != "none")
    assert site.bias == ("none" if spec.alibi == "none" else "alibi")
    assert report.to_dict()["attention"]["fused"] == 1

    feeds = attention_inputs(spec, lengths, seq, seed=1)
    got = run(result.proto, feeds)
    assert got.dtype == np.dtype(spec.dtype)
    assert_close_on_real_positions(got, run(model, feeds), feeds, tolerance=TOLERANCE[spec.dtype])


@stable(40)
@given(spec=spellings, shape=padded_shapes())
def test_every_spelling_is_fused_and_equal(spec, shape):
    check_fused_and_equal(spec, *shape)


@pytest.mark.parametrize("change", ONE_CHANGE_EACH)
def test_each_choice_is_fused_and_equal(change):
    """One field changed at a time: a failure here names the spelling the matcher misses."""
    check_fused_and_equal(ONE_CHANGE_EACH[change], [6, 1, 4], 6)


@pytest.mark.parametrize("defect", DEFECTS)
def test_not_attention_is_not_fused(defect):
    model = build_not_attention(defect)
    result = optimize(model)
    assert result.report.attention_fused == 0, result.report.to_dict()["attention"]

    feeds = attention_inputs(NEGATIVE_BASE, [5, 1, 3], 5)
    assert_close_on_real_positions(run(result.proto, feeds), run(model, feeds), feeds, tolerance=1e-4)


def test_boosting_padding_is_not_a_padding_mask():
    """(1 - m) * +10000 is an additive bias that favours the padding: still attention, so it
    may be fused, but only as what it is, never as a key-padding mask.

    The tolerance is 1e-2: scores near 10000 are rounded to fp32 steps of 1/1024, so two
    correct implementations that add in different orders differ by about 1e-3."""
    model = build_not_attention(BOOSTING_PADDING)
    result = optimize(model)
    for site in result.report.sites:
        assert not (site.fused and site.mask in ("key_padding", "causal+key_padding")), site.summary()

    feeds = attention_inputs(NEGATIVE_BASE, [5, 1, 3], 5)
    assert_close_on_real_positions(run(result.proto, feeds), run(model, feeds), feeds, tolerance=1e-2)
