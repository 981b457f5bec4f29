"""attnfuse.optimize on modern decoders: grouped-query attention, rotary embeddings, RMSNorm, KV caches.

The decoder zoo's tiny models (hidden 64, 2 layers, 4 query heads, random weights;
`attnfuse.models.decoders`), called through transformers' own API, of six families, each
with what makes it differ: llama (GQA), qwen2 (q/k/v biases), phi3 (one fused qkv
projection), phi (partial rotary, layernorm), gemma (multi-query, head size 32, norm
weight as 1 + w), mistral (sliding window). Every attention site must be fused, and the
optimized module must equal the model (hidden states and present k/v, at real tokens)
on padded batches: without a cache, on a prompt that returns one, and on decode steps
with caches of several lengths. Constructs attnfuse cannot lower are refused with their
reason, and spellings that only look like a rotary or an RMSNorm are not fused.
"""
from __future__ import annotations

import collections
import copy
import inspect

import onnxruntime as ort
import pytest
import torch
import transformers
from transformers import DynamicCache

import attnfuse
from attnfuse.models.decoders import families
from attnfuse.models.wrappers import TextModel

TOLERANCE = 1e-4
VOCAB = families.VOCAB
WINDOW = families.WINDOW
# transformers 5.24 names the cache argument `cache` (past_key_values still works, through **kwargs).
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters else "past_key_values"
# family -> (expected kv heads, head size, rotary fraction, RMSNorm)
FAMILIES = {
    "llama": (2, 16, 1.0, True),
    "qwen2": (2, 16, 1.0, True),
    "phi3": (2, 16, 1.0, True),
    "phi": (4, 16, 0.5, False),
    "gemma": (1, 32, 1.0, True),
    "mistral": (2, 16, 1.0, True),
}


def decoder(family: str, attention: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """The zoo's model of the family without its LM head: [B, S, hidden] states and the cache."""
    return families.build(family, attention, seed, **overrides).model


def batch(rows: int, length: int, seed: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Ids and a mask whose rows run from full down to one token, padded on the right or the left."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [length - round(i * (length - 1) / max(rows - 1, 1)) for i in range(rows)]
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    mask = mask.flip(1) if left else mask
    return {"input_ids": torch.randint(2, VOCAB, (rows, length), generator=generator), "attention_mask": mask}


def relative_error(got: torch.Tensor, want: torch.Tensor, real: torch.Tensor) -> float:
    return float((got - want)[real].abs().max() / want[real].abs().max())


def cache_error(got: DynamicCache, want: DynamicCache, mask: torch.Tensor) -> float:
    """The worst relative error of the present keys and values at the mask's real positions."""
    real = mask.bool()[:, None, :, None].expand_as(want.layers[0].keys)
    return max(relative_error(g, w, real) for gl, wl in zip(got.layers, want.layers)
               for g, w in ((gl.keys, wl.keys), (gl.values, wl.values)))


def assert_sites_fused(report, family: str, cache: str) -> None:
    kv_heads, head_size, fraction, _ = FAMILIES[family]
    assert report.attention_total == 2 and report.attention_fused == 2, [s.reason for s in report.sites]
    for site in report.sites:
        summary = site.summary()
        assert (summary["num_heads"], summary["kv_heads"], summary["cache"]) == (4, kv_heads, cache)
        assert summary["rotary"] == {"kind": "half", "dim": int(head_size * fraction), "fraction": fraction}
    assert report.fused_ops.get("rotary") == 4
    assert report.verify.ok and report.verify.max_rel_error <= TOLERANCE


@pytest.fixture(scope="module", params=list(FAMILIES))
def without_cache(request):
    family = request.param
    model = TextModel(decoder(family), use_cache=False).eval()
    return family, model, attnfuse.optimize(model, example_kwargs=batch(2, 8, seed=0))


def test_every_site_is_fused_and_runs_padding_free(without_cache):
    family, _, optimized = without_cache
    report = optimized.report
    assert_sites_fused(report, family, "none")
    rms = FAMILIES[family][3]
    assert (report.fused_ops.get("rms_norm", 0), report.fused_ops.get("skip_rms_norm", 0)) == ((1, 4) if rms else (0, 0))
    assert report.fused_ops.get("packed_attention") == 2
    padding_free = next(f for f in report.fusions if f.name == "padding-free")
    assert padding_free.fused, padding_free.reason
    if family == "mistral":
        assert {(s.mask, s.window) for s in report.sites} == {("window", (WINDOW - 1, 0))}


@pytest.mark.parametrize("rows, length, left", [(3, 11, False), (4, 9, True), (1, 5, False)])
def test_equals_the_model_on_padded_batches(without_cache, rows, length, left):
    _, model, optimized = without_cache
    inputs = batch(rows, length, seed=7, left=left)
    with torch.no_grad():
        assert relative_error(optimized(**inputs), model(**inputs), inputs["attention_mask"].bool()) <= TOLERANCE


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_prompt_that_returns_its_cache(family):
    model = decoder(family, attention="eager" if family in ("qwen2", "phi") else "sdpa")
    optimized = attnfuse.optimize(model, example_kwargs={**batch(2, 8, seed=0), "use_cache": True})
    assert_sites_fused(optimized.report, family, "none")
    inputs = {**batch(3, 10, seed=5, left=True), "use_cache": True}
    with torch.no_grad():
        want, got = model(**inputs), optimized(**inputs)
    assert type(got.past_key_values) is type(want.past_key_values)
    real = inputs["attention_mask"].bool()
    assert relative_error(got.last_hidden_state, want.last_hidden_state, real) <= TOLERANCE
    # Mistral's own cache keeps the window's last positions only: those are compared.
    assert cache_error(got.past_key_values, want.past_key_values, inputs["attention_mask"][:, -want.past_key_values.layers[0].keys.shape[2]:]) <= TOLERANCE


def family_of(model: torch.nn.Module) -> str:
    return model.config.model_type


def decode_step(model, rows: int, past: int, seed: int, name: str = CACHE, positions: bool = False) -> dict:
    """One new token after a left-padded prompt of `past` positions (a cache made by the model
    itself; an empty one for past 0), the mask covering the cache and the new token; with
    `positions`, position ids counted over the real tokens, as generation passes them."""
    prompt = batch(rows, past, seed=seed, left=True) if past else None
    if prompt is None:
        kv_heads, head_size, *_ = FAMILIES[family_of(model)]
        empty = [torch.zeros(rows, kv_heads, 0, head_size)] * 2
        cache = DynamicCache(ddp_cache_data=[tuple(empty)] * model.config.num_hidden_layers)
        mask = torch.ones(rows, 1, dtype=torch.long)
    else:
        with torch.no_grad():  # a cache made without the config: no sliding-window layers
            cache = model(**prompt, **{CACHE: DynamicCache()}, use_cache=True).past_key_values
        mask = torch.cat([prompt["attention_mask"], torch.ones(rows, 1, dtype=torch.long)], 1)
    ids = torch.randint(2, VOCAB, (rows, 1), generator=torch.Generator().manual_seed(seed + 1))
    step = {"input_ids": ids, "attention_mask": mask, name: cache, "use_cache": True}
    if positions:
        step["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)[:, -1:]
    return step


# Llama's steps pass the cache by its old name, through the model's **kwargs, and position ids.
@pytest.mark.parametrize("family, name", [(f, "past_key_values" if f == "llama" else CACHE) for f in FAMILIES])
def test_decode_steps_with_caches_of_several_lengths(family, name):
    model = decoder(family)
    positions = family == "llama"
    optimized = attnfuse.optimize(model, example_kwargs=decode_step(model, 2, 6, seed=0, name=name, positions=positions))
    assert_sites_fused(optimized.report, family, "past")
    for rows, past in ((3, 9), (2, 1), (4, 4), (2, 0)):
        step = decode_step(model, rows, past, seed=past, name=name, positions=positions)
        with torch.no_grad():
            want, got = model(**copy.deepcopy(step)), optimized(**step)
        new_token = step["attention_mask"][:, -1:].bool()
        assert relative_error(got.last_hidden_state, want.last_hidden_state, new_token) <= TOLERANCE
        assert cache_error(got.past_key_values, want.past_key_values, step["attention_mask"]) <= TOLERANCE


def test_a_sliding_window_cache_is_refused_with_its_reason():
    model = decoder("mistral")
    prompt = batch(2, 6, seed=0)
    with torch.no_grad():
        cache = model(**prompt, use_cache=True).past_key_values  # made with the config: sliding layers
    step = {"input_ids": torch.randint(2, VOCAB, (2, 1)), CACHE: cache, "use_cache": True,
            "attention_mask": torch.cat([prompt["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)}
    with pytest.raises(attnfuse.optimizer.errors.UserError, match="pass a DynamicCache"):
        attnfuse.optimize(model, example_kwargs=step)


def test_gemma2_soft_capping_is_refused_with_its_reason():
    model = decoder("gemma2", attention="eager")
    cap = model.config.attn_logit_softcapping
    wrapped = TextModel(model, use_cache=False).eval()
    optimized = attnfuse.optimize(wrapped, example_kwargs=batch(2, 8, seed=0))
    report = optimized.report
    assert report.attention_total == 2 and report.attention_fused == 0
    for site in report.sites:
        assert "soft-capped" in site.reason and site.summary()["softcap"] == pytest.approx(cap)
    assert report.fused_ops.get("rotary") == 4 and report.fused_ops.get("rms_norm") == 5
    inputs = batch(3, 10, seed=2, left=True)
    with torch.no_grad():
        assert relative_error(optimized(**inputs), wrapped(**inputs), inputs["attention_mask"].bool()) <= TOLERANCE


def exported(optimized, inputs: dict, dims: dict, attention: str, rms: bool = True) -> ort.InferenceSession:
    """The optimized module through torch.onnx.export, with its fused ops as ONNX Runtime's: `attention`
    the op the ONNX path writes too (GroupQueryAttention for grouped heads or a decode step's cache)."""
    program = torch.onnx.export(optimized, (), kwargs=copy.deepcopy(inputs), dynamo=True, dynamic_shapes=dims)
    ops = collections.Counter(node.op_type for node in program.model_proto.graph.node)
    assert ops[attention] == 2, ops
    assert ops["RotaryEmbedding"] == 4
    if rms:
        assert ops["SimplifiedLayerNormalization"] == 1 and ops["SkipSimplifiedLayerNormalization"] == 4
    return ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("family", ["llama", "phi"])  # grouped-query; partial rotary (and LayerNorm)
def test_the_onnx_export_of_an_optimized_decoder_runs_in_onnx_runtime(family):
    model = TextModel(decoder(family), use_cache=False).eval()
    optimized = attnfuse.optimize(model, example_kwargs=batch(2, 8, seed=0))
    dims = {name: {0: "batch", 1: "sequence"} for name in batch(1, 1, 0)}
    grouped = FAMILIES[family][0] < 4
    session = exported(optimized, batch(3, 8, seed=3), dims, "GroupQueryAttention" if grouped else "MultiHeadAttention",
                       rms=FAMILIES[family][3])
    other = batch(4, 11, seed=4, left=True)
    got = torch.from_numpy(session.run(None, {i.name: other[i.name].numpy() for i in session.get_inputs()})[0])
    with torch.no_grad():
        assert relative_error(got, model(**other), other["attention_mask"].bool()) <= TOLERANCE


def test_the_onnx_export_of_a_decode_step_runs_in_onnx_runtime():
    """k and v are the cache concatenated with the new token's: GroupQueryAttention takes the cache as its past."""
    model = decoder("llama")
    optimized = attnfuse.optimize(model, example_kwargs=decode_step(model, 2, 6, seed=0))
    auto = torch.export.Dim.AUTO
    dims = {"input_ids": {0: auto}, "attention_mask": {0: auto, 1: auto}, CACHE: [{0: auto, 2: auto}] * 4, "use_cache": None}
    session = exported(optimized, decode_step(model, 2, 6, seed=0), dims, "GroupQueryAttention")
    step = decode_step(model, 3, 9, seed=5)
    leaves = [t for layer in step[CACHE].layers for t in (layer.keys, layer.values)]
    feeds = [step["input_ids"], step["attention_mask"], *leaves]
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), feeds)})
    with torch.no_grad():
        want = model(**copy.deepcopy(step))
    assert relative_error(torch.from_numpy(got[0]), want.last_hidden_state, step["attention_mask"][:, -1:].bool()) <= TOLERANCE
    present = torch.from_numpy(got[1])  # layer 0's keys
    assert relative_error(present, want.past_key_values.layers[0].keys, step["attention_mask"].bool()[:, None, :, None].expand_as(present)) <= TOLERANCE


# ---------------------------------------------------------------------------
# Spellings: one decoder block in plain torch, each construct spelled as asked
# ---------------------------------------------------------------------------


class Block(torch.nn.Module):
    """RMSNorm, q/k/v with fewer k/v heads, rotary on q and k, causal attention with padding."""

    def __init__(self, norm: str = "rms", rotary: str = "half", repeat: str = "expand", hidden: int = 32,
                 heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.norm, self.rotary, self.repeat = norm, rotary, repeat
        self.heads, self.kv_heads, self.size = heads, kv_heads, hidden // heads
        self.embed = torch.nn.Embedding(VOCAB, hidden)
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.q = torch.nn.Linear(hidden, hidden)
        self.kv = torch.nn.Linear(hidden, 2 * kv_heads * self.size)
        self.o = torch.nn.Linear(hidden, hidden)

    def normed(self, x: torch.Tensor) -> torch.Tensor:
        square = x.pow(2).mean(-1, keepdim=True)
        if self.norm == "no-eps":
            return x * torch.rsqrt(square) * self.weight
        if self.norm == "gemma":
            return x * torch.rsqrt(square + 1e-6) * (1.0 + self.weight)
        return self.weight * (x * torch.rsqrt(square + 1e-5))

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None].float() * 10000.0 ** (-torch.arange(0, self.size, 2).float() / self.size)
        if self.rotary == "interleaved":  # GPT-J: pairs of neighbours, each angle repeated
            cos, sin = (f(angles).repeat_interleave(2, -1) for f in (torch.cos, torch.sin))
            pairs = torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
            return x * cos + pairs * sin
        cos, sin = (torch.cat((f(angles), f(angles)), -1) for f in (torch.cos, torch.sin))
        half = self.size // 2
        first, second = x[..., :half], x[..., half:]
        turned = torch.cat((-0.5 * second, first), -1) if self.rotary == "changed" else torch.cat((-second, first), -1)
        return x * cos + turned * sin

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        batch_size, length, _ = x.shape
        h = self.normed(x)
        q = self.q(h).view(batch_size, length, self.heads, self.size).transpose(1, 2)
        k, v = (t.view(batch_size, length, self.kv_heads, self.size).transpose(1, 2) for t in self.kv(h).chunk(2, -1))
        positions = torch.arange(length)
        q, k = self.rotate(q, positions), self.rotate(k, positions)
        groups = self.heads // self.kv_heads
        if self.repeat == "expand":
            k, v = (t[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch_size, self.heads, length, -1) for t in (k, v))
        elif self.repeat == "repeat_interleave":
            k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        seen = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & attention_mask.bool()[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=seen, enable_gqa=self.repeat == "gqa")
        return x + self.o(out.transpose(1, 2).flatten(2))


def optimized_block(**spelling):
    torch.manual_seed(0)
    model = Block(**spelling).eval()
    return model, attnfuse.optimize(model, example_kwargs=batch(2, 7, seed=0))


@pytest.mark.parametrize("spelling", [
    dict(repeat="expand"), dict(repeat="repeat_interleave"), dict(repeat="gqa"),
    dict(rotary="interleaved"), dict(norm="gemma"),
], ids=lambda s: "-".join(s.values()))
def test_spellings_fuse(spelling):
    model, optimized = optimized_block(**spelling)
    report = optimized.report
    site = report.sites[0].summary()
    assert site["fused"] and site["kv_heads"] == 2, site
    assert site["rotary"]["kind"] == ("interleaved" if spelling.get("rotary") == "interleaved" else "half")
    assert report.fused_ops.get("rms_norm") == 1 and report.fused_ops.get("rotary") == 2
    assert next(f for f in report.fusions if f.name == "padding-free").fused
    inputs = batch(3, 9, seed=1, left=True)
    with torch.no_grad():
        assert relative_error(optimized(**inputs), model(**inputs), inputs["attention_mask"].bool()) <= TOLERANCE


@pytest.mark.parametrize("spelling, op, reason", [
    (dict(rotary="changed"), "rotary", "not a rotation"),
    (dict(norm="no-eps"), "rms_norm", "no epsilon"),
], ids=["rotary-with-a-changed-constant", "norm-without-eps"])
def test_lookalikes_are_not_fused(spelling, op, reason):
    model, optimized = optimized_block(**spelling)
    refused = [f for f in optimized.report.fusions if f.op == op]
    assert refused and not any(f.fused for f in refused)
    assert all(reason in f.reason for f in refused), [f.reason for f in refused]
    assert op not in optimized.report.fused_ops
    inputs = batch(3, 9, seed=1)
    with torch.no_grad():
        assert relative_error(optimized(**inputs), model(**inputs), inputs["attention_mask"].bool()) <= TOLERANCE
