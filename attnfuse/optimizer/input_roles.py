"""What each graph input is, read from the graph: its role and what each of its dims measures.

Names are hints, the graph is the evidence: token ids are the inputs that index an
embedding table, a cache flag is a boolean that decides an `If`, a KV cache is a
float input concatenated with new keys or values along its length axis. Each
symbolic dim is tied to one quantity (batch, new tokens, past tokens, total
tokens, encoder tokens, image side) so that inputs sharing a dim get the same size,
and a dim written as an expression of other dims ("past_sequence_length +
sequence_length") is computed from them.
"""
from __future__ import annotations

import ast
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from attnfuse.core import registry
from attnfuse.kernels.onnx_forms import GROUP_QUERY_ATTENTION, MATMUL_NBITS, MULTI_HEAD_ATTENTION

# Roles.
IDS, MASK, TOKEN_TYPES, POSITIONS = "ids", "mask", "token_types", "positions"
CACHE, ENCODER_CACHE, CACHE_FLAG, ENCODER_STATES = "cache", "encoder_cache", "cache_flag", "encoder_states"
PIXELS, FLOAT, OTHER = "pixels", "float", "other"
# Quantities a dim can measure.
BATCH, NEW, PAST, TOTAL, ENCODER, IMAGE, HEADS = "batch", "new", "past", "total", "encoder", "image", "heads"

# Ops that carry a value unchanged in meaning (ids to their Gather, a flag to its If).
_CARRIERS = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"})
_FLAG_CARRIERS = _CARRIERS | {"Not", "And", "Or", "Equal", "Greater", "Less", "ReduceMax", "ReduceMin"}
# Ops a mask passes through on its way to the attention scores: it is cast, broadcast to
# [B, 1, S, T], inverted, scaled, combined with a causal triangle, selected by.
_MASK_CARRIERS = _FLAG_CARRIERS | {
    "CastLike", "Tile", "Slice", "Concat", "Transpose", "Sub", "Mul", "Add", "Div", "Neg", "Xor", "LessOrEqual",
    "GreaterOrEqual", "Where", "Min", "Max", "Clip",
}
DEFAULT_IMAGE = 224  # the side most vision models are trained at, when the graph does not say


@dataclass(frozen=True)
class Dim:
    """One axis of an input: a fixed size, or what it measures (a quantity, or an expression
    of other dims), and the symbol the graph names it by (inputs sharing a symbol share a size)."""

    size: int | None = None
    quantity: str | None = None
    expression: Expression | None = None
    symbol: str | None = None


@dataclass(frozen=True)
class InputRole:
    """One graph input: its role and what each of its dims measures."""

    name: str
    role: str
    dtype: np.dtype
    dims: tuple[Dim, ...] | None  # None: the graph gives no shape
    table_rows: int | None = None  # ids and token types: rows of the table they index
    table_width: int | None = None  # ids: the width of the embeddings they look up (the hidden size)


@dataclass(frozen=True)
class Expression:
    """A symbolic dim written in terms of other dims, e.g. 'past_sequence_length + sequence_length'."""

    text: str

    def evaluate(self, sizes: dict[str, int]) -> int | None:
        try:
            return int(_evaluate(self._tree(), sizes))
        except (KeyError, SyntaxError, TypeError, ValueError, ZeroDivisionError):
            return None

    def names(self) -> set[str]:
        try:
            return {node.id for node in ast.walk(self._tree()) if isinstance(node, ast.Name)}
        except SyntaxError:
            return set()

    def _tree(self) -> ast.AST:
        # Exporters write products as "a * b" or "a x b" (Optimum's BLOOM caches).
        return ast.parse(self.text.replace(" x ", " * "), mode="eval").body


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Div: operator.floordiv}


def _evaluate(node: ast.AST, sizes: dict[str, int]) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return sizes[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left, sizes), _evaluate(node.right, sizes))
    raise ValueError("not a dim expression")


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    """The inputs a caller feeds (old models also list their initializers as inputs)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def read_roles(model: ir.Model) -> list[InputRole]:
    """The role of every graph input, in the graph's order."""
    values = graph_inputs(model)
    has_cache = any(_cache_kind(v) == CACHE for v in values)
    return [_role(model, value, has_cache) for value in values]


def padding_mask(roles: list[InputRole]) -> InputRole | None:
    """The mask of this step's tokens that padding-free packs by: the first [B, T] integer or bool
    mask that is not an encoder's (with a KV cache T counts the cached tokens too)."""
    return next((role for role in roles if role.role == MASK and role.dtype.kind in "biu" and role.dims is not None
                 and len(role.dims) == 2 and role.dims[-1].quantity != ENCODER), None)


def token_ids(roles: list[InputRole]) -> InputRole | None:
    """The [B, S] ids of this step's tokens."""
    return next((role for role in roles if role.role == IDS and role.dims is not None and len(role.dims) == 2), None)


def _role(model: ir.Model, value: ir.Value, has_cache: bool) -> InputRole:
    name = (value.name or "").lower()
    dtype = value.dtype.numpy() if value.dtype is not None and value.dtype != ir.DataType.UNDEFINED \
        else np.dtype(np.float32)
    shape = list(value.shape.dims) if value.shape is not None else None
    is_float = dtype.kind == "f"
    rows, width = _table(value) or (None, None)
    role = OTHER
    if _cache_kind(value):
        role = _cache_kind(value)
    elif "mask" in name:
        role = MASK
    elif dtype == np.bool_ and _decides_an_if(value):
        role = CACHE_FLAG
    elif "token_type" in name or (rows == 2 and not is_float):
        role = TOKEN_TYPES
    elif "position" in name and not is_float:
        role = POSITIONS
    elif is_float and "encoder" in name and shape is not None and len(shape) == 3:
        role = ENCODER_STATES
    elif is_float and shape is not None and len(shape) == 4:
        role = PIXELS
    elif not is_float and (rows is not None or "ids" in name):
        role = IDS
    elif not is_float and shape is not None and len(shape) == 2 and _masks_attention(value):
        role = MASK
    elif is_float:
        role = FLOAT
    dims = None if shape is None else tuple(_dim(d, axis, shape, role, name, has_cache) for axis, d in enumerate(shape))
    if role == PIXELS and dims is not None:
        dims = _image_dims(value, dims)
    if role == CACHE and dims is not None and len(dims) == 4 and dims[3].size is None and dims[3].quantity is None:
        head = _head_size(value)
        dims = dims if head is None else (*dims[:3], Dim(size=head, symbol=dims[3].symbol))
    return InputRole(value.name, role, dtype, dims, rows, width)


def _head_size(cache: ir.Value) -> int | None:
    """The head size of a [B, H, P, D] cache whose D the graph leaves open (onnxruntime-genai's
    "kv_cache_dim"), from the fused attention that reads it: its query's width over its heads, the
    query packed with the keys and values (no key input) counting kv_num_heads twice more."""
    for node, _ in cache.uses():
        heads = node.attributes.get("num_heads")
        if heads is None or node.op_type not in (GROUP_QUERY_ATTENTION.op_type, MULTI_HEAD_ATTENTION.op_type) \
                or not node.inputs:
            continue
        kv_heads = node.attributes.get("kv_num_heads")
        packed = len(node.inputs) < 2 or node.inputs[1] is None
        parts = heads.value + (2 * (kv_heads.value if kv_heads is not None else heads.value) if packed else 0)
        width = _width(node.inputs[0])
        if width is not None and width % parts == 0:
            return width // parts
    return None


def _width(value: ir.Value | None, depth: int = 3) -> int | None:
    """The static last dim of a projection's output: its recorded shape, its MatMul weight's columns,
    MatMulNBits' N; through a bias Add."""
    if value is None:
        return None
    if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
        return value.shape[-1]
    node = value.producer()
    if node is None or depth == 0:
        return None
    if node.op_type == MATMUL_NBITS.op_type and "N" in node.attributes:
        return node.attributes["N"].value
    if node.op_type == "MatMul" and len(node.inputs) == 2 and node.inputs[1] is not None \
            and node.inputs[1].shape is not None and isinstance(node.inputs[1].shape[-1], int):
        return node.inputs[1].shape[-1]
    if node.op_type == "Add":
        return next((w for w in (_width(x, depth - 1) for x in node.inputs) if w is not None), None)
    return None


def _cache_kind(value: ir.Value) -> str | None:
    """CACHE for past keys/values of self-attention, ENCODER_CACHE for cross-attention's."""
    name = (value.name or "").lower()
    dtype = value.dtype
    if dtype is None or not dtype.is_floating_point() or value.shape is None or len(value.shape) not in (3, 4, 5):
        return None
    if not any(word in name for word in ("past", "cache", "layer_past")):
        return None
    return ENCODER_CACHE if any(word in name for word in ("encoder", "cross")) else CACHE


def _dim(dim, axis: int, shape: list, role: str, name: str, has_cache: bool) -> Dim:
    """What one dim of an input measures."""
    if isinstance(dim, int):
        return Dim(size=dim)
    symbol = dim.value if dim is not None else None
    if symbol and (any(op in symbol for op in "+-*/") or " x " in symbol):
        return Dim(expression=Expression(symbol), symbol=symbol)
    return Dim(quantity=_quantity(axis, shape, role, name, has_cache), symbol=symbol)


def _quantity(axis: int, shape: list, role: str, name: str, has_cache: bool) -> str | None:
    """The quantity a symbolic dim measures; None for a size only the graph knows."""
    rank = len(shape)
    if role in (CACHE, ENCODER_CACHE):
        return _cache_quantity(axis, shape, role)
    if axis == 0 and role != CACHE_FLAG:
        return BATCH
    if role in (IDS, TOKEN_TYPES, POSITIONS):
        return NEW
    if role == MASK:
        if "encoder" in name or "cross" in name:
            return ENCODER
        if rank == 2:
            return TOTAL if has_cache else NEW
        return TOTAL if axis == rank - 1 and has_cache else NEW
    if role == ENCODER_STATES:
        return ENCODER if axis == 1 else None
    if role == PIXELS:
        return IMAGE if axis >= 2 else None
    return NEW


def _cache_quantity(axis: int, shape: list, role: str) -> str | None:
    """[B, H, P, D]; [2, B, H, P, D] (k and v stacked); [B*H, D, P] or [B*H, P, D] (BLOOM)."""
    length = PAST if role == CACHE else ENCODER
    if axis == cache_length_axis(shape):
        return length
    rank = len(shape)
    leading = {4: (BATCH, HEADS), 5: (None, BATCH, HEADS), 3: ()}[rank]
    return leading[axis] if axis < len(leading) else None


def cache_length_axis(shape: list) -> int:
    """The axis of a cache that grows with the tokens: the one named so, else the one before the last."""
    for axis, dim in enumerate(shape):
        text = getattr(dim, "value", None) or ""
        if axis and any(word in text for word in ("past", "sequence", "length")) and not any(op in text for op in "+*"):
            return axis
    return len(shape) - 2


def _decides_an_if(value: ir.Value, depth: int = 4) -> bool:
    frontier = [value]
    for _ in range(depth):
        following = []
        for v in frontier:
            for node, index in v.uses():
                if node.op_type == "If" and index == 0:
                    return True
                if node.op_type in _FLAG_CARRIERS:
                    following.extend(node.outputs)
        frontier = following
    return False


def _masks_attention(value: ir.Value, depth: int = 24) -> bool:
    """Whether `value` reaches attention scores as a mask: a Softmax, or a fused attention op (its
    mask, or the mask slot of a fused embedding), through ops that carry a mask only."""
    embed = registry.EMBED_LAYER_NORMALIZATION
    for node, index in _uses_through(value, _MASK_CARRIERS, depth, any_input=True):
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx") \
                or registry.is_fused_attention(node.domain, node.op_type):
            return True
        found = registry.of_onnx(node.domain, node.op_type)
        if found is not None and found[1] is embed and index == embed.slot("mask"):
            return True
    return False


def _uses_through(value: ir.Value, carriers: frozenset[str], depth: int, any_input: bool = False
                  ) -> Iterator[tuple[ir.Node, int]]:
    """The uses of `value` and of what carriers make of it (of their first input, or of `any_input`),
    nearest first, each node once."""
    frontier, seen = [value], set()
    for _ in range(depth):
        following = []
        for v in frontier:
            for node, index in v.uses():
                if (id(node), index) in seen:
                    continue
                seen.add((id(node), index))
                yield node, index
                if node.op_type in carriers and (index == 0 or any_input):
                    following.extend(node.outputs)
        frontier = following


# Fused embedding ops: which input indexes which table.
_FUSED_LOOKUPS = {registry.EMBED_LAYER_NORMALIZATION: {
    "input_ids": "word_embedding", "segment_ids": "segment_embedding", "position_ids": "position_embedding"}}


def _table(value: ir.Value) -> tuple[int, int | None] | None:
    """(rows, width) of the embedding table `value` indexes (the data of a Gather, or a fused
    embedding op's table), looking through casts and reshapes; None when no static table is found."""
    for node, index in _uses_through(value, _CARRIERS, len(_CARRIERS) + 1):
        table = None
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and index == 1:
            table = node.inputs[0]
        else:
            table = _fused_table(node, index)
        dims = _static_dims(table)
        if dims:
            return dims[0], dims[-1] if len(dims) == 2 else None
    return None


def _fused_table(node: ir.Node, index: int) -> ir.Value | None:
    """The table a fused embedding op looks its input `index` up in, or None."""
    found = registry.of_onnx(node.domain, node.op_type)
    form = found[1] if found is not None else None
    lookups = _FUSED_LOOKUPS.get(form, {})
    looked_up = form.inputs[index] if lookups and index < len(form.inputs) else None
    if looked_up not in lookups:
        return None
    table = form.slot(lookups[looked_up])
    return node.inputs[table] if table < len(node.inputs) else None


def _image_dims(pixels: ir.Value, dims: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """An image's channels and side, read from the patch Conv and the position table when open."""
    conv = _patch_conv(pixels)
    if conv is None or len(dims) != 4:
        return dims
    side = image_side(pixels)
    weight = _static_dims(conv.inputs[1])
    group = conv.attributes.get("group")
    channels = weight[1] * (group.value if group is not None else 1) if weight else None
    return (dims[0],
            Dim(size=channels) if channels and dims[1].size is None else dims[1],
            *(Dim(size=side) if d.quantity == IMAGE and side else d for d in dims[2:]))


def _patch_conv(pixels: ir.Value) -> ir.Node | None:
    return next((node for node, index in _uses_through(pixels, _CARRIERS, 4) if node.op_type == "Conv" and index == 0),
                None)


def image_side(pixels: ir.Value) -> int | None:
    """The image side a vision model's position table fits: the patch Conv's stride times the
    side of the square patch grid whose count (plus 0-2 special tokens) is the length of a
    table added to the patches (near the Conv, downstream of it)."""
    conv = _patch_conv(pixels)
    if conv is None or conv.graph is None:
        return None
    strides = conv.attributes.get("strides")
    stride = strides.value[0] if strides is not None else 1
    channels = (_static_dims(conv.inputs[1]) or [None])[0]
    for table in _tables_near(conv):
        dims = _static_dims(table)
        if channels is None or not dims or len(dims) not in (2, 3) or dims[-1] != channels:
            continue
        for special in (1, 0, 2):
            grid = math.isqrt(max(dims[-2] - special, 0))
            if grid > 1 and grid * grid == dims[-2] - special:
                return grid * stride
    return None


def _tables_near(conv: ir.Node, depth: int = 12) -> Iterator[ir.Value]:
    """Constants read by the ops downstream of `conv`, directly or through a lookup (Gather, Unsqueeze)."""
    frontier, seen = list(conv.outputs), set()
    for _ in range(depth):
        following = []
        for value in frontier:
            for node, _ in value.uses():
                if id(node) in seen:
                    continue
                seen.add(id(node))
                for x in node.inputs:
                    source = x.producer() if x is not None else None
                    if source is not None and source.op_type in ("Gather", "Unsqueeze", "Slice"):
                        x = source.inputs[0]
                    if x is not None and _static_dims(x) and (x.const_value is not None or _is_constant_node(x)):
                        yield x
                following.extend(node.outputs)
        frontier = following


def _is_constant_node(value: ir.Value) -> bool:
    node = value.producer()
    return node is not None and node.op_type == "Constant"


def _static_dims(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    if value.const_value is not None:
        return list(value.const_value.shape)
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return list(node.attributes["value"].value.shape)
    if value.shape is not None and all(isinstance(d, int) for d in value.shape.dims):
        return list(value.shape.dims)
    return None
