"""Attention, found by what it computes, on both IRs:

    scores = f(q @ k^T)                    f: scale, masks, biases, a soft-cap, casts, reshapes
    out    = merge(softmax(scores) @ v)    (or SDPA(q, k, v, mask, is_causal, scale), merged)

Anchors are every softmax over the last axis of a rank-3/4 tensor and every SDPA. f is not
parsed from its ops but evaluated (the product and the chain run alone, with q replaced by
chosen arrays): f(0) is the bias and mask, (f(q) - f(0)) / q.k the scale, and with a Tanh in
the chain f(x) - f(0) = cap * tanh(scale * x / cap) (core/measure/scores.py). The values of
f(0) say what it masks (core/measure/masks.py). q, k and v are traced up, through layout ops,
head repeats and constant factors, to the farthest tensors that hold their heads in a known
layout (core/measure/heads.py): what a fused op reads. Each IR lowers a match its own way
(passes/onnx/attention_lowering.py, passes/fx/attention_lowering.py); the driver proves it.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from attnfuse.core.graph import LAYOUT, Graph, Node, Op, Value, nodes_of, walk_back
from attnfuse.core.measure.heads import Layout, read_heads, repeat_heads
from attnfuse.core.measure.masks import MASKED, MaskReading, Run, read_mask
from attnfuse.core.measure.scores import SATURATING, Points, ScoreFit, fit
from attnfuse.core.options import PassOptions
from attnfuse.core.outcome import AttentionSite, CacheKind, Rotary
from attnfuse.core.rule import NoMatch, Replacement
from attnfuse.core.tolerance import tolerance
from attnfuse.core.view import View, dtype_of

# What may lie between q @ k^T and the softmax: scaling, masking, biasing, soft-capping, casts, reshapes.
SCORE_OPS = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG, Op.WHERE, Op.TANH, Op.CAST, Op.IDENTITY,
                       Op.RESHAPE, Op.SQUEEZE, Op.UNSQUEEZE})
PRODUCTS = frozenset({Op.MATMUL, Op.BADDBMM})
# What the probabilities go through to the MatMul with v.
PASS_ON = frozenset({Op.CAST, Op.IDENTITY, Op.RESHAPE, Op.SQUEEZE, Op.UNSQUEEZE})
# What q, k and v go through after the tensor that holds their heads: layout, head repeats, selections.
HEAD_PATH = LAYOUT | {Op.EXPAND, Op.SLICE, Op.GATHER}
# What a past k or v input goes through to the cache's Concat (a packed past is gathered or split).
FROM_INPUT = LAYOUT | {Op.GATHER, Op.SPLIT, Op.ITEM, Op.SLICE}
# The length axis of each layout (a cache is concatenated along it).
LENGTH_AXIS = {Layout.TOKENS: 1, Layout.TOKENS_HEADS: 1, Layout.HEADS_FIRST: 2, Layout.HEADS_FIRST_T: 3,
               Layout.FLAT_HEADS: 1, Layout.FLAT_HEADS_T: 2}


@dataclass(frozen=True)
class Heads:
    """The tensor holding q, k or v: its layout, its heads (k and v may hold fewer than q) and the
    factor attention reads it times."""

    value: Value
    layout: Layout
    heads: int
    factor: float = 1.0


@dataclass(frozen=True)
class KvCache:
    """k and v concatenated with a past k and v along their length: a KV cache."""

    concats: tuple[Node, Node]  # the Concats of k and of v
    past: tuple[Value, Value]
    new: tuple[Value, Value]


@dataclass
class AttentionMatch:
    """softmax(q @ k^T * scale + bias) @ v, merged: the graph's parts and what was measured of them."""

    anchor: Node  # the softmax, or SDPA
    product: Node | None  # q @ k^T (None for SDPA)
    chain: list[Node]  # from the product to the softmax, in order
    scores: Value | None  # the softmax's input, f(q @ k^T)
    weighted: Node  # the probabilities' MatMul with v (SDPA itself)
    output: Value  # the merged output the fused op replaces: [B, S, H*Dv] (or [B, S, H, Dv], or [B*S, ...])
    q: Heads
    k: Heads
    v: Heads
    cache: CacheKind
    kv_cache: KvCache | None  # with CacheKind.PAST
    num_heads: int
    head_size: int
    value_size: int
    scale: float
    softcap: float  # 0: the scores are not capped
    nan_guard: bool  # rows whose keys are all hidden come out zero (SDPA's guard), not NaN
    biases: list[np.ndarray]  # f(0) on each run that computed the scores, [B|1, H|1, S, T]
    mask: MaskReading
    dtype: np.dtype  # of the scores
    sdpa_mask: Value | None = None  # SDPA's attn_mask, as the graph has it
    sdpa_causal: bool = False  # SDPA's is_causal
    flat_output: bool = False  # the merged output holds the tokens in one axis, [B*S, ...] (ahead of a projection)
    rotary: Rotary | None = None

    @property
    def kv_heads(self) -> int:
        return self.k.heads


class Attention:
    name = "attention"

    def __init__(self, options: PassOptions = PassOptions()):
        self.options = options

    def anchors(self, graph: Graph, view: View) -> list[Node]:
        return [node for node in nodes_of(graph, [Op.SOFTMAX, Op.SDPA]) if _is_anchor(graph, view, node)]

    def match(self, anchor: Node, graph: Graph, view: View) -> AttentionMatch:
        if graph.op(anchor) is Op.SDPA:
            return _match_sdpa(anchor, graph, view)
        return _match_softmax(anchor, graph, view)

    def lower(self, match: AttentionMatch, graph: Graph, view: View) -> Iterator[Replacement]:
        return graph.attention_lowerings(match, view, self.options)

    def report(self, anchor: Node, match: AttentionMatch | None, graph: Graph) -> AttentionSite:
        site = AttentionSite(name=graph.label(anchor))
        if match is not None:
            mask = match.mask
            site.num_heads, site.head_size, site.kv_heads = match.num_heads, match.head_size, match.kv_heads
            site.scale, site.softcap, site.cache, site.rotary = match.scale, match.softcap, match.cache, match.rotary
            site.mask, site.causal, site.window, site.bias = mask.kind, mask.causal, mask.window, mask.bias
            site.alibi_slopes = list(mask.alibi_slopes) if mask.alibi_slopes else None
        return site


def already_fused(graph: Graph, nodes: list[Node]) -> list[AttentionSite]:
    """The fused attention a model came with (ONNX Runtime's, or an earlier attnfuse run's): kept as
    it is, and counted."""
    return [AttentionSite(name=graph.label(node), fused=True, already_fused=True,
                          num_heads=graph.attribute(node, "num_heads", 0),
                          reason=f"already fused ({graph.attribute(node, 'fused_attention')} in the input)")
            for node in nodes if graph.attribute(node, "fused_attention")]


def _is_anchor(graph: Graph, view: View, node: Node) -> bool:
    if graph.op(node) is Op.SDPA:
        return True
    scores = view.value(graph.operands(node)[0])
    return scores is not None and scores.ndim in (3, 4) and graph.axes(node) in ((-1,), (scores.ndim - 1,))


# ---- softmax(f(q @ k^T)) @ v ------------------------------------------------------------------------


def _match_softmax(softmax: Node, graph: Graph, view: View) -> AttentionMatch:
    scores = graph.operands(softmax)[0]
    product, chain = score_chain(graph, view, scores)
    weighted, nan_guard = _weighted_values(graph, view, graph.outputs(softmax)[0])
    q_operand, kt_operand = graph.operands(product)[-2:]
    v_operand = graph.operands(weighted)[1]
    runs = view.runs(scores, q_operand, kt_operand, v_operand)
    reads = []
    for run in runs:
        batch = _batch(view, scores, run)
        q4, k4, v4 = (_heads_first(view.value(x, run), batch) for x in (q_operand, kt_operand, v_operand))
        k4 = k4.swapaxes(-1, -2)
        reads.append(_Reads(run, q4, *(_broadcast_heads(x, q4.shape[1]) for x in (k4, v4))))
    zeros = [_scores_at(graph, view, product, chain, scores, run, 0.0) for run in runs]
    capped = any(graph.op(node) is Op.TANH for node in chain)
    found = _fit(graph, view, product, chain, scores, runs, zeros, capped)
    return _attention(graph, view, reads, (q_operand, kt_operand, v_operand), graph.outputs(weighted)[0],
                      anchor=softmax, product=product, chain=chain, scores=scores, weighted=weighted,
                      scale=found.scale, softcap=found.softcap, nan_guard=nan_guard, dtype=dtype_of(view, scores),
                      biases=[_as_4d(zero, r.q.shape[0]) for zero, r in zip(zeros, reads)])


def score_chain(graph: Graph, view: View, scores: Value) -> tuple[Node, list[Node]]:
    """(the q @ k^T product, the ops from it to `scores` in order): back from the scores along the one
    operand of each op that leads to the product."""
    chain, value = [], scores
    for _ in range(32):
        node = graph.producer(value)
        if node is None:
            break
        if _is_product(graph, view, node):
            return node, chain[::-1]
        op = graph.op(node)
        if op not in SCORE_OPS:
            raise NoMatch(f"{op.value if op else graph.label(node)} between the scores and the softmax")
        path = [i for i, x in enumerate(graph.operands(node)) if _reaches_product(graph, view, x)]
        if len(path) != 1 or (op is Op.WHERE and path == [0]):
            raise NoMatch(f"cannot tell the scores from the mask at {graph.label(node)}")
        chain.append(node)
        value = graph.operands(node)[path[0]]
    raise NoMatch("the softmax input is not a function of one q @ k^T product")


def _is_product(graph: Graph, view: View, node: Node) -> bool:
    """A batched product of two activations (a MatMul with a weight is a projection)."""
    return graph.op(node) in PRODUCTS and all(view.constant(x) is None for x in graph.operands(node)[-2:])


def _reaches_product(graph: Graph, view: View, value: Value, depth: int = 16) -> bool:
    node = graph.producer(value)
    if node is None or depth == 0 or view.constant(value) is not None:
        return False
    if _is_product(graph, view, node):
        return True
    return graph.op(node) in SCORE_OPS and any(_reaches_product(graph, view, x, depth - 1)
                                               for x in graph.operands(node) if x is not None)


def _weighted_values(graph: Graph, view: View, probabilities: Value) -> tuple[Node, bool]:
    """The MatMul that weights v by the probabilities, past casts and reshapes and SDPA's NaN guard
    Where(IsNaN(p), 0, p); and whether that guard zeroes the rows that hide every key."""
    value, guarded = probabilities, False
    for _ in range(8):
        if graph.is_output(value):
            raise NoMatch("the attention probabilities are a graph output")
        users = [node for node in graph.users(value) if graph.op(node) is not Op.SHAPE]
        guard = _nan_guard(graph, view, value, users)
        if guard is not None:
            value, guarded = guard, True
            continue
        if len(users) != 1:
            raise NoMatch("the attention probabilities are used elsewhere")
        op = graph.op(users[0])
        if op is Op.MATMUL and graph.operands(users[0])[0] is value:
            return users[0], guarded
        if op not in PASS_ON:
            raise NoMatch(f"the probabilities go into {op.value if op else graph.label(users[0])}, "
                          "not a MatMul with v")
        value = graph.outputs(users[0])[0]
    raise NoMatch("the probabilities do not reach a MatMul with v")


def _nan_guard(graph: Graph, view: View, p: Value, users: list[Node]) -> Value | None:
    """Where(IsNaN(p), 0, p)'s output when `users` are that guard's two ops, else None."""
    by_op = {graph.op(user): user for user in users}
    if len(users) != 2 or set(by_op) != {Op.ISNAN, Op.WHERE}:
        return None
    condition, if_nan, otherwise = graph.operands(by_op[Op.WHERE])
    zero = view.constant(if_nan)
    if condition is not graph.outputs(by_op[Op.ISNAN])[0] or otherwise is not p or zero is None or np.any(zero != 0):
        return None
    return graph.outputs(by_op[Op.WHERE])[0]


# ---- SDPA(q, k, v, mask) ----------------------------------------------------------------------------


def _match_sdpa(sdpa: Node, graph: Graph, view: View) -> AttentionMatch:
    q_operand, k_operand, v_operand, mask = graph.operands(sdpa)
    causal = bool(graph.attribute(sdpa, "causal", False))
    runs = view.runs(q_operand, k_operand, v_operand)
    reads = []
    for run in runs:
        q4, k4, v4 = (view.value(x, run) for x in (q_operand, k_operand, v_operand))
        if any(x.ndim != 4 for x in (q4, k4, v4)):
            raise NoMatch("q, k or v is not a [batch, heads, seq, head_size] tensor")
        if causal and q4.shape[2] != k4.shape[2]:
            raise NoMatch("SDPA's is_causal with fewer queries than keys is top-left aligned; the fused op's is not")
        if q4.shape[1] % k4.shape[1] or q4.shape[1] % v4.shape[1]:
            raise NoMatch(f"q has {q4.shape[1]} heads, k {k4.shape[1]} and v {v4.shape[1]}")
        reads.append(_Reads(run, q4, repeat_heads(k4, q4.shape[1]), repeat_heads(v4, q4.shape[1])))
    return _attention(graph, view, reads, (q_operand, k_operand, v_operand), graph.outputs(sdpa)[0],
                      anchor=sdpa, product=None, chain=[], scores=None, weighted=sdpa,
                      scale=graph.attribute(sdpa, "scale") or reads[0].q.shape[-1] ** -0.5, softcap=0.0,
                      nan_guard=False, dtype=dtype_of(view, q_operand), sdpa_mask=mask, sdpa_causal=causal,
                      biases=[_sdpa_bias(view.value(mask, r.run) if mask is not None else None, r, causal)
                              for r in reads])


def _sdpa_bias(mask: np.ndarray | None, reads: _Reads, causal: bool) -> np.ndarray:
    """SDPA's mask as the additive bias it is (a boolean mask is True where a key is seen), with its causal
    triangle."""
    queries, keys = reads.q.shape[2], reads.k.shape[2]
    bias = np.zeros((1, 1, queries, keys))
    if mask is not None:
        mask = mask.astype(np.float64) if mask.dtype != bool else np.where(mask, 0.0, -np.inf)
        bias = bias + mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if causal:
        bias = np.where(np.triu(np.ones((queries, keys), bool), 1), -np.inf, bias)
    return bias


# ---- what both spellings share ------------------------------------------------------------------------


@dataclass
class _Reads:
    """What attention reads on one run, heads first: q [B, H, S, D], k [B, H, T, D], v [B, H, T, Dv]."""

    run: int
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray


def _attention(graph: Graph, view: View, reads: list[_Reads], operands: tuple[Value, Value, Value],
               attended: Value, *, scale: float, biases: list[np.ndarray], dtype, **parts) -> AttentionMatch:
    """The match, once q, k and v are traced to their heads, the output to its merge, and the mask read:
    `attended` is the attention output with its heads first, `scale` the one the product gets."""
    q, k, v = _sources(graph, view, reads, operands)
    num_heads = reads[0].q.shape[1]
    if q.heads != num_heads:
        raise NoMatch(f"q has {q.heads} of {num_heads} heads")
    if k.heads != v.heads:
        raise NoMatch(f"k has {k.heads} heads but v {v.heads}")
    if v.factor != 1.0:
        raise NoMatch("the values are scaled")
    output, flat = _merged_output(graph, view, attended, reads)
    cache, kv_cache = _cache(graph, view, k, v, [r.run for r in reads])
    mask = read_mask([Run(bias, view.real(r.run), None if cache is CacheKind.CROSS else _real_keys(view, r))
                      for bias, r in zip(biases, reads)])
    return AttentionMatch(output=output, q=q, k=k, v=v, cache=cache, kv_cache=kv_cache, num_heads=num_heads,
                          head_size=reads[0].q.shape[3], value_size=reads[0].v.shape[3],
                          scale=scale * q.factor * k.factor, biases=biases, mask=mask, dtype=np.dtype(dtype),
                          rotary=_rotary(graph, q, reads[0].q.shape[3]), flat_output=flat, **parts)


def _batch(view: View, scores: Value, run: int) -> int:
    value = view.value(scores, run)
    return value.shape[0] if value.ndim == 4 else view.batch(run)


def _heads_first(x: np.ndarray, batch: int) -> np.ndarray:
    """An operand of attention as [B, H, L, D] ([B*H, L, D] in 3-D attention)."""
    if x.ndim == 3:
        if not batch or x.shape[0] % batch:
            raise NoMatch("cannot tell batch from heads in 3-D attention")
        return x.reshape(batch, -1, *x.shape[1:])
    if x.ndim != 4:
        raise NoMatch(f"attention reads a rank-{x.ndim} tensor")
    return x


def _broadcast_heads(x: np.ndarray, heads: int) -> np.ndarray:
    """k or v of one head that a product broadcasts over every head."""
    return np.broadcast_to(x, (x.shape[0], heads, *x.shape[2:])) if x.shape[1] == 1 else x


def _as_4d(bias: np.ndarray, batch: int) -> np.ndarray:
    return bias if bias.ndim == 4 else bias.reshape(batch, -1, *bias.shape[1:])


def _scores_at(graph: Graph, view: View, product: Node, chain: list[Node], scores: Value, run: int,
               times: float) -> np.ndarray:
    """f(times * q . k): the scores computed with q multiplied by `times` (0: the bias and mask)."""
    q = graph.operands(product)[-2]
    value = view.value(q, run)
    (out,) = view.evaluate([product, *chain], [scores], {q: value * np.asarray(times, value.dtype)}, run)
    return out


def _fit(graph: Graph, view: View, product: Node, chain: list[Node], scores: Value, runs: list[int],
         zeros: list[np.ndarray], capped: bool) -> ScoreFit:
    """The scores' scale (and cap), measured at the scores f(0) does not hide (see measure/scores.py)."""
    q, kt = graph.operands(product)[-2:]
    points = []
    for run, zero in zip(runs, zeros):
        x = np.matmul(view.value(q, run).astype(np.float64), view.value(kt, run).astype(np.float64))
        if x.size != zero.size:
            raise NoMatch("the scores do not have the q @ k^T product's shape")
        x, zero = x.reshape(zero.shape), zero.astype(np.float64)
        for times in (1.0, SATURATING) if capped else (1.0,):
            at = view.value(scores, run) if times == 1.0 else \
                _scores_at(graph, view, product, chain, scores, run, times)
            f = at.astype(np.float64)
            seen = (zero > MASKED) & np.isfinite(zero) & np.isfinite(f)
            points.append(Points(x[seen], f[seen] - zero[seen], float(np.abs(f[seen]).max(initial=0.0)), times))
    # The coarser of the product's and the scores' precision: a chain may cast float16 scores up.
    dtype = max(dtype_of(view, scores), dtype_of(view, graph.outputs(product)[0]), key=tolerance)
    found = fit(points, capped, dtype)
    if found is None:
        raise NoMatch("the scores are not cap * tanh(scale * q.k / cap) + bias" if capped
                      else "the scores are not scale * q.k + bias")
    return found


def _sources(graph: Graph, view: View, reads: list[_Reads], operands: tuple[Value, Value, Value]
             ) -> tuple[Heads, Heads, Heads]:
    wanted = ([r.q for r in reads], [r.k for r in reads], [r.v for r in reads])
    runs = [r.run for r in reads]
    return tuple(_source(graph, view, x, want, runs, name)  # type: ignore[return-value]
                 for x, want, name in zip(operands, wanted, ("q", "k", "v")))


def _source(graph: Graph, view: View, operand: Value, wanted: list[np.ndarray], runs: list[int], name: str
            ) -> Heads:
    """The farthest tensor up from `operand` that holds `wanted` (its heads first, [B, H, L, D], on each of
    `runs`) in a known layout, through layout ops, head repeats, constant factors and Concats with
    nothing else in them. NoMatch if there is none."""
    found, value = None, operand
    for _ in range(32):
        arrays = [view.value(value, run) for run in runs]
        reading = read_heads(arrays, wanted) if all(a is not None for a in arrays) else None
        if reading is not None:
            found = Heads(value, reading.layout, reading.heads, reading.factor)
        value = _up(graph, view, value, runs)
        if value is None:
            break
    if found is None:
        raise NoMatch(f"cannot find {name} in a known layout of heads")
    return found


def _up(graph: Graph, view: View, value: Value, runs: list[int]) -> Value | None:
    """The tensor `value` is made from by a layout op, a head repeat, a constant factor or a Concat
    with nothing else in it (an empty cache); None for anything else."""
    node = graph.producer(value)
    if node is None:
        return None
    op, operands = graph.op(node), graph.operands(node)
    if op in HEAD_PATH:
        return operands[0]
    if op in (Op.MUL, Op.DIV):
        factors = [i for i, x in enumerate(operands[:2]) if _scalar(view, x)]
        if factors == [1] or (op is Op.MUL and factors == [0]):
            return operands[1 - factors[0]]
    if op is Op.CONCAT:
        pieces = [x for x in operands if not all(view.value(x, run).size == 0 for run in runs)]
        return pieces[0] if len(pieces) == 1 else None
    return None


def _scalar(view: View, value: Value) -> bool:
    array = view.constant(value)
    return array is not None and array.size == 1


def _merged_output(graph: Graph, view: View, attended: Value, reads: list[_Reads]) -> tuple[Value, bool]:
    """The tensor after the attention output ([B, H, S, Dv] or [B*H, S, Dv]) that holds it merged, through
    layout ops read by nothing else: [B, S, H*Dv], what the fused ops write, if the graph has it; else the
    farthest one with its tokens first ([B, S, H, Dv], or [B*S, H*Dv] ahead of a projection); and whether
    that one holds the tokens in one axis."""
    merged = [_heads_first(view.value(attended, r.run), r.q.shape[0]).transpose(0, 2, 1, 3) for r in reads]
    runs = [r.run for r in reads]
    holding, value = [], attended
    for _ in range(8):
        users = [node for node in graph.users(value) if graph.op(node) is not Op.SHAPE]
        if graph.is_output(value) or len(users) != 1 or graph.op(users[0]) not in LAYOUT:
            break
        value = graph.outputs(users[0])[0]
        if _holds(view, value, merged, runs):
            holding.append(value)
        elif holding:
            break
    if not holding:
        raise NoMatch("the attention output is not merged back to [batch, seq, hidden]")
    batch, length, heads, size = merged[0].shape
    exact = [x for x in holding if view.value(x, runs[0]).shape == (batch, length, heads * size)]
    found = exact[0] if exact else holding[-1]
    return found, view.value(found, runs[0]).shape[:2] != (batch, length)


def _holds(view: View, value: Value, merged: list[np.ndarray], runs: list[int]) -> bool:
    """Whether `value` is `merged` ([B, S, H, Dv]) with its tokens first ([B, S, ...] or [B*S, ...]) on every run."""
    for want, run in zip(merged, runs):
        got = view.value(value, run)
        batch, length = want.shape[:2]
        tokens_first = got is not None and (got.shape[:2] == (batch, length) or got.shape[0] == batch * length)
        if not tokens_first or got.size != want.size:
            return False
        limit = tolerance(got.dtype) / 10 * max(float(np.abs(want.astype(np.float64)).max(initial=0.0)), 1e-30)
        if float(np.abs(got.reshape(want.shape).astype(np.float64) - want).max(initial=0.0)) > limit:
            return False  # a merge moves values, it does not change them
    return True


def _cache(graph: Graph, view: View, k: Heads, v: Heads, runs: list[int]) -> tuple[CacheKind, KvCache | None]:
    """Cross-attention when k and v are read from inputs; a KV cache when they are concatenated with
    past k and v inputs along their length."""
    if all(graph.is_input(walk_back(graph, x.value, FROM_INPUT)) for x in (k, v)):
        return CacheKind.CROSS, None
    concats = [_cache_concat(graph, view, x, runs) for x in (k, v)]
    if concats[0] is None or concats[1] is None:
        return CacheKind.NONE, None
    (k_cat, k_past, k_new), (v_cat, v_past, v_new) = concats
    return CacheKind.PAST, KvCache((k_cat, v_cat), (k_past, v_past), (k_new, v_new))


def _cache_concat(graph: Graph, view: View, x: Heads, runs: list[int]) -> tuple[Node, Value, Value] | None:
    """(the Concat, past, new) when x is a past input concatenated with new values along the length."""
    node = graph.producer(x.value)
    if node is None or graph.op(node) is not Op.CONCAT or len(graph.operands(node)) != 2:
        return None
    past, new = graph.operands(node)
    axis = LENGTH_AXIS[x.layout]
    for run in runs:
        whole, before, after = (view.value(y, run) for y in (x.value, past, new))
        if before.ndim != whole.ndim or before.shape[axis] + after.shape[axis] != whole.shape[axis]:
            return None
    return (node, past, new) if graph.is_input(walk_back(graph, past, FROM_INPUT)) else None


def _real_keys(view: View, reads: _Reads) -> np.ndarray | None:
    """bool [B, T]: the real keys of the run (the cache's and the new tokens'), where the mask covers them."""
    keys = reads.k.shape[2]
    for real in (view.real_total(reads.run), view.real(reads.run)):
        if real is not None and real.shape[1] == keys:
            return real
    return None


def _rotary(graph: Graph, q: Heads, head_size: int) -> Rotary | None:
    """The rotary embedding a fused op put on q (the rotary rule runs before attention), up through layout ops
    (a rotated value inside a rewrite is not observed: q's heads are read after it)."""
    node = graph.producer(walk_back(graph, q.value, LAYOUT))
    found = graph.attribute(node, "rotary") if node is not None and graph.op(node) is Op.FUSED else None
    return Rotary(found.kind, found.dim or head_size) if found is not None else None
