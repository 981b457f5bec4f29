"""A graph as the rules see it, whichever IR holds it: canonical ops, navigation, building.

An ONNX graph (onnx_ir) and a torch.fx graph (aten ops) spell the same arithmetic in
different ops: `Mul` and `aten.mul.Tensor`, `ReduceMean` and `aten.mean.dim`,
`Where(c, x, y)` and `aten.masked_fill(x, ~c, y)`. Each front-end's adapter maps its
ops onto the `Op`s below and their operands onto one order, so that a rule is written
once. What a construct computes is never read from ops: it is measured by evaluating
its region (see view.py); ops only say where to look and what a region may contain.

Values and nodes are the IR's own objects (onnx_ir.Value / Node, torch.fx.Node): the
adapter knows them, the rules only hand them back. An fx operand may also be a Python
number; the view reads it as a constant.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

Value = Any  # onnx_ir.Value or torch.fx.Node (or a Python number as an fx operand)
Node = Any  # onnx_ir.Node or torch.fx.Node


class Op(enum.Enum):
    """The canonical ops: what a rule asks a node to be."""

    # elementwise; operands in the op's own order
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    POW = "pow"
    NEG = "neg"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    RECIPROCAL = "reciprocal"
    EXP = "exp"
    ERF = "erf"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    CAST = "cast"  # a dtype change, or a copy
    IDENTITY = "identity"  # dropout at inference, identity, contiguous, alias
    WHERE = "where"  # (condition, where true, where false)
    ISNAN = "isnan"
    # reductions: axes() and keepdims()
    REDUCE_MEAN = "reduce_mean"
    REDUCE_SUM = "reduce_sum"
    REDUCE_SUM_SQUARE = "reduce_sum_square"
    REDUCE_L2 = "reduce_l2"
    # layout: the first operand is the data
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    SQUEEZE = "squeeze"
    UNSQUEEZE = "unsqueeze"
    EXPAND = "expand"
    SLICE = "slice"
    SPLIT = "split"
    CONCAT = "concat"  # operands: the pieces
    STACK = "stack"  # operands: the pieces, stacked along a new axis
    GATHER = "gather"  # (data, indices)
    ITEM = "item"  # one output of a multi-output node (fx's getitem)
    SHAPE = "shape"  # reads a shape, not values
    # linear algebra
    MATMUL = "matmul"  # (a, b)
    BADDBMM = "baddbmm"  # (c, a, b): beta * c + alpha * (a @ b), batched
    LINEAR = "linear"  # (x, weight [out, in], bias or None): x @ weight^T + bias
    # whole ops
    SOFTMAX = "softmax"  # axes(): the one axis
    LAYER_NORM = "layer_norm"  # (x, weight, bias); epsilon, over the last axis
    GELU = "gelu"  # (x,); approximate: "none" | "tanh"
    SDPA = "sdpa"  # scaled_dot_product_attention (q, k, v, mask)
    FUSED = "fused"  # an op of core.registry already in the graph


ELEMENTWISE = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.NEG, Op.SQRT, Op.RSQRT, Op.RECIPROCAL,
                         Op.EXP, Op.ERF, Op.TANH, Op.SIGMOID, Op.CAST, Op.IDENTITY})
REDUCTIONS = frozenset({Op.REDUCE_MEAN, Op.REDUCE_SUM, Op.REDUCE_SUM_SQUARE, Op.REDUCE_L2})
LAYOUT = frozenset({Op.RESHAPE, Op.TRANSPOSE, Op.SQUEEZE, Op.UNSQUEEZE, Op.CAST, Op.IDENTITY})


class Graph(Protocol):
    """One graph of a model (the main graph, or an If branch / Loop body) through canonical ops."""

    def nodes(self) -> list[Node]:
        """The graph's nodes in order (not those of its subgraphs)."""

    def op(self, node: Node) -> Op | None:
        """The canonical op of `node`, None for anything else."""

    def operands(self, node: Node) -> list[Value | None]:
        """Its inputs in the canonical op's order (see Op); None for an absent optional one."""

    def outputs(self, node: Node) -> list[Value]:
        """The values it computes (an fx node is its own single value)."""

    def producer(self, value: Value) -> Node | None:
        """The node computing `value`; None for inputs, weights and numbers."""

    def users(self, value: Value) -> list[Node]:
        """The nodes reading `value`, shape readers included, each once."""

    def is_output(self, value: Value) -> bool:
        """A graph output (its value must stay what it is)."""

    def is_input(self, value: Value) -> bool:
        """A graph input (a placeholder), not a weight."""

    def stored_elsewhere(self, value: Value) -> bool:
        """A weight the model keeps outside itself (ONNX external data): a new tensor made from it
        would be a copy in memory beside it."""

    def label(self, node: Node) -> str:
        """The node's name: what a report calls it, and what a rollback excludes."""

    def axes(self, node: Node) -> tuple[int, ...] | None:
        """The axes a reduction or softmax works on, as the graph gives them (maybe negative)."""

    def keepdims(self, node: Node) -> bool:
        """Whether a reduction keeps the reduced axes."""

    def attribute(self, node: Node, name: str, default: Any = None) -> Any:
        """A canonical attribute: "epsilon" (LAYER_NORM), "approximate" (GELU), "fused_op" (FUSED)."""

    def alive(self, node: Node) -> bool:
        """Still part of the graph (an earlier rewrite may have replaced it)."""

    def op_name(self, op: Any, form: Any = None) -> str:
        """What this IR calls a fused op of core.registry (in ONNX, the op type of `form`)."""

    def builder(self, label: str) -> Any:
        """A builder for one rewrite (the adapter's; see its spellings of the fused ops)."""

    def commit(self, replacement: Any) -> None:
        """Put the rewrite's nodes into the graph and point every reader of each claimed value at
        its replacement."""

    def settle(self) -> None:
        """Forget the nodes of every rewrite built since the last settle and not committed."""

    def padding_mask(self) -> Value | None:
        """The model's padding-mask input ([B, T], nonzero for a real token; with a KV cache it covers
        the cached and the new tokens), None without one."""

    def attention_lowerings(self, match: Any, view: Any, options: Any) -> Iterator[Any]:
        """This IR's replacements for an attention match (rules/attention.py), the preferred first."""


def walk_back(graph: Graph, value: Value, through: Iterable[Op], limit: int = 64) -> Value:
    """The first value up from `value` that `through` ops do not produce (following their first operand)."""
    ops = frozenset(through)
    for _ in range(limit):
        node = graph.producer(value)
        if node is None or graph.op(node) not in ops:
            break
        value = graph.operands(node)[0]
    return value


def single_user(graph: Graph, value: Value) -> Node | None:
    """The one node that reads `value` (shape readers aside), None if it has other readers or is an output."""
    users = [node for node in graph.users(value) if graph.op(node) is not Op.SHAPE]
    return users[0] if len(users) == 1 and not graph.is_output(value) else None


def nodes_of(graph: Graph, ops: Sequence[Op] | frozenset[Op]) -> list[Node]:
    wanted = frozenset(ops)
    return [node for node in graph.nodes() if graph.op(node) in wanted]
