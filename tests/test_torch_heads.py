"""attnfuse.optimize on models as people load them: AutoModel with its pooler, the
transformers task heads, and sentence-transformers models.

Each is optimized from an example without padding, must run padding-free, and must
equal the original on right- and left-padded batches: [batch, seq, ...] outputs at
real tokens, every other output (pooler output, a sequence classifier's logits,
sentence embeddings) whole.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import transformers

import attnfuse
from attnfuse.models import minilm, zoo

TOLERANCE = 1e-5
ENCODERS = ("bert", "roberta", "distilbert", "albert", "electra")
HEADS = ("AutoModel", "AutoModelForSequenceClassification", "AutoModelForTokenClassification", "AutoModelForMaskedLM")


def encoder(family: str, head: str, **config_changes) -> torch.nn.Module:
    """The zoo family's tiny config under a transformers auto class, random weights."""
    config = copy.deepcopy(zoo.build_torch(family, "sdpa").model.config)
    for name, value in config_changes.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = getattr(transformers, head).from_config(config).eval()
    zoo.randomise_vectors(model)
    return model


def unpadded_example(family: str) -> dict[str, torch.Tensor]:
    return zoo.example_inputs(family, batch=2, seqlen=8, lengths=[8, 8])


def right_and_left_padded(family: str) -> list[dict[str, torch.Tensor]]:
    right = zoo.example_inputs(family, batch=4, seqlen=11, seed=3)  # rows of 11, 8, 4 and 1 tokens
    return [right, {name: value.flip(1) for name, value in right.items()}]


def padding_free(report) -> attnfuse.core.outcome.Fusion:
    return next(f for f in report.fusions if f.name == "padding-free")


def assert_outputs_equal(got, want, mask: torch.Tensor) -> None:
    assert type(got) is type(want) and list(got.keys()) == list(want.keys())
    real = mask.bool()
    for name in want.keys():
        expected, actual = want[name], got[name]
        assert actual.shape == expected.shape, name
        if expected.shape[:2] == real.shape:
            expected, actual = expected[real], actual[real]
        error = float((actual - expected).abs().max() / expected.abs().max())
        assert error <= TOLERANCE, f"{name}: relative error {error:.1e}"


# Every head on BERT; on the other families the heads whose modules are their own (the sequence
# classifier reads the first token each its own way; the masked-LM heads differ too).
HEAD_CASES = [("bert", head) for head in HEADS] + [
    (family, head) for family in ENCODERS[1:] for head in HEADS if head.endswith(("SequenceClassification", "MaskedLM"))]


@pytest.mark.parametrize("family, head", HEAD_CASES)
def test_task_heads_run_padding_free_and_equal_eager(family, head):
    model = encoder(family, head)
    optimized = attnfuse.optimize(model, example_kwargs=unpadded_example(family))
    assert padding_free(optimized.report).fused, padding_free(optimized.report).reason
    assert optimized.report.attention_fused == optimized.report.attention_total == 2
    assert optimized.config is model.config
    # A pooler or classifier reads the first token: the packed graph runs when it is real.
    reads_first_token = head == "AutoModelForSequenceClassification" or getattr(model, "pooler", None) is not None
    assert optimized.graphs.real_positions == ([0] if reads_first_token else [])
    right, left = right_and_left_padded(family)
    with torch.no_grad():
        for batch in (right, left):
            assert_outputs_equal(optimized(**batch), model(**batch), batch["attention_mask"])
        if not reads_first_token:  # padded positions of a packed graph's outputs are zero
            got = optimized(**right)
            assert all(torch.all(got[name][~right["attention_mask"].bool()] == 0) for name in got.keys())


def test_a_module_that_reads_the_first_token_exports_its_fused_graph_to_onnx():
    import onnxruntime as ort

    model = encoder("bert", "AutoModelForSequenceClassification")
    optimized = attnfuse.optimize(model, example_kwargs=unpadded_example("bert"))
    right, left = right_and_left_padded("bert")
    dims = {name: {0: "batch", 1: "sequence"} for name in right}
    program = torch.onnx.export(optimized, (), kwargs=right, dynamo=True, dynamic_shapes=dims)
    fused = [n.op_type for n in program.model_proto.graph.node if n.domain == "com.microsoft"]
    assert fused.count("MultiHeadAttention") == 2
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (right, left):
        got = session.run(None, {name: value.numpy() for name, value in batch.items()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(**batch).logits.numpy(), rtol=1e-4, atol=1e-6)


class PlainMean(torch.nn.Module):
    """A BERT whose sentence vector averages every position, padded ones too."""

    def __init__(self):
        super().__init__()
        self.bert = encoder("bert", "AutoModel")

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean(1)


def test_a_reader_of_padded_positions_rolls_padding_free_back_and_says_why():
    model = PlainMean().eval()
    optimized = attnfuse.optimize(model, example_kwargs=unpadded_example("bert"))
    fusion = padding_free(optimized.report)
    assert not fusion.fused and "rolled back" in fusion.reason and "max relative error" in fusion.reason
    assert "padding-free" in optimized.report.rolled_back
    assert optimized.report.fused_ops.get("attention") == 2
    for batch in right_and_left_padded("bert"):
        with torch.no_grad():
            torch.testing.assert_close(optimized(**batch), model(**batch), rtol=TOLERANCE, atol=1e-6)


def test_a_call_with_other_inputs_runs_the_original_and_warns():
    model = encoder("bert", "AutoModelForSequenceClassification")
    optimized = attnfuse.optimize(model, example_kwargs=unpadded_example("bert"))
    batch = right_and_left_padded("bert")[0]
    other = dict(batch, token_type_ids=torch.zeros_like(batch["input_ids"]))
    with torch.no_grad(), pytest.warns(UserWarning, match="other inputs run the original model"):
        got = optimized(**other)
    with torch.no_grad():
        assert torch.equal(got.logits, model(**other).logits)
        assert_outputs_equal(optimized(**batch, token_type_ids=None), model(**batch), batch["attention_mask"])


# ---------------------------------------------------------------------------
# sentence-transformers
# ---------------------------------------------------------------------------


def sentence_transformer(family: str, pooling: str, folder) -> object:
    """A SentenceTransformer built from local modules: a tiny model saved with MiniLM's tokenizer, and Pooling."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    encoder(family, "AutoModel", vocab_size=minilm.tokenizer().vocab_size).save_pretrained(folder)
    minilm.tokenizer().save_pretrained(folder)
    transformer = Transformer(str(folder))
    pooling_module = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
    return SentenceTransformer(modules=[transformer, pooling_module], device="cpu")


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


@pytest.mark.parametrize("family, pooling", [("bert", "mean"), ("bert", "cls"), ("bert", "max"), ("distilbert", "cls")])
def test_sentence_transformer_encode_equals_the_original(family, pooling, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = sentence_transformer(family, pooling, tmp_path)
    optimized = attnfuse.optimize(model)
    assert isinstance(optimized, SentenceTransformer)
    assert isinstance(optimized[0].auto_model, attnfuse.OptimizedModule)
    assert not isinstance(model[0].auto_model, attnfuse.OptimizedModule)  # the original is left as it was
    assert padding_free(optimized.report).fused and optimized.report.verify.ok
    sentences = minilm.SENTENCES[:12]
    for side in ("right", "left"):  # the tokenizer is shared: both pad the same way
        model.tokenizer.padding_side = side
        want = model.encode(sentences, batch_size=8)
        got = optimized.encode(sentences, batch_size=8)
        assert got.shape == want.shape
        assert min_cosine(got, want) > 0.99999
        assert np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()


def test_real_minilm_sentence_transformer():
    model = minilm.load_sentence_transformer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every call reaches the optimized graphs
        optimized = attnfuse.optimize(model)
        got = optimized.encode(minilm.SENTENCES, batch_size=32)
    assert optimized.report.fused_ops.get("packed_attention") == 6
    want = model.encode(minilm.SENTENCES, batch_size=32)
    assert min_cosine(got, want) > 0.99999


def test_sentence_transformer_takes_an_example_as_sentences_or_features(tmp_path):
    from attnfuse.optimizer.errors import UserError

    model = sentence_transformer("distilbert", "mean", tmp_path)
    with pytest.raises(UserError, match="as sentences or as its tokenized features"):
        attnfuse.optimize(model, example_inputs=([1, 2, 3],))
    optimized = attnfuse.optimize(model, example_kwargs=model.preprocess(["One sentence, so no padding."]))
    assert padding_free(optimized.report).fused
    sentences = minilm.SENTENCES[:6]
    assert min_cosine(optimized.encode(sentences), model.encode(sentences)) > 0.99999
