"""How ONNX spells each fused op: a Builder whose methods take the op's canonical arguments (the
same as the fx builder's) and write the ONNX Runtime node of core/registry.py's form for it.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from attnfuse.core import registry
from attnfuse.core.registry import OnnxForm
from attnfuse.core.rule import Replacement
from attnfuse.core.view import dtype_of
from attnfuse.passes.onnx.graph import Builder

Value = ir.Value


class OnnxBuilder(Builder):
    """Nodes of one rewrite, with the model's values read through `view`."""

    def __init__(self, prefix: str, view):
        super().__init__(prefix)
        self.view = view

    def replacement(self, label: str, claims: list[tuple[Value, Value]], **facts) -> Replacement:
        return Replacement(label, self.nodes, claims, self, facts)

    def fused(self, form: OnnxForm, inputs: dict[str, Value | None], attributes: dict | None = None,
              outputs: tuple[str, ...] = ()) -> Value | list[Value]:
        """The form's node on named inputs; its first output, or the `outputs` named (in that order)."""
        wanted = outputs or form.outputs[:1]
        count = max(form.output(name) for name in wanted) + 1
        made = self.op(form.op_type, form.arguments(**inputs), attributes, domain=form.domain,
                       num_outputs=count, name=f"{self.prefix}/{form.op_type}")
        made = made if isinstance(made, list) else [made]
        picked = [made[form.output(name)] for name in wanted]
        return picked if outputs else picked[0]

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
        if approximate == "tanh":
            return self.fused(registry.FAST_GELU, dict(X=x, bias=bias))
        if bias is None:
            return self.fused(registry.GELU_FORM, dict(X=x))
        return self.fused(registry.BIAS_GELU_FORM, dict(A=x, B=bias))

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
