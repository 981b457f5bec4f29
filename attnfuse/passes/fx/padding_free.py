"""Padding-free execution on an fx graph: token-wise ops run on the real tokens only.

The same scheme as the ONNX pass (`passes/onnx/padding_free.py`). A token-major
activation is [B, S, ...] ("tokens") or [B*S, ...] ("rows"); its real tokens are
gathered once, where the first token-wise op reads it, into [1, T, ...] or
[T, ...], so every op keeps its rank and its dim arguments. Token-wise ops
(linear, elementwise, layernorm, the fused ops, and layout ops that leave the
token dims alone) then run on those rows; fused attention becomes
attnfuse::packed_attention. Padding is restored (zeros at padded positions, one
gather per activation) at the graph's outputs and before any other reader: a
pooler, a classifier on the first token, a masked mean. Such a reader then sees
zeros where the original saw padded values; verification proves that it never
reads them. A reader that takes constant sequence positions ([:, 0]) reads
padding whenever those positions are padded (the first token under left
padding): `Packed.real_positions` names them, and the optimizer runs the packed
graph only for batches in which they are real.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from attnfuse.core import registry
from attnfuse.kernels import ops, reference
from attnfuse.core.measure.masks import MASKED as HIDDEN
from attnfuse.passes.fx.graph import FxProbe, NoMatch, aten, is_op, remove_dead
from attnfuse.core.outcome import Fusion

NAME = "padding-free"
OP = "packed tokens"


def rolled_back(message: str) -> Fusion:
    """The report's padding-free entry when verification made the optimizer give it up."""
    return Fusion(NAME, OP, fused=False, reason=f"rolled back: with it, {message}")
TOKENS, ROWS = "tokens", "rows"

# aten ops that are token-wise elementwise (the fused ops say so in core/registry.py).
ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar, aten.neg.default,
    aten.gelu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default, aten.silu.default,
    aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten.contiguous.default, aten.clone.default,
    aten.alias.default,
}
ROW_WISE = {aten.linear.default, aten.layer_norm.default, aten.addmm.default, aten.mm.default, aten.matmul.default}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# Layout ops, with (position, default) of each dim argument: they must not touch the token dims.
DIM_OPS = {
    aten.transpose.int: ((1, None), (2, None)), aten.select.int: ((1, None),), aten.split.Tensor: ((2, 0),),
    aten.split_with_sizes.default: ((2, 0),), aten.unsqueeze.default: ((1, None),), aten.squeeze.dim: ((1, None),),
    aten.flatten.using_ints: ((1, 0), (2, -1)), aten.unflatten.int: ((1, None),), aten.chunk.default: ((2, 0),),
    aten.slice.Tensor: ((1, 0),),
}


@dataclass
class Packed:
    """What the pass did: the ops now on packed rows, the readers given the padded layout back,
    and the sequence positions those readers take by index (the packed graph is exact only
    for batches in which they are real)."""

    ops: int = 0
    restored_for: list[str] = field(default_factory=list)
    real_positions: tuple[int, ...] = ()

    def describe(self) -> str:
        text = f"packed tokens ({self.ops} ops)"
        if self.restored_for:
            text += f"; padding restored for {', '.join(self.restored_for)}"
        if self.real_positions:
            text += f"; batches with padding at positions {list(self.real_positions)} run the fused graph"
        return text


@dataclass(frozen=True)
class Form:
    kind: str  # TOKENS or ROWS

    @property
    def lead(self) -> int:
        return 2 if self.kind == TOKENS else 1


def form_of(value, size: tuple[int, int]) -> Form | None:
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        return None
    if value.dim() >= 3 and tuple(value.shape[:2]) == size:
        return Form(TOKENS)
    if value.dim() >= 2 and value.shape[0] == size[0] * size[1]:
        return Form(ROWS)
    return None


class Packer:
    """Packs, restores and remembers which nodes now hold packed rows."""

    def __init__(self, graph: fx.Graph, mask: fx.Node, probe: FxProbe):
        self.graph, self.mask, self.probe = graph, mask, probe
        self.sizes = [tuple(probe.tensor(mask, r).shape) for r in range(probe.runs)]
        self.packed: dict[fx.Node, Form] = {}
        self._packed_copy: dict[fx.Node, fx.Node] = {}
        self._restored: dict[fx.Node, fx.Node] = {}
        self.added: set[fx.Node] = set()
        # The flat positions of the real tokens, once, right after the inputs.
        last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
        self.indices = self._add_after(last_input, reference.token_indices, mask)
        self.batch = self._add_after(self.indices, aten.sym_size.int, mask, 0)
        self.length = self._add_after(self.batch, aten.sym_size.int, mask, 1)

    def _add(self, target, *args, **kwargs) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs)
        self.added.add(node)
        return node

    def _add_after(self, anchor: fx.Node, target, *args) -> fx.Node:
        with self.graph.inserting_after(anchor):
            return self._add(target, *args)

    def _after(self, node: fx.Node) -> fx.Node:
        """Where work on `node` goes: right after it, or after the indices for a graph input."""
        return self.length if node.op == "placeholder" else node

    def form(self, node) -> Form | None:
        """The node's form in every probe run, or None."""
        if node in self.packed:
            return self.packed[node]
        forms = {form_of(self.probe.get(node, r), self.sizes[r]) for r in range(self.probe.runs)} \
            if isinstance(node, fx.Node) else {None}
        return forms.pop() if len(forms) == 1 else None

    def value(self, node) -> torch.Tensor | None:
        return self.probe.tensor(node, 0)

    def pack(self, node: fx.Node, form: Form) -> fx.Node:
        """The packed rows of a token-major node (packed once, right after the node)."""
        if node in self.packed:
            return node
        if node not in self._packed_copy:
            rows = self._add_after(self._after(node), aten.flatten.using_ints, node, 0, 1) if form.kind == TOKENS else node
            picked = self._add_after(self._after(rows), aten.index_select.default, rows, 0, self.indices)
            packed = self._add_after(picked, aten.unsqueeze.default, picked, 0) if form.kind == TOKENS else picked
            self._packed_copy[node] = packed
            self.packed[packed] = form
        return self._packed_copy[node]

    def expand_and_pack(self, node: fx.Node, form: Form) -> fx.Node:
        """An operand broadcast over batch or sequence ([1, S, ...], [B, 1, ...]), made per token."""
        trailing = [-1] * (self.value(node).dim() - 2)
        full = self._add_after(self._after(node), aten.expand.default, node, [self.batch, self.length, *trailing])
        return self.pack(full, form)

    def restore(self, node: fx.Node, before: fx.Node) -> fx.Node:
        """The padded layout back, zeros at padded positions (restored once, before its first reader)."""
        if node not in self._restored:
            form = self.packed[node]
            with self.graph.inserting_before(before):
                rows = self._add(aten.squeeze.dim, node, 0) if form.kind == TOKENS else node
                padded = self._add(reference.unpack, rows, self.indices, self.batch, self.length)
                self._restored[node] = padded if form.kind == TOKENS else self._add(aten.flatten.using_ints, padded, 0, 1)
        return self._restored[node]

    def padded_size(self, form: Form, dim: int) -> fx.Node:
        """A token dim's size in the padded layout, from the mask."""
        if form.kind == TOKENS:
            return self.batch if dim == 0 else self.length
        with self.graph.inserting_after(self.length):
            return self._add(operator.mul, self.batch, self.length)


def apply(graph: fx.Graph, probe: FxProbe, mask: fx.Node) -> Packed:
    """Rewrite `graph` to run its token-wise ops on real tokens. Raises NoMatch."""
    packer = Packer(graph, mask, probe)
    done = Packed()
    positions: set[int] = set()
    for node in list(graph.nodes):
        if node in packer.added:
            continue
        if node.op == "output":
            _restore_outputs(node, packer)
        elif registry.of_torch(node.target) is registry.ATTENTION and _attend_packed(node, packer):
            done.ops += 1
        elif _run_packed(node, packer):
            done.ops += 1
        else:
            read = _restore_for_reader(node, packer)
            if read is not None:
                done.restored_for.append(node.name)
                positions |= read
    if done.ops == 0:
        raise NoMatch("no token-wise op reads a [batch, seq, ...] activation")
    remove_dead(graph)
    done.real_positions = tuple(sorted(positions))
    return done


def _tensor_args(node: fx.Node) -> list[tuple[int, fx.Node]]:
    return [(i, a) for i, a in enumerate(node.args) if isinstance(a, fx.Node)]


def _run_packed(node: fx.Node, packer: Packer) -> bool:
    """Run `node` on packed rows if it is token-wise; False (nothing changed) if not."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        source = node.args[0]
        if source in packer.packed and packer.form(node) is not None:
            packer.packed[node] = packer.packed[source]
            return True
        return False
    out = packer.form(node)
    if out is None and not _several_outputs(node, packer):
        return False
    plan = _operand_plan(node, out, packer)
    if plan is None:
        return False
    for i, how in plan:
        arg = node.args[i]
        form = packer.form(arg)
        node.update_arg(i, packer.expand_and_pack(arg, out) if how == "expand" else packer.pack(arg, form))
    if node.target in RESHAPES:
        trailing = list(packer.value(node).shape[out.lead:])
        node.update_arg(1, ([1, -1] if out.kind == TOKENS else [-1]) + trailing)
    packer.packed[node] = out if out is not None else packer.packed[node.args[0]]
    return True


def _operand_plan(node: fx.Node, out: Form | None, packer: Packer) -> list[tuple[int, str]] | None:
    """For a token-wise node: which args to pack ("pack") or expand then pack ("expand"); None if not token-wise."""
    target = node.target
    args = _tensor_args(node)
    token_major = [(i, a) for i, a in args if packer.form(a) is not None]
    if not token_major:
        return None
    if target in RESHAPES:
        return [(0, "pack")] if out is not None and args[0][0] == 0 and packer.form(args[0][1]) else None
    if target in DIM_OPS or target == aten.permute.default:
        x = node.args[0]
        form = packer.form(x)
        if form is None or (out is not None and out != form) or not _dims_clear(node, form, packer):
            return None
        return [(0, "pack")]
    if out is None and _elementwise(target):  # several outputs, like its first argument
        out = packer.form(node.args[0])
    if out is None:
        return None
    if target in ROW_WISE:
        x_index = 1 if target == aten.addmm.default else 0
        others = [a for i, a in args if i != x_index]
        if packer.form(node.args[x_index]) != out or any(packer.form(a) for a in others):
            return None
        if target in (aten.matmul.default, aten.mm.default) and packer.value(node.args[1]).dim() != 2:
            return None
        return [(x_index, "pack")]
    if _elementwise(target):
        plan = []
        rank = (packer.value(node.args[0]) if _several_outputs(node, packer) else packer.value(node)).dim()
        for i, a in args:
            how = _elementwise_operand(a, out, rank, packer)
            if how is None:
                return None
            if how != "as is":
                plan.append((i, how))
        return plan
    return None


def _elementwise(target) -> bool:
    """aten's elementwise ops, and the fused ops the registry calls token-wise."""
    fused = registry.of_torch(target)
    return target in ELEMENTWISE or (fused is not None and fused.token_wise)


def _several_outputs(node: fx.Node, packer: Packer) -> bool:
    """A node that gives a tuple (split, chunk, the skip norms' (y, x + skip)): each output has its
    first argument's form, and is read through getitem."""
    return isinstance(packer.probe.get(node, 0), (tuple, list))


def _elementwise_operand(arg: fx.Node, out: Form, out_rank: int, packer: Packer) -> str | None:
    """"pack" a token-major operand, "expand" one broadcast over batch or sequence, leave
    "as is" one that broadcasts over the trailing dims only; None if none of these."""
    form = packer.form(arg)
    if form is not None:
        return "pack" if form == out else None
    values = [packer.probe.tensor(arg, r) for r in range(packer.probe.runs)]
    if any(v is None for v in values):
        return "as is"  # a number
    if all(v.dim() <= out_rank - out.lead or (v.dim() == out_rank and set(v.shape[: out.lead]) == {1}) for v in values):
        return "as is"
    if out.kind == TOKENS and all(
        v.dim() == out_rank and all(d in (1, full) for d, full in zip(v.shape[:2], size))
        for v, size in zip(values, packer.sizes)
    ):
        return "expand"
    return None


def _dims_clear(node: fx.Node, form: Form, packer: Packer) -> bool:
    """Whether a layout op's dim arguments all lie past the token dims."""
    rank = packer.value(node.args[0]).dim()
    if node.target == aten.permute.default:
        return list(node.args[1][: form.lead]) == list(range(form.lead))
    if node.target == aten.unsqueeze.default:
        rank += 1
    for position, default in DIM_OPS[node.target]:
        dim = node.args[position] if len(node.args) > position else default
        if not isinstance(dim, int) or dim % rank < form.lead:
            return False
    return True


def _attend_packed(node: fx.Node, packer: Packer) -> bool:
    q, k, v, mask, bias, num_heads, scale, causal = node.args
    if any(packer.form(x) != Form(TOKENS) for x in (q, k, v)):
        return False
    if mask is not packer.mask and not (mask is None and bias is not None and _hides_padded_keys(bias, packer)):
        return False
    packed = [packer.pack(x, Form(TOKENS)) for x in (q, k, v)]
    node.target = registry.PACKED_ATTENTION.torch
    node.args = (*packed, packer.indices, packer.mask, bias, num_heads, scale, causal)
    packer.packed[node] = Form(TOKENS)
    return True


def _hides_padded_keys(bias: fx.Node, packer: Packer) -> bool:
    """Whether the additive bias hides every padded key from every real query."""
    for run in range(packer.probe.runs):
        value, real = packer.probe.tensor(bias, run), packer.probe.tensor(packer.mask, run) != 0
        if value is None or value.dim() != 4 or value.shape[-1] != real.shape[1]:
            return False
        value = ops.additive_mask(None, value, False, 0, 0, torch.float32, value.device)  # boolean masks too
        rows = real[:, None, :, None] if value.shape[-2] == real.shape[1] else torch.ones(1, 1, 1, 1, dtype=torch.bool)
        padded_keys = (~real)[:, None, None, :]
        value, padded_keys, rows = torch.broadcast_tensors(value, padded_keys, rows)
        if not bool((value[padded_keys & rows] <= HIDDEN).all()):
            return False
    return True


def _restore_outputs(output: fx.Node, packer: Packer) -> None:
    def restored(a):
        if isinstance(a, fx.Node) and a in packer.packed:
            return packer.restore(a, output)
        if isinstance(a, (list, tuple)):
            return type(a)(restored(x) for x in a)
        return a

    output.args = restored(output.args)


def _restore_for_reader(node: fx.Node, packer: Packer) -> set[int] | None:
    """A node that is not token-wise reads the padded layout, restored. Returns the sequence
    positions it takes by index, or None when it read no packed activation. The size of a
    token dim comes from the mask; a trailing dim's is the packed one's."""
    positions = None
    for i, a in _tensor_args(node):
        if a not in packer.packed:
            continue
        form = packer.packed[a]
        if node.target == aten.sym_size.int:
            if node.args[1] < form.lead:
                node.replace_all_uses_with(packer.padded_size(form, node.args[1]))
            continue
        node.update_arg(i, packer.restore(a, before=node))
        positions = (positions or set()) | (_positions_read(node) if form.kind == TOKENS and i == 0 else set())
    return positions


def _positions_read(reader: fx.Node) -> set[int]:
    """The sequence positions a reader of a [B, S, ...] tensor (its first argument) takes by
    constant index: x[:, i] or x[:, a:b], through whole slices of the batch dim (x[:, 0] is
    slice + select)."""
    bounds = _slice_bounds(reader) if is_op(reader, aten.slice.Tensor) else None
    if bounds == (0, 0, None):
        return set().union(*(_positions_read(user) for user in reader.users if user.args[0] is reader))
    if is_op(reader, aten.select.int) and reader.args[1] == 1 and isinstance(reader.args[2], int):
        return {reader.args[2]}
    if bounds is not None and bounds[0] == 1 and bounds[2] is not None and 0 <= bounds[1] < bounds[2] <= 8:
        return set(range(bounds[1], bounds[2]))
    return set()


def _slice_bounds(node: fx.Node) -> tuple[int, int, int | None] | None:
    """(dim, start, end) of a step-1 slice with constant bounds; end None when it runs to the end."""
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    if step != 1 or not all(isinstance(x, int) or x is None for x in (dim, start, end)):
        return None
    return dim, start or 0, None if end is None or end >= 2 ** 62 else end
