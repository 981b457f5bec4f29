"""The decoder zoo is right: every export, run in ONNX Runtime, computes what the torch model
computes (outputs and present k/v at real positions) on left-padded prompts and on decode steps
over caches of several lengths, and a with-cache export generates what transformers generates.
Cases that cannot be exported are listed with a reason that is checked to still hold."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch

from attnfuse.models import decoders
from attnfuse.models.decoders import CASES, DECODES, PREFILL, cases, families, generate, inputs, wrappers
from attnfuse.models._export import EXPORTERS

TOLERANCE = 1e-4  # relative to the largest magnitude of each output, on real positions


def steps(case: decoders.DecoderCase) -> tuple[inputs.Step, ...]:
    return (PREFILL, *DECODES) if case.cache == wrappers.PAST_MODE else (PREFILL,)


@functools.lru_cache(maxsize=None)
def torch_outputs(family: str, attention: str, cache: str) -> list[tuple[dict, list[np.ndarray]]]:
    """The torch model's outputs on each step; shared by the two exporters' cases."""
    case = decoders.DecoderCase(family, "dynamo", attention, cache)
    module = decoders.build_torch(case)
    results = []
    for step in steps(case):
        feeds = decoders.example(case, step, seed=1)
        with torch.no_grad():
            out = module(*feeds.values())
        out = out if isinstance(out, tuple) else (out,)
        results.append(({k: v.numpy() for k, v in feeds.items()}, [o.numpy() for o in out]))
    return results


def relative_error(name: str, feeds: dict, expected: np.ndarray, got: np.ndarray) -> float:
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    real = np.broadcast_to(decoders.real_positions(name, feeds, expected), expected.shape)
    return float(np.abs(expected - got)[real].max() / np.abs(expected[real]).max())


def test_every_family_exporter_attention_and_cache_is_listed():
    expected = {(f, e, a) for f in families.FAMILIES for e in EXPORTERS for a in cases.ATTENTIONS}
    assert {(c.family, c.exporter, c.attention) for c in CASES} == expected
    assert {c.cache for c in CASES if c.kind == families.CAUSAL} == {"none", "past"}
    assert {c.cache for c in CASES if c.kind == families.SEQ2SEQ} == {"none", "first", "past"}
    unavailable = {c.id for c in CASES if c.unavailable}
    assert unavailable == {f"gemma2-{e}-sdpa-{cache}" for e in EXPORTERS for cache in ("none", "past")} | {
        f"whisper-torchscript-{a}-none" for a in cases.ATTENTIONS}


@pytest.mark.parametrize("refusal", cases.REFUSALS, ids=lambda r: f"{r.family}-{r.exporter}-{r.attention}-{r.cache}")
def test_refusal_still_holds(refusal, tmp_path):
    """Each unavailable case fails as its reason says; when a new release lifts the limit, this
    fails and the cases become exportable."""
    case = next(c for c in CASES if refusal.matches(c))
    with pytest.raises(Exception, match=refusal.error):
        cases.export(case, tmp_path / "refused.onnx")
    with pytest.raises(ValueError, match="cannot be exported"):
        decoders.exported(case)


@pytest.mark.parametrize("case", decoders.AVAILABLE, ids=lambda c: c.id)
def test_export_equals_torch(case):
    path = decoders.exported(case)
    sig = decoders.signature(case)
    session = generate.session(path)
    assert [i.name for i in session.get_inputs()] == sig.input_names
    assert [o.name for o in session.get_outputs()] == sig.output_names
    for feeds, expected in torch_outputs(case.family, case.attention, case.cache):
        got = session.run(None, feeds)
        for name, want, have in zip(sig.output_names, expected, got):
            error = relative_error(name, feeds, want, have)
            assert error <= TOLERANCE, (name, feeds["input_ids"].shape, error)


def dim_names(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("case", decoders.AVAILABLE, ids=lambda c: c.id)
def test_dim_names(case):
    """Inputs carry the names given to the exporter (Optimum's); present k/v grow as past + sequence."""
    graph = onnx.load(decoders.exported(case), load_external_data=False).graph
    dims = decoders.signature(case).dynamic_dims
    names = wrappers.dims_of(case.kind)
    for value in graph.input:
        named = {axis: name for axis, name in enumerate(dim_names(value)) if isinstance(name, str)}
        assert named == dims[value.name], value.name
    for value in graph.output:
        written = dim_names(value)
        assert written[0] == names.batch, value.name
        if value.name.startswith("present.") and ".encoder." not in value.name:
            grows = names.total if case.cache == wrappers.PAST_MODE else names.sequence
            # dynamo writes the sum in either order
            assert written[2] in (grows, f"{names.sequence} + {names.past}"), (value.name, written)


CACHED = [c for c in decoders.AVAILABLE if c.cache == wrappers.PAST_MODE]


@functools.lru_cache(maxsize=None)
def torch_generation(family: str, attention: str) -> np.ndarray:
    """transformers' greedy tokens: for a causal LM its own generate on a left-padded batch
    (prompts of 7, 3, 1 and 5 tokens), for a seq2seq decoder its own forward and cache one token
    at a time over an encoder output padded to 6, 2, 1 and 4 positions."""
    model = families.build(family, attention)
    if families.FAMILIES[family].kind == families.CAUSAL:
        return generate.greedy_torch_causal(model, causal_prompt())
    return generate.greedy_torch_seq2seq(model, encoder_output(family), model.config.decoder_start_token_id)


def causal_prompt() -> dict[str, np.ndarray]:
    return generate.causal_prompt((7, 3, 1, 5), seed=3)


def encoder_output(family: str) -> dict[str, np.ndarray]:
    return generate.encoder_output((6, 2, 1, 4), families.HIDDEN, seed=3, masked=family == "t5")


@pytest.mark.parametrize("case", CACHED, ids=lambda c: c.id)
def test_greedy_generation_equals_transformers(case):
    """20 greedy tokens from the with-cache export equal transformers' own."""
    expected = torch_generation(case.family, case.attention)
    if case.kind == families.CAUSAL:
        got = generate.greedy_causal(decoders.exported(case), causal_prompt())
    else:
        first = decoders.exported(cases.DecoderCase(case.family, case.exporter, case.attention, wrappers.FIRST))
        start = cases.config(case).decoder_start_token_id
        got = generate.greedy_seq2seq(first, decoders.exported(case), encoder_output(case.family), start)
    assert expected.shape == (4, generate.NEW_TOKENS)
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(expected)) > 4  # tokens that vary, so a wrong step shows


def prefill_logits(family: str, **config_changes) -> torch.Tensor:
    """Logits of the family's model (eager) on the padded prefill, with config fields changed."""
    model = families.build(family, "eager", **config_changes)
    feeds = decoders.example(decoders.DecoderCase(family, "dynamo", "eager", "none"), PREFILL, seed=1)
    with torch.no_grad():
        return model(**feeds).logits


@pytest.mark.parametrize("family, change", [
    ("mistral", dict(sliding_window=None)),
    ("gemma2", dict(sliding_window=4096)),
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(query_pre_attn_scalar=16)),
    ("phi", dict(partial_rotary_factor=1.0)),
])
def test_what_distinguishes_a_family_shows_on_the_test_inputs(family, change):
    """The window, the soft-cap, the scale and the partial rotary each change the logits well
    beyond the tolerance on the prefill batch, so a rewrite that dropped one would be caught."""
    base, changed = prefill_logits(family), prefill_logits(family, **change)
    real = torch.from_numpy(inputs.left_padded_mask(PREFILL.lengths, PREFILL.new).bool().numpy())
    assert float((base - changed)[real].abs().max() / base[real].abs().max()) > 100 * TOLERANCE
