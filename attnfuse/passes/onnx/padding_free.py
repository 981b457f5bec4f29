"""Padding-free execution (after ByteTransformer): run token-wise ops on the real tokens only.

A token-major activation is [batch, seq, ...] ("tokens") or [batch*seq, ...]
("rows"). Its real tokens are gathered once, where the first token-wise op reads
it, into [1, n, ...] or [n, ...]: every op keeps the rank it had. Token-wise ops
(projections, bias adds, residual adds, layernorms, gelus, their fused forms, and
layout ops that leave the token dims alone) then run on those rows, and so does
attention whose only mask is key padding (one sequence at a time, or packed
attention on CUDA). An op that needs the padded layout (other attention, a graph
output, a Shape reader) gets it back by one Gather from the packed rows plus a
zero row: padded positions of a restored tensor are zero.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from attnfuse.core import registry
from attnfuse.core.facts import attention_facts, has_token_positions, is_padding_free, tag_padding_free
from attnfuse.passes.onnx import buckets, quantized
from attnfuse.passes.onnx.graph import MS_DOMAIN, Builder, NoMatch, attr, constant, named_inputs, replace_uses

NAME = "padding-free"
TOKENS, ROWS = "tokens", "rows"

# Standard ONNX ops that are token-wise (the fused ops say so in core/registry.py).
_UNARY = {"Cast", "Erf", "Tanh", "Relu", "Sigmoid", "Gelu", "Neg", "Sqrt", "Exp", "Softplus", "Identity", "IsNaN"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where"}
_NORMS = {"LayerNormalization"}  # over the last axis: token-wise
# Activations are float, or integers where quantized ops compute (int8 / uint8 codes, int32 accumulators).
_QUANTIZED_DTYPES = {"int8", "uint8", "int32"}
PER_SEQUENCE_WIDTH = 32  # measured: from here, a Loop over the sequences beats attention on the padded layout
MHA = registry.MULTI_HEAD_ATTENTION
STANDARD = registry.STANDARD_ATTENTION
_QKV = ("query", "key", "value")
_TABLES = ("cos_cache", "sin_cache")  # what a rotary's position ids index: read whole
# Marks a graph that runs padding-free; kept in the file, so that optimizing attnfuse's own output
# does not pack it twice.
_RUNS_PACKED = "attnfuse.padding_free"


@dataclass(frozen=True)
class PaddingMask:
    """The graph's padding-mask input (integer or bool [B, T], nonzero at real tokens) and the input
    of this step's token ids: with a KV cache the mask covers the cached tokens too, and the ids
    say how many of its last columns are this step's."""

    value: ir.Value
    tokens: ir.Value | None = None


@dataclass(frozen=True)
class Form:
    """[batch, seq, ...] ("tokens", packed as [1, n, ...]) or [batch*seq, ...] ("rows", packed as [n, ...])."""

    kind: str
    rank: int

    @property
    def lead(self) -> int:
        """How many leading dims index the token."""
        return 2 if self.kind == TOKENS else 1


def new_tokens_mask(b: Builder, mask: ir.Value, tokens: ir.Value | None) -> ir.Value:
    """The mask's columns of the new tokens: its last S, S the tokens' length (all of it without a cache)."""
    if tokens is None:
        return mask
    length = b.op("Shape", [tokens], {"start": 1, "end": 2})
    return b.op("Slice", [mask, b.op("Neg", [length]), b.const([np.iinfo(np.int64).max], np.int64),
                          b.const([1], np.int64)])


def real_tokens(b: Builder, mask: ir.Value) -> ir.Value:
    """bool, True where `mask` marks a real token (nonzero)."""
    return b.op("Cast", [mask], {"to": ir.DataType.BOOL})


def _new_tokens(inputs, mask: ir.Value) -> tuple[int, ...]:
    real = getattr(inputs, "real", None)
    return tuple(real.shape) if real is not None else tuple(inputs.feeds[mask.name].shape)


class Layout:
    """Which values are token-major activations, and in which form."""

    def __init__(self, probe, mask: ir.Value):
        self.probe = probe
        self.runs = range(probe.run_count)
        # [batch, new tokens] of each run (with a KV cache the mask is wider: it covers cached tokens too)
        self.sizes = [_new_tokens(probe.inputs(run), mask) for run in self.runs]
        self.cached = any(size != probe.inputs(run).feeds[mask.name].shape for run, size in zip(self.runs, self.sizes))
        self._forms: dict[int, Form | None] = {}

    def form(self, value: ir.Value | None) -> Form | None:
        if value is None:
            return None
        if id(value) not in self._forms:
            self._forms[id(value)] = self.observed(value) if self.seen(value) else self._inferred(value)
        return self._forms[id(value)]

    def set_form(self, value: ir.Value, form: Form | None) -> None:
        self._forms[id(value)] = form

    def seen(self, value: ir.Value) -> bool:
        return bool(value.name) and all(self.probe.get(value.name, run) is not None for run in self.runs)

    def shapes(self, value: ir.Value) -> list[tuple[int, ...]]:
        return [self.probe.get(value.name, run).shape for run in self.runs]

    def observed(self, value: ir.Value) -> Form | None:
        arrays = [self.probe.get(value.name, run) for run in self.runs]
        if any(a.dtype.kind != "f" and a.dtype.name not in _QUANTIZED_DTYPES for a in arrays):
            return None
        if all(a.ndim >= 3 and a.shape[:2] == size for a, size in zip(arrays, self.sizes)):
            return Form(TOKENS, arrays[0].ndim)
        if all(a.ndim >= 2 and a.shape[0] == size[0] * size[1] for a, size in zip(arrays, self.sizes)):
            return Form(ROWS, arrays[0].ndim)
        return None

    def _inferred(self, value: ir.Value) -> Form | None:
        """Values made by the fusion passes were never observed: follow their producer."""
        node = value.producer()
        if node is None:
            return None
        found = registry.of_onnx(node.domain, node.op_type)
        fused, spelled = found if found is not None else (None, None)
        if fused is registry.EMBED_LAYER_NORM:
            embedded = (spelled.output("output"), spelled.output("embedding_sum"))
            return Form(TOKENS, 3) if value.index() in embedded else None
        if fused is registry.ATTENTION:
            query = node.inputs[spelled.slot("query")]
            return self.form(query) if value.index() == spelled.output("output") else None
        forms = token_wise_forms(node, layout=self)
        return forms[value.index()] if forms else None


def token_wise_forms(node: ir.Node, layout: Layout) -> list[Form | None] | None:
    """The forms of the outputs if each output token depends only on the same token of
    the inputs (and on constants); None if the node mixes tokens or is not known."""
    if node.domain not in ("", "ai.onnx", MS_DOMAIN) or not node.outputs or not node.inputs:
        return None
    found = registry.of_onnx(node.domain, node.op_type)
    spelled_quantized = quantized.quantized(node)
    if spelled_quantized is not None:
        return _quantized_forms(node, spelled_quantized, layout)
    if found is None and node.domain == MS_DOMAIN:
        return None
    probe = layout.probe
    if found is not None and _positions_per_token(node, found[1], layout):
        x = named_inputs(node, found[1])["input"]
        return [Form(TOKENS, 3)] if found[0].token_wise and layout.form(x) == Form(TOKENS, 3) else None
    inputs = [x for x in node.inputs if x is not None]
    forms = {layout.form(x) for x in inputs} - {None}
    if len(forms) != 1:
        return None
    (form,) = forms
    same = [form] * len(node.outputs)
    per_token = all(layout.form(x) == form or _same_for_every_token(x, layout, form) for x in inputs)
    if found is not None:
        return same if per_token and _fused_token_wise(node, *found, form) else None
    op = node.op_type
    if op in _UNARY or op in _ELEMENTWISE:
        return same if per_token else None
    first = layout.form(node.inputs[0])
    if first is None:
        return None
    if op == "MatMul":
        weight = constant(node.inputs[1], probe)
        return same if weight is not None and weight.ndim == 2 else None
    if op == "Gemm":
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        ok = first == Form(ROWS, 2) and not attr(node, "transA", 0) and constant(node.inputs[1], probe) is not None
        return same if ok and (bias is None or _same_for_every_token(bias, layout, form)) else None
    if op in _NORMS:
        return same if _over_last_axis(node, first) and per_token else None
    if op in ("Split", "Gather", "Transpose", "Reshape"):
        return _layout_forms(node, first, layout)
    return None


def _fused_token_wise(node: ir.Node, fused: registry.FusedOp, spelled: registry.OnnxForm, form: Form) -> bool:
    """A fused op the registry calls token-wise, normalizing (if it does) over the last axis. Position
    ids that are not one per token (an offset into the sequence) would be read at the wrong place on
    packed tokens."""
    reads_positions = "position_ids" in named_inputs(node, spelled)
    return fused.token_wise and _over_last_axis(node, form) and not reads_positions


def _positions_per_token(node: ir.Node, spelled: registry.OnnxForm, layout: Layout) -> bool:
    """A rotary whose position ids are one per token, [B, S]: on packed tokens they are packed with the
    tokens ([1, n]), and the tables they index (its cos and sin caches) are read whole."""
    positions = named_inputs(node, spelled).get("position_ids")
    return positions is not None and (has_token_positions(node) or _one_per_token(positions, layout))


def _one_per_token(value: ir.Value, layout: Layout) -> bool:
    return layout.seen(value) and layout.shapes(value) == [tuple(size) for size in layout.sizes]


def _quantized_forms(node: ir.Node, op: quantized.QuantizedOp, layout: Layout) -> list[Form | None] | None:
    """A quantized op (passes/onnx/quantized.py) is token-wise on its activation when its weights are
    constants, what it takes per tensor is one value, and a (de)quantization's channels are not tokens.
    Its per-tensor outputs (a dynamic scale, a zero point) have no token form."""
    inputs = named_inputs(node, op.form)
    form = layout.form(inputs.get(op.activation))
    if form is None or any(layout.form(x) for name, x in inputs.items() if name != op.activation):
        return None
    weights = {name: constant(inputs[name], layout.probe) for name in op.weights if name in inputs}
    if any(w is None for w in weights.values()) or any(_size(inputs[name], layout) != 1 for name in op.per_tensor
                                                         if name in inputs):
        return None
    if op.matrix is not None and weights[op.matrix].ndim != 2:
        return None
    if quantized.is_qdq(op) and not _per_tensor_or_channel(node, weights.values(), form):
        return None
    return [form if name in op.token_major else None for name in op.form.outputs[:len(node.outputs)]]


def _size(value: ir.Value, layout: Layout) -> int | None:
    """Its number of elements, if the same on every run."""
    if not layout.seen(value):
        array = constant(value, layout.probe)
        return None if array is None else array.size
    sizes = {int(np.prod(shape)) for shape in layout.shapes(value)}
    return sizes.pop() if len(sizes) == 1 else None


def _per_tensor_or_channel(node: ir.Node, scales, form: Form) -> bool:
    """(De)QuantizeLinear's scale and zero point: one value, or one per channel along an axis of a token."""
    if attr(node, "block_size", 0):
        return False
    per_channel = any(scale.size > 1 for scale in scales)
    return not per_channel or attr(node, "axis", 1) % form.rank >= form.lead


def _over_last_axis(node: ir.Node, form: Form) -> bool:
    return attr(node, "axis", -1) in (-1, form.rank - 1)


def _layout_forms(node: ir.Node, form: Form, layout: Layout) -> list[Form] | None:
    """Layout ops that leave the token dims alone."""
    op, probe = node.op_type, layout.probe
    if op == "Split":
        axis = attr(node, "axis", 0) % form.rank
        fixed = len(node.inputs) < 2 or node.inputs[1] is None or constant(node.inputs[1], probe) is not None
        return [form] * len(node.outputs) if axis >= form.lead and fixed else None
    if op == "Gather":
        indices = constant(node.inputs[1], probe)
        axis = attr(node, "axis", 0) % form.rank
        return [Form(form.kind, form.rank - 1 + indices.ndim)] if indices is not None and axis >= form.lead else None
    if op == "Transpose":
        perm = list(attr(node, "perm", []))
        return [form] if perm[: form.lead] == list(range(form.lead)) else None
    # Reshape: to a shape seen to keep the tokens, with the same trailing dims on every input.
    out = node.outputs[0]
    if layout.seen(out):
        out_form = layout.observed(out)
        trailing = {shape[out_form.lead:] for shape in layout.shapes(out)} if out_form else set()
        return [out_form] if len(trailing) == 1 else None
    target = constant(node.inputs[1], probe)
    if target is None or attr(node, "allowzero", 0):
        return None
    if list(target[: form.lead]) == [0] * form.lead:  # copies the token dims
        return [Form(form.kind, len(target))]
    if form.kind == TOKENS and target[0] == -1 and len(target) == form.rank - 1 and (target[1:] > 0).all():
        return [Form(ROWS, len(target))]  # [B, S, ...] -> [B*S, ...]
    return None


def _same_for_every_token(value: ir.Value, layout: Layout, form: Form) -> bool:
    """A value that broadcasts along the token dims only, on every run: [H], [heads, size], [1, 1, H], a
    constant, or a value computed per tensor (a dynamic quantization's scale)."""
    array = constant(value, layout.probe)
    if array is not None:
        shapes = [array.shape]
    elif layout.form(value) is None and layout.seen(value):
        shapes = layout.shapes(value)
    else:
        return False
    per_token = form.rank - form.lead  # the dims of one token
    return all(d == 1 for shape in shapes for d in shape[:max(len(shape) - per_token, 0)])


class Packer:
    """Makes, once per value, its packed and its padded form."""

    def __init__(self, graph: ir.Graph, mask: PaddingMask, layout: Layout):
        self.graph, self.layout, self.mask = graph, layout, mask
        self._packed: dict[int, ir.Value] = {}
        self._padded: dict[int, ir.Value] = {}
        self._targets: dict[int, ir.Value] = {}  # by rank: _token_dims
        b = Builder(NAME)
        mask = new_tokens_mask(b, mask.value, mask.tokens if layout.cached else None)
        flat = b.op("Reshape", [mask, b.const([-1], np.int64)])
        real = self.real = real_tokens(b, flat)
        self.index = b.op("Reshape", [b.op("NonZero", [real]), b.const([-1], np.int64)])  # [n]
        count = b.op("Squeeze", [b.op("Shape", [self.index]), b.const([0], np.int64)])
        ones = b.op("Cast", [real], {"to": ir.DataType.INT64})
        rank = b.op("Sub", [b.op("CumSum", [ones, b.const(0, np.int64)]), b.const(1, np.int64)])
        self.source = b.op("Where", [real, rank, count])  # padded position -> its packed row, or the zero row
        self.batch_seq = b.op("Shape", [mask])
        self.batch_times_seq = b.op("ReduceProd", [self.batch_seq], {"keepdims": 1})
        # [1]: 1 where any position is padded, else 0 (a decode step): no position then reads the zero row, and
        # a product made with it (the LM head's) would take one row more for nothing (8 -> 9 rows: 20% of an
        # int4 LM head's time)
        padded = b.op("Sub", [self.batch_times_seq, b.op("Unsqueeze", [count, b.const([0], np.int64)])])
        self.zero_rows = b.op("Min", [padded, b.const([1], np.int64)])
        graph.insert_before(next(iter(graph)), _own(b.nodes))

    @functools.cached_property
    def sequence_lengths(self) -> ir.Value:
        """Real tokens per row [B], int32."""
        b = Builder(f"{NAME}/sequences")
        rows = b.op("Reshape", [b.op("Cast", [self.real], {"to": ir.DataType.INT32}), self.batch_seq])
        lengths = b.op("ReduceSum", [rows, b.const([1], np.int64)], {"keepdims": 0})
        self._insert_after(self.batch_times_seq, b)
        return lengths

    @functools.cached_property
    def cumulative_lengths(self) -> ir.Value:
        """cumulative_sequence_length [B + 1], int32: row r's packed tokens are [c[r], c[r + 1])."""
        b = Builder(f"{NAME}/sequences")
        cumulative = b.op("Concat", [b.const([0], np.int32), b.op("CumSum", [self.sequence_lengths, b.const(0, np.int64)])],
                          {"axis": 0})
        self._insert_after(self.sequence_lengths, b)
        return cumulative

    @functools.cached_property
    def nonempty_rows(self) -> tuple[ir.Value, ir.Value]:
        """The rows with at least one real token (int64 [R], in batch order), and R (a scalar)."""
        b = Builder(f"{NAME}/sequences")
        nonempty = b.op("Greater", [self.sequence_lengths, b.const(0, np.int32)])
        rows = b.op("Reshape", [b.op("NonZero", [nonempty]), b.const([-1], np.int64)])
        count = b.op("Squeeze", [b.op("Shape", [rows]), b.const([0], np.int64)])
        self._insert_after(self.sequence_lengths, b)
        return rows, count

    @functools.cached_property
    def wide_rows(self) -> ir.Value:
        """bool scalar: the batch is padded to at least PER_SEQUENCE_WIDTH tokens."""
        b = Builder(f"{NAME}/sequences")
        width = b.op("Gather", [self.batch_seq, b.const(1, np.int64)])  # a scalar
        wide = b.op("GreaterOrEqual", [width, b.const(PER_SEQUENCE_WIDTH, np.int64)])
        self._insert_after(self.batch_seq, b)
        return wide

    @functools.cached_property
    def prompt_only(self) -> ir.Value:
        """bool scalar: the step has no cached tokens (the mask covers this step's tokens only)."""
        b = Builder(f"{NAME}/sequences")
        widths = [b.op("Shape", [x], {"start": 1, "end": 2}) for x in (self.mask.value, self.mask.tokens)]
        prompt = b.op("Squeeze", [b.op("Equal", widths), b.const([0], np.int64)])
        self._insert_after(self.batch_seq, b)
        return prompt

    @functools.cached_property
    def buckets(self) -> buckets.Buckets:
        """The rows in buckets of similar length, for attention on packed tokens in standard ops."""
        b = Builder(f"{NAME}/buckets")
        plan = buckets.plan(b, self.sequence_lengths)
        self._insert_after(self.sequence_lengths, b)
        return plan

    @functools.cached_property
    def token_offsets(self) -> ir.Value:
        """PackedMultiHeadAttention's token_offset [B, S], int32: real positions first, then padded ones."""
        b = Builder(f"{NAME}/sequences")
        padded = b.op("Reshape", [b.op("NonZero", [b.op("Not", [self.real])]), b.const([-1], np.int64)])
        order = b.op("Concat", [self.index, padded], {"axis": 0})
        offsets = b.op("Cast", [b.op("Reshape", [order, self.batch_seq])], {"to": ir.DataType.INT32})
        self._insert_after(self.batch_times_seq, b)
        return offsets

    def is_packed(self, value: ir.Value) -> bool:
        return self._packed.get(id(value)) is value

    def mark_packed(self, value: ir.Value, form: Form) -> None:
        self._packed[id(value)] = value
        self.layout.set_form(value, form)

    def forget_padded_shapes(self) -> None:
        """Packed values still carry the [batch, seq, ...] shapes the exporter annotated; ONNX Runtime
        plans buffer reuse by them and then warns at every run that they do not fit."""
        for value in self._packed.values():
            value.shape = None

    def packed(self, value: ir.Value, form: Form | None = None) -> ir.Value:
        """`value`'s real tokens; `form` for a value the layout does not call an activation (position ids)."""
        if id(value) not in self._packed:
            form = form or self.layout.form(value)
            b = Builder(f"{NAME}/pack")
            packed = self.pack(b, value, form)
            self._insert_after(value, b)
            self.mark_packed(packed, form)
            self._packed[id(value)] = packed
        return self._packed[id(value)]

    def pack(self, b: Builder, value: ir.Value, form: Form) -> ir.Value:
        """`value`'s real tokens, built with `b`: [B, S, ...] -> [1, B*S, ...] (a view) -> [1, n, ...]."""
        if form.kind == ROWS:
            return b.op("Gather", [value, self.index], {"axis": 0})
        tokens = b.op("Reshape", [value, b.const([1, -1] + [0] * (form.rank - 2), np.int64)])
        return b.op("Gather", [tokens, self.index], {"axis": 1})

    def padded(self, value: ir.Value) -> ir.Value:
        """The padded layout back, zeros at padded positions."""
        if id(value) not in self._padded:
            b = Builder(f"{NAME}/restore")
            self._padded[id(value)] = self.restore(b, value, self.layout.form(value))
            self._insert_after(value, b)
        return self._padded[id(value)]

    def restore(self, b: Builder, value: ir.Value, form: Form) -> ir.Value:
        """Packed `value` in the padded layout, zeros at padded positions, built with `b`."""
        return self._scattered(b, self._with_zero_row(b, value, form), form)

    def restored_output(self, value: ir.Value) -> ir.Value:
        """A packed graph output in the padded layout. One that a MatMul without a bias makes from packed
        rows, and that nothing else reads (an LM head's logits, as wide as the vocabulary), is made from
        those rows with the zero row appended, which the MatMul maps to the zero row the restore reads
        at padded positions: the wide tensor is written once, by the gather, not copied with a zero row
        first."""
        node = value.producer()
        x = node.inputs[0] if node is not None and node.op_type == "MatMul" and not value.uses() else None
        if x is None or not self.is_packed(x) or self.is_packed(node.inputs[1]):
            return self.padded(value)
        b = Builder(f"{NAME}/restore")
        product = b.op("MatMul", [self._with_zero_row(b, x, self.layout.form(x)), node.inputs[1]])
        restored = self._scattered(b, product, self.layout.form(value))
        self._insert_after(value, b)
        return restored

    def _with_zero_row(self, b: Builder, value: ir.Value, form: Form) -> ir.Value:
        """Packed `value` ([1, n, ...] or [n, ...]) with one zero row after its last token where the batch
        has a padded position (`zero_rows`)."""
        at = form.rank + form.lead - 1  # the end of the token axis in Pad's [begins..., ends...]
        pads = b.op("Concat", [b.const(np.zeros(at, np.int64)), self.zero_rows,
                               b.const(np.zeros(2 * form.rank - at - 1, np.int64))], {"axis": 0})
        return b.op("Pad", [value, pads])

    def _scattered(self, b: Builder, rows: ir.Value, form: Form) -> ir.Value:
        """Packed rows with a zero row after them in the padded layout of `form`: each position reads its
        row, or the zero row."""
        gathered = b.op("Gather", [rows, self.source], {"axis": form.lead - 1})
        return b.op("Reshape", [gathered, self._token_dims(form.rank)]) if form.kind == TOKENS else gathered

    def _token_dims(self, rank: int) -> ir.Value:
        """[B, S, 0, ...]: a [1, B*S, ...] tensor's Reshape target to [B, S, ...] (0 keeps a dim)."""
        if rank not in self._targets:
            b = Builder(f"{NAME}/shape")
            self._targets[rank] = b.op("Concat", [self.batch_seq, b.const([0] * (rank - 2), np.int64)], {"axis": 0})
            self._insert_after(self.batch_seq, b)
        return self._targets[rank]

    def padded_shape(self, value: ir.Value, start: int = 0, end: int | None = None) -> ir.Value:
        """Shape(padded value)[start:end], without restoring it."""
        form = self.layout.form(value)
        b = Builder(f"{NAME}/shape")
        leading = self.batch_seq if form.kind == TOKENS else self.batch_times_seq
        token_dims = end is not None and 0 <= start < end <= form.lead  # the same for every value: shared
        shape = leading if token_dims else self._shape(b, [leading], value, start=form.lead)
        if (start, end) != (0, None):
            ends = [np.iinfo(np.int64).max if end is None else end]
            shape = b.op("Slice", [shape, b.const([start], np.int64), b.const(ends, np.int64)])
        self._insert_after(value, b)
        return shape

    @staticmethod
    def _shape(b: Builder, head: list[ir.Value], value: ir.Value, start: int) -> ir.Value:
        return b.op("Concat", [*head, b.op("Shape", [value], {"start": start})], {"axis": 0})

    def _insert_after(self, value: ir.Value, builder: Builder) -> None:
        producer = value.producer()
        if producer is None:
            self.graph.insert_before(next(iter(self.graph)), _own(builder.nodes))
        else:
            self.graph.insert_after(producer, _own(builder.nodes))


def _own(nodes: list[ir.Node]) -> list[ir.Node]:
    """`nodes`, tagged as padding-free's own (core/facts.py)."""
    for node in nodes:
        tag_padding_free(node)
    return nodes


def apply(graph: ir.Graph, probe, mask: PaddingMask | None, target: str = "ort-cpu", verified: bool = True
          ) -> list[int]:
    """Rewrite `graph` to run its token-wise ops on real tokens only. Raises NoMatch. Returns the
    sequence positions that an op reads by index from a restored layout (a pooler's first token):
    where one of them is padded, that op reads a zero the original did not.

    Padded positions of a restored tensor are zeros, not what the original computed
    there. That is exact when nothing but token-wise ops, Shape readers, graph outputs
    (compared on real tokens) and attention that masks every padded key (its
    AttentionFacts say so) reads an activation; any other reader (rotary embeddings, a
    pooler, a cache) gets the padded layout restored only when the result is `verified`
    against the original, and makes the rewrite refused when it is not. Attention whose
    only mask is key padding runs on the packed tokens: as PackedMultiHeadAttention for
    ONNX Runtime's CUDA provider, as MultiHeadAttention on one sequence at a time for its
    CPU provider.
    """
    if mask is None:
        raise NoMatch("the model has no attention-mask input")
    if _RUNS_PACKED in graph.metadata_props:
        raise NoMatch("the model runs padding-free already")
    layout = Layout(probe, mask.value)
    positions = _check_padding_is_ignored(graph, layout, verified)
    packer = Packer(graph, mask, layout)
    packed_ops = 0
    for node in list(graph):
        if is_padding_free(node):
            continue
        forms = token_wise_forms(node, layout)
        if forms is not None:
            _run_packed(node, forms, layout, packer)
            packed_ops += 1
            continue
        if _attends_packed(node, layout, target):
            ATTEND_PACKED[target](node, packer)
            continue
        for i, x in enumerate(node.inputs):
            if x is not None and packer.is_packed(x):
                if node.op_type == "Shape":
                    replace_uses(node.outputs[0], packer.padded_shape(x, attr(node, "start", 0), attr(node, "end")))
                else:
                    node.replace_input_with(i, packer.padded(x))
    if packed_ops == 0:
        raise NoMatch("no token-wise op reads a [batch, seq, ...] activation")
    for i, output in enumerate(list(graph.outputs)):
        if packer.is_packed(output):
            restored = packer.restored_output(output)
            restored.name, output.name = output.name, f"{output.name}__packed"
            restored.type, restored.shape = output.type, output.shape
            graph.outputs[i] = restored
    packer.forget_padded_shapes()
    graph.metadata_props[_RUNS_PACKED] = "true"
    return positions


def _run_packed(node: ir.Node, forms: list[Form], layout: Layout, packer: Packer) -> None:
    found = registry.of_onnx(node.domain, node.op_type)
    per_token = found is not None and _positions_per_token(node, found[1], layout)
    for i, x in enumerate(node.inputs):
        slot = found[1].inputs[i] if per_token else None
        if x is None:
            continue
        if slot in _TABLES:
            if packer.is_packed(x):
                node.replace_input_with(i, packer.padded(x))
        elif slot == "position_ids":
            node.replace_input_with(i, packer.packed(x, Form(TOKENS, 2)))
        elif layout.form(x):
            node.replace_input_with(i, packer.packed(x))
    if node.op_type == "Reshape" and layout.seen(node.outputs[0]):
        # The target shape was computed for the padded layout: give the packed one.
        out_form = forms[0]
        trailing = list(layout.shapes(node.outputs[0])[0][out_form.lead:])
        head = [1, -1] if out_form.kind == TOKENS else [-1]
        b = Builder(f"{NAME}/reshape")
        node.replace_input_with(1, b.const(np.array(head + trailing, np.int64)))
        packer.graph.insert_before(node, _own(b.nodes))
    for out, form in zip(node.outputs, forms):
        if form is not None:  # a per-tensor output (a dynamic quantization's scale) is read as it is
            packer.mark_packed(out, form)


def _attention(node: ir.Node) -> registry.OnnxForm | None:
    """The form of a fused attention op of ours (MultiHeadAttention, GroupQueryAttention), or None."""
    found = registry.of_onnx(node.domain, node.op_type)
    return found[1] if found is not None and found[0] is registry.ATTENTION else None


def _attends_packed(node: ir.Node, layout: Layout, target: str) -> bool:
    """Fused attention on [batch, seq, hidden] q, k and v that can run on the packed tokens: MultiHeadAttention
    (or standard Attention) whose only mask is key padding (they have no causal flag), or GroupQueryAttention
    on ONNX Runtime's CPU provider whose masks are the padding mask and the causal triangle."""
    form, facts = _attention(node), attention_facts(node)
    if form is None or facts is None:
        return False
    if form in (MHA, STANDARD):
        packs = facts.key_padding_only
    else:
        packs = target == "ort-cpu" and facts.per_sequence
    if not packs:
        return False
    inputs = named_inputs(node, form)
    return all(layout.form(inputs.get(name)) == Form(TOKENS, 3) for name in _QKV)


def _attend_packed(node: ir.Node, packer: Packer) -> None:
    """MultiHeadAttention on padded q, k, v -> PackedMultiHeadAttention on the packed tokens (ORT CUDA)."""
    b = Builder(f"{NAME}/attention")
    token_dim = b.const([0], np.int64)
    inputs = named_inputs(node, MHA)
    q, k, v = (b.op("Squeeze", [packer.packed(inputs[name]), token_dim]) for name in _QKV)
    packed = registry.PACKED_MULTI_HEAD_ATTENTION
    arguments = packed.arguments(query=q, key=k, value=v, bias=inputs.get("bias"), token_offset=packer.token_offsets,
                                 cumulative_sequence_length=packer.cumulative_lengths)
    heads_and_scale = {name: a for name, a in node.attributes.items() if name in ("num_heads", "scale")}
    out = b.op(packed.op_type, arguments, heads_and_scale, domain=packed.domain, name=f"{node.name}/packed")
    _replace_attention(node, MHA, b, {"output": b.op("Unsqueeze", [out, token_dim])}, packer)


def _attend_cpu(node: ir.Node, packer: Packer) -> None:
    """Fused attention on padded q, k, v, for ONNX Runtime's CPU provider, which has no packed attention:
    If(the batch is padded to PER_SEQUENCE_WIDTH tokens or more, and has no cached tokens) one sequence
    at a time, else on the padded layout. Either way its output comes back packed, and its present k
    and v (with a cache) in the padded layout."""
    form = _attention(node)
    inputs = named_inputs(node, form)
    q, k, v = (packer.packed(inputs[name]) for name in _QKV)  # [1, n, hidden]
    outputs = _read_outputs(node, form)
    alternatives = {"then_branch": _per_sequence(node, form, packer, (q, k, v), outputs),
                    "else_branch": _on_padded_layout(node, form, packer, (q, k, v), outputs)}
    b = Builder(f"{NAME}/attention")
    made = b.ops("If", [_runs_per_sequence(b, packer, inputs.get("past_key"))],
                 {name: ir.AttrGraph(name, graph) for name, graph in alternatives.items()},
                 num_outputs=len(outputs), name=f"{node.name}/If")
    _replace_attention(node, form, b, dict(zip(outputs, made)), packer)


def _read_outputs(node: ir.Node, form: registry.OnnxForm) -> list[str]:
    """The attention output's name, then those of the other outputs the graph reads (present k and v)."""
    return ["output"] + [name for name, out in zip(form.outputs, node.outputs)
                         if name != "output" and (out.uses() or out.is_graph_output())]


def _runs_per_sequence(b: Builder, packer: Packer, past: ir.Value | None) -> ir.Value:
    """bool scalar: the batch is wide enough for the per-sequence Loop, and, for attention with a cache
    (`past`), there is no cached token to attend to (its mask covers every key: facts.masks_padded_keys)."""
    if past is None:
        return packer.wide_rows
    if packer.layout.cached:  # the mask covers the cached tokens too: one condition for every layer
        return b.op("And", [packer.wide_rows, packer.prompt_only])
    length = b.op("Squeeze", [b.op("Shape", [past], {"start": 2, "end": 3}), b.const([0], np.int64)])
    return b.op("And", [packer.wide_rows, b.op("Equal", [length, b.const(0, np.int64)])])


def _per_sequence(node: ir.Node, form: registry.OnnxForm, packer: Packer, qkv: tuple[ir.Value, ...],
                  outputs: list[str]) -> ir.Graph:
    """A Loop over the sequences with any real token, the attention op on each one's packed rows with no mask
    (causally where GroupQueryAttention is): no padded copies of q, k, v, no scores for padded keys, and
    no mask (ONNX Runtime's CPU MultiHeadAttention takes a slower path whenever it has one; GroupQueryAttention
    a dense bias). Each step costs some 50 us, so short rows do better on the padded layout. With no cached
    token, present k and v are the new ones, restored."""
    rows, count = packer.nonempty_rows
    cumulative = packer.cumulative_lengths

    step = ir.Value(name=f"{node.name}/step", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    going = ir.Value(name=f"{node.name}/going", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    collected = ir.Value(name=f"{node.name}/outputs")  # a sequence of [1, length, hidden]; ORT types it from the Loop
    body = Builder(f"{node.name}/sequence")
    row = body.op("Unsqueeze", [body.op("Gather", [rows, step]), body.const([0], np.int64)])
    start = body.op("Gather", [cumulative, row])
    end = body.op("Gather", [cumulative, body.op("Add", [row, body.const([1], np.int64)])])
    token_axis = body.const([1], np.int32)
    q_row, k_row, v_row = (body.op("Slice", [x, start, end, token_axis]) for x in qkv)
    attended = _one_sequence(body, node, form, q_row, k_row, v_row, body.op("Sub", [end, start]))
    appended = body.op("SequenceInsert", [collected, attended])
    body_graph = ir.Graph([step, going, collected], [body.op("Identity", [going]), appended], nodes=_own(body.nodes),
                          name=f"{node.name}/sequence")

    b = Builder(f"{NAME}/attention")
    nothing = b.const([0], np.int32)
    start_with = b.op("SequenceConstruct", [b.op("Slice", [qkv[0], nothing, nothing, b.const([1], np.int32)])])
    every = b.op("Loop", [count, None, start_with], {"body": ir.AttrGraph("body", body_graph)},
                 name=f"{node.name}/Loop")
    made = {"output": b.op("ConcatFromSequence", [every], {"axis": 1})}
    kv_heads = attr(node, "kv_num_heads")
    for name, new in (("present_key", qkv[1]), ("present_value", qkv[2])):
        if name in outputs:  # [B, kv heads, S, D]
            split = b.op("Reshape", [packer.restore(b, new, Form(TOKENS, 3)), b.const([0, 0, kv_heads, -1], np.int64)])
            made[name] = b.op("Transpose", [split], {"perm": [0, 2, 1, 3]})
    return ir.Graph([], [made[name] for name in outputs], nodes=_own(b.nodes), name=f"{node.name}/per_sequence")


def _one_sequence(b: Builder, node: ir.Node, form: registry.OnnxForm, q: ir.Value, k: ir.Value, v: ir.Value,
                  length: ir.Value) -> ir.Value:
    """The attention op on one sequence's rows (`length`: int64 [1]), without a mask or cache."""
    if form is MHA:
        inputs = dict(query=q, key=k, value=v, bias=named_inputs(node, MHA).get("bias"))
    else:
        length = b.op("Cast", [length], {"to": ir.DataType.INT32})
        inputs = dict(query=q, key=k, value=v, seqlens_k=b.op("Sub", [length, b.const([1], np.int32)]),
                      total_sequence_length=b.op("Squeeze", [length, b.const([0], np.int64)]))
    return b.op(form.op_type, form.arguments(**inputs), dict(node.attributes), domain=form.domain,
                name=f"{node.name}/one_sequence")


def _on_padded_layout(node: ir.Node, form: registry.OnnxForm, packer: Packer, qkv: tuple[ir.Value, ...],
                      outputs: list[str]) -> ir.Graph:
    """q, k, v restored to the padded layout, the attention op with its mask (and cache), the result packed."""
    b = Builder(f"{NAME}/attention")
    padded = {name: packer.restore(b, x, Form(TOKENS, 3)) for name, x in zip(_QKV, qkv)}
    arguments = form.arguments(**{**named_inputs(node, form), **padded})
    made = b.ops(form.op_type, arguments, dict(node.attributes), domain=form.domain,
                 num_outputs=max(form.output(name) for name in outputs) + 1, name=node.name)
    results = {name: made[form.output(name)] for name in outputs}
    results["output"] = packer.pack(b, results["output"], Form(TOKENS, 3))
    return ir.Graph([], [results[name] for name in outputs], nodes=_own(b.nodes), name=f"{node.name}/padded_layout")


def _attend_buckets(node: ir.Node, packer: Packer) -> None:
    """Standard Attention on padded q, k, v -> the same op on length buckets of the packed tokens (buckets.py),
    for runtimes without ONNX Runtime's ops."""
    b = Builder(f"{NAME}/attention")
    token_dim = b.const([0], np.int64)
    inputs = named_inputs(node, STANDARD)
    q, k, v = (b.op("Squeeze", [packer.packed(inputs[name]), token_dim]) for name in _QKV)
    out = buckets.attention(b, packer.buckets, q, k, v, dict(node.attributes))
    _replace_attention(node, STANDARD, b, {"output": b.op("Unsqueeze", [out, token_dim])}, packer)


ATTEND_PACKED = {"ort-cuda": _attend_packed, "ort-cpu": _attend_cpu, "openvino": _attend_buckets}


def _replace_attention(node: ir.Node, form: registry.OnnxForm, b: Builder, made: dict[str, ir.Value],
                       packer: Packer) -> None:
    """`made` (by `b`'s nodes) computes `node`'s outputs by name: its attention output on the packed tokens."""
    packer.graph.insert_before(node, _own(b.nodes))
    packer.mark_packed(made["output"], Form(TOKENS, 3))
    for name, value in made.items():
        replace_uses(node.outputs[form.output(name)], value)
    packer.graph.remove(node, safe=True)


def _check_padding_is_ignored(graph: ir.Graph, layout: Layout, verified: bool) -> list[int]:
    """Fused attention that does not mask every padded key would read the zeros a restore writes
    there: refuse. Any other reader of the padded layout gets it restored when verification will
    check that the zeros at padded positions change nothing real; without verification, refuse.
    Returns the positions that readers take by index (sorted)."""
    positions: set[int] = set()
    for node in graph:
        if token_wise_forms(node, layout) is not None or node.op_type == "Shape" \
                or not any(layout.form(x) for x in node.inputs if x is not None):
            continue
        fused_attention = _attention(node) is not None
        facts = attention_facts(node)
        if fused_attention and not (facts is not None and facts.masks_padded_keys):
            raise NoMatch(f"{node.op_type} {node.name} reads padded keys that its mask does not hide")
        if not fused_attention and not verified:
            raise NoMatch(f"{node.op_type} {node.name} reads activations at padded positions "
                          "(allowed only when the result is verified)")
        positions.update(_positions_read(node, layout))
    return sorted(positions)


def _positions_read(node: ir.Node, layout: Layout) -> list[int]:
    """The sequence positions a Gather takes from a [batch, seq, ...] activation by constant index
    (`hidden[:, 0]`, a pooler's first token)."""
    form = layout.form(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    if node.op_type != "Gather" or form is None or form.kind != TOKENS or attr(node, "axis", 0) % form.rank != 1:
        return []
    indices = constant(node.inputs[1], layout.probe)
    return [int(i) for i in indices.reshape(-1)] if indices is not None and indices.size <= 8 else []


