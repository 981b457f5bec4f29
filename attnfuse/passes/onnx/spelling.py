"""How ONNX spells each fused op: a Builder whose methods take the op's canonical arguments (the
same as the fx builder's) and write the ONNX Runtime node of core/registry.py's form for it, or, for
a target whose runtime reads standard ONNX ops only, the same op in those (standard.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from attnfuse.core import registry
from attnfuse.core.facts import tag_spells, tag_token_positions
from attnfuse.core.measure.rotary import RotaryForm
from attnfuse.core.registry import OnnxForm
from attnfuse.core.rule import NoMatch, Replacement
from attnfuse.core.view import dtype_of
from attnfuse.passes.onnx import standard
from attnfuse.passes.onnx.graph import Builder

if TYPE_CHECKING:
    from attnfuse.passes.rules.projections import Projection

Value = ir.Value


class OnnxBuilder(Builder):
    """Nodes of one rewrite, with the model's values read through `view`; `standard`: the fused ops
    in standard ONNX ops (opset 23), for runtimes without ONNX Runtime's contrib ops."""

    def __init__(self, prefix: str, view, standard: bool = False):
        super().__init__(prefix)
        self.view = view
        self.standard = standard
        self.initializers: list[Value] = []  # new weights: the graph registers them when the rewrite is committed

    def replacement(self, label: str, claims: list[tuple[Value, Value]], **facts) -> Replacement:
        return Replacement(label, self.nodes, claims, self, facts)

    def fused(self, form: OnnxForm, inputs: dict[str, Value | None], attributes: dict | None = None,
              outputs: tuple[str, ...] = ()) -> Value | list[Value]:
        """The form's node on named inputs; its first output, or the `outputs` named (in that order)."""
        wanted = outputs or form.outputs[:1]
        if self.standard and standard.needs_spelling(form):
            given = {name: value for name, value in inputs.items() if value is not None}
            made = standard.spell(self, form, given, dict(attributes or {}))
            tag_spells(made[form.outputs[0]].producer(), registry.of_onnx(form.domain, form.op_type)[0])
            if any(name not in made for name in wanted):
                raise NoMatch(f"{form.op_type}'s {', '.join(n for n in wanted if n not in made)}: no standard spelling")
            return [made[name] for name in wanted] if outputs else made[wanted[0]]
        count = max(form.output(name) for name in wanted) + 1
        made = self.ops(form.op_type, form.arguments(**inputs), attributes, domain=form.domain,
                        num_outputs=count, name=f"{self.prefix}/{form.op_type}")
        picked = [made[form.output(name)] for name in wanted]
        return picked if outputs else picked[0]

    def slot(self, form: OnnxForm, name: str) -> str:
        """The input of the node written for `form` that takes what `form` takes in its input `name`."""
        return standard.slot(form, name) if self.standard else name

    def example(self, value: Value) -> np.ndarray:
        """`value` on one probe run: observed, a constant, or computed by this builder's nodes."""
        array = self._values.get(id(value))
        if array is None and value.name:
            array = self.view.value(value)
        if array is not None:
            return np.asarray(array)
        made = {id(out) for node in self.nodes for out in node.outputs}
        reads = [x for node in self.nodes for x in node.inputs
                 if x is not None and id(x) not in made and self.view.constant(x) is None]
        run = self.view.runs(*reads)[0] if reads else 0
        return self.view.evaluate(self.nodes, [value], {}, run)[0]

    def copy(self, node: ir.Node, replaced: dict) -> Value:
        """A copy of `node` that reads replaced[x] instead of each x that `replaced` holds; its first output."""
        inputs = [replaced.get(x, x) if x is not None else None for x in node.inputs]
        return self.op(node.op_type, inputs, dict(node.attributes), domain=node.domain)

    # ---- the fused ops, by their canonical arguments -----------------------------------------

    def skip_layer_norm(self, x: Value, skip: Value, gamma: Value | None, beta: Value | None, bias: Value | None,
                        eps: float) -> tuple[Value, Value]:
        """(layernorm(x + skip + bias), x + skip + bias)."""
        form = registry.SKIP_LAYER_NORMALIZATION
        y, total = self.fused(form, dict(input=x, skip=skip, gamma=self.vector(gamma, x, 1.0), beta=beta, bias=bias),
                              {"epsilon": eps}, outputs=("output", "input_skip_bias_sum"))
        return y, total

    def layer_norm(self, x: Value, gamma: Value | None, beta: Value | None, eps: float) -> Value:
        form = registry.LAYER_NORMALIZATION
        return self.fused(form, dict(X=x, Scale=self.vector(gamma, x, 1.0), B=self.vector(beta, x, 0.0)),
                          {"epsilon": eps, "axis": -1, "stash_type": 1})

    def rms_norm(self, x: Value, gamma: Value | None, eps: float) -> Value:
        form = registry.SIMPLIFIED_LAYER_NORMALIZATION
        return self.fused(form, dict(X=x, scale=self.vector(gamma, x, 1.0)), {"epsilon": eps, "axis": -1, "stash_type": 1})

    def skip_rms_norm(self, x: Value, skip: Value, gamma: Value | None, bias: Value | None,
                      eps: float) -> tuple[Value, Value]:
        """(rms_norm(x + skip + bias), x + skip + bias)."""
        form = registry.SKIP_SIMPLIFIED_LAYER_NORMALIZATION
        y, total = self.fused(form, dict(input=x, skip=skip, gamma=self.vector(gamma, x, 1.0), bias=bias),
                              {"epsilon": eps}, outputs=("output", "input_skip_bias_sum"))
        return y, total

    def embed_layer_norm(self, ids: Value, segment_ids: Value | None, word: Value, position: Value,
                         segment: Value | None, positions: Value, gamma: Value | None, beta: Value | None,
                         eps: float) -> tuple[Value, Value]:
        """(layernorm(word[ids] + position[positions] (+ segment[segment_ids])), the sum); the indices
        as int32 and the positions broadcast to the ids' shape, as the op takes them."""
        ids32, segments32, positions32 = (None if v is None else self.op("Cast", [v], {"to": ir.DataType.INT32})
                                          for v in (ids, segment_ids, positions))
        positions32 = self.op("Expand", [positions32, self.op("Shape", [ids])])
        y, total = self.fused(registry.EMBED_LAYER_NORMALIZATION,
                              dict(input_ids=ids32, segment_ids=segments32, word_embedding=word,
                                   position_embedding=position, segment_embedding=segment,
                                   gamma=self.vector(gamma, word, 1.0), beta=self.vector(beta, word, 0.0),
                                   position_ids=positions32),
                              {"epsilon": eps}, outputs=("output", "embedding_sum"))
        return y, total

    def bias_gelu(self, x: Value, bias: Value | None, approximate: str) -> Value:
        """gelu(x + bias): BiasGelu (erf), FastGelu (tanh), or com.microsoft's Gelu (erf, no bias)."""
        form = registry.gelu_form(approximate, bias is not None)
        return self.fused(form, dict(zip(form.inputs, (x, bias))))

    def rotary_caches(self, cos: Value, sin: Value, batch_axis: int | None, form: RotaryForm, tables=None
                      ) -> tuple[Value, Value, Value]:
        """RotaryEmbedding's (cos_cache, sin_cache, position_ids) for the cos and sin a rotary multiplies
        by (one row per token; `batch_axis` counts the batch's rows, None where the batch shares them).
        Where cos and sin are rows of constant tables, the tables and the position ids that gather them
        (cheaper: no per-token rows to build; measured on ONNX Runtime's CPU provider, see
        benchmarks/decoder_fusions.py); else each token's own row, with position ids that pick it
        (exact for any position, with no table of a guessed length)."""
        width = self.view.value(cos).shape[-1]
        pick = form.rows.pick(width)
        if tables is not None:
            cos_table, sin_table = (self.const(self.view.constant(t)[:, pick]) for t in (tables.cos, tables.sin))
            return cos_table, sin_table, self._int64(tables.positions)
        cos_cache, sin_cache = (self._token_rows(value, width, pick) for value in (cos, sin))
        if batch_axis is None:
            return cos_cache, sin_cache, self.const([0], np.int64)  # token s reads row 0 + s
        return cos_cache, sin_cache, self._own_rows(cos_cache, cos, batch_axis)

    def rotary(self, x: Value, tokens: Value | None, caches: tuple[Value, Value, Value], form: RotaryForm) -> Value:
        """x rotated by RotaryEmbedding, in x's layout. The op takes x's heads tokens first, merged
        ([B, S, H*D], from `tokens`); heads-first x is so rotated before its head transpose, which then
        follows the op: ONNX Runtime cancels it against attention's transpose back. Without `tokens`,
        heads-first x goes in as it is (the op reads 4-D input as [B, H, S, D])."""
        layout = form.layout
        cos_cache, sin_cache, positions = caches
        attributes = {"interleaved": int(form.interleaved)}
        if tokens is not None or form.width < layout.head_size:
            attributes.update(rotary_embedding_dim=form.width, num_heads=layout.heads)
        given = x if tokens is None else tokens
        if tokens is not None and self.view.value(tokens).ndim == 4:
            given = self.op("Reshape", [tokens, self.const([0, 0, -1], np.int64)])
        out = self.fused(registry.ROTARY_EMBEDDING, dict(input=given, position_ids=positions, cos_cache=cos_cache,
                                                        sin_cache=sin_cache), attributes)
        if self.view.constant(positions) is None:  # [B, S], not the shared offset [0]
            tag_token_positions(out.producer())
        if tokens is None or layout.rank == 3:
            return out
        out = self.op("Reshape", [out, self.const([0, 0, layout.heads, layout.head_size], np.int64)])
        return self.op("Transpose", [out], {"perm": [0, 2, 1, 3]}) if layout.heads_first else out

    def linear(self, x: Value, weight: Value) -> Value:
        """x @ weight^T, weight [out, in] (a linear without its bias)."""
        return self.op("MatMul", [x, self.op("Transpose", [weight], {"perm": [1, 0]})])

    def projections(self, x: Value, parts: Sequence[Projection], bias: np.ndarray | None) -> list[Value]:
        """x projected by every part's stored weight at once, split back into the parts: one MatMul
        whose weight is a new initializer, the parts' weights concatenated along their outputs (when
        it is read: until the model is run or written, the originals stay the only copy), then the
        biases end to end (`bias`), then Split."""
        sources = [(p.weight.const_value, p.out_in) for p in parts]
        inputs = sources[0][0].shape[1 if sources[0][1] else 0]
        shape = ir.Shape([inputs, sum(p.width for p in parts)])
        y = self.op("MatMul", [x, self.initializer(ir.LazyTensor(lambda: ir.tensor(_joined(sources)),
                                                                 sources[0][0].dtype, shape))])
        if bias is not None:
            y = self.op("Add", [y, self.const(bias)])
        return self.op("Split", [y, self.const([p.width for p in parts], np.int64)], {"axis": -1},
                       num_outputs=len(parts))

    def silu(self, x: Value, alpha: float) -> Value:
        """x * sigmoid(alpha * x): QuickGelu (SiLU with alpha 1)."""
        return self.fused(registry.QUICK_GELU, dict(X=x), {"alpha": alpha})

    def initializer(self, tensor: ir.TensorProtocol) -> Value:
        """A new weight of the graph."""
        value = ir.Value(name=self._name("weight"), shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.initializers.append(value)
        return value

    # ---- arguments as the ops take them -------------------------------------------------------

    def vector(self, value: Value | None, like: Value, fill: float) -> Value:
        """A norm's scale or bias as the fused ops take it: 1-D, of `like`'s dtype (`fill` everywhere
        when the graph has none)."""
        dtype = dtype_of(self.view, like)
        if value is None:
            return self.const(np.full(self.view.value(like).shape[-1], fill, dtype))
        array = self.view.constant(value)
        if array is not None and array.ndim != 1:
            value = self.op("Reshape", [value, self.const([-1], np.int64)])
        if array is not None and array.dtype != dtype:
            value = self.op("Cast", [value], {"to": ir.DataType.from_numpy(dtype)})
        return value

    def _token_rows(self, value: Value, width: int, pick: slice) -> Value:
        """[B * S (or S), rd / 2]: the angles of each token's row."""
        flat = self.op("Reshape", [value, self.const([-1, width], np.int64)])
        if pick == slice(0, width, 1):
            return flat
        starts, ends, axes, steps = ([v] for v in (pick.start, pick.stop, -1, pick.step))
        return self.op("Slice", [flat, *(self.const(v, np.int64) for v in (starts, ends, axes, steps))])

    def _own_rows(self, cache: Value, cos: Value, batch_axis: int) -> Value:
        """Position ids [B, S] that give each token its own row of `cache` (0 to B * S - 1)."""
        count = self.op("Squeeze", [self.op("Shape", [cache], {"start": 0, "end": 1}), self.const([0], np.int64)])
        every = self.op("Range", [self.const(0, np.int64), count, self.const(1, np.int64)])
        batch = self.op("Shape", [cos], {"start": batch_axis, "end": batch_axis + 1})
        return self.op("Reshape", [every, self.op("Concat", [batch, self.const([-1], np.int64)], {"axis": 0})])

    def _int64(self, value: Value) -> Value:
        if self.view.value(value).dtype == np.int64:
            return value
        return self.op("Cast", [value], {"to": ir.DataType.INT64})


def _joined(sources: list[tuple[ir.TensorProtocol, bool]]) -> np.ndarray:
    """Weights [in, out] (a linear's [out, in], transposed) concatenated along their outputs."""
    return np.concatenate([t.numpy().T if out_in else t.numpy() for t, out_in in sources], axis=1)
