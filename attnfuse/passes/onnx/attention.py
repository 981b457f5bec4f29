"""Find attention by what it computes: softmax(q @ k^T * scale + bias) @ v.

Every Softmax is a candidate. From it the matcher walks
- back along the scores to the q @ k^T MatMul, collecting scalar scale factors,
  additive terms and masking Wheres ("the score path");
- back from the MatMul's operands through layout ops (Reshape, Transpose, ...)
  and scalar factors to q, k and v as [batch, seq, hidden] ("the roots");
- forward from the probabilities to the MatMul with v, and on through the head
  merge to the [batch, seq, hidden] output.
The exact ops on the way do not matter: layout is not checked op by op but
proved by running the fused op against the original (see proof.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from attnfuse.passes.onnx import heads
from attnfuse.passes.onnx.graph import NoMatch, attr, constant, consumers, observed, runs_seeing, scalar
from attnfuse.passes.onnx.heads import Heads
from attnfuse.passes.onnx.masks import MASKED
from attnfuse.passes.site import AttentionSite

LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "Dropout"}
HEAD_REPEATS = {"Expand", "Tile"}  # grouped-query attention repeats k and v heads; heads.recognise checks it


@dataclass
class ScoreStep:
    """One op between the q @ k^T MatMul and the Softmax, in the order applied."""

    kind: str  # "scale" | "add" | "sub" | "where" | "reshape" | "tanh"
    value: ir.Value | None = None  # the term added, the scale factor, or the Where condition
    factor: float = 1.0  # "scale": the number the scores are multiplied by
    divide: bool = False  # "scale": the graph divides by `value`
    fill: ir.Value | None = None  # Where: the value written where masked
    keep_when: bool = True  # Where: the condition value that keeps the score
    rank: int = 4  # rank of the score tensor at this step


@dataclass
class Candidate:
    site: AttentionSite
    softmax: ir.Node
    steps: list[ScoreStep] = field(default_factory=list)
    output_node: ir.Node | None = None  # produces site.output
    operands: tuple[Heads, Heads, Heads] | None = None  # q, k, v as the graph holds them
    nan_guard: bool = False  # rows whose keys are all masked come out zero (SDPA), not NaN
    value_size: int = 0  # v's head size (q and k have site.head_size)


def find_sites(graph: ir.Graph, probe, exclude=frozenset()) -> list[Candidate | AttentionSite]:
    """A Candidate for each Softmax that is attention, an unfused AttentionSite (with
    the reason) for each that is not."""
    found = []
    for index, node in enumerate(n for n in graph if n.op_type == "Softmax"):
        name = node.name or f"softmax_{index}"
        site = AttentionSite(name=name)
        if name in exclude:
            site.reason = "excluded (rolled back)"
            found.append(site)
            continue
        try:
            found.append(match(node, site, probe))
        except NoMatch as why:
            site.reason = str(why)
            found.append(site)
    return found


def match(softmax: ir.Node, site: AttentionSite, probe) -> Candidate:
    logits = softmax.inputs[0]
    rank = observed(logits, probe).ndim
    axis = attr(softmax, "axis", -1)
    if rank not in (3, 4) or axis not in (-1, rank - 1):
        raise NoMatch(f"softmax over axis {axis} of a rank-{rank} tensor is not over the keys")

    qk, steps = walk_scores(logits, probe)
    pv, guarded = probabilities_consumer(softmax.outputs[0])
    runs = runs_seeing([logits], probe)
    # What attention reads, per run, as [B, H, L, D]: q, k (from k^T) and v.
    wanted = [[_heads_first(observed(x, probe, run), observed(logits, probe, run), probe, run, transposed)
               for run in runs] for x, transposed in ((qk.inputs[0], False), (qk.inputs[1], True), (pv.inputs[1], False))]
    q, k, v = (_source(x, w, probe, runs, name) for x, w, name in zip((qk.inputs[0], qk.inputs[1], pv.inputs[1]), wanted,
                                                                       ("q", "k", "v")))
    if v.factor != 1.0:
        raise NoMatch("the values are scaled")
    batch, heads, seqlen, head_size = wanted[0][0].shape
    if q.heads != heads or k.heads != v.heads:
        raise NoMatch(f"q has {q.heads} of {heads} heads, k {k.heads} and v {v.heads}")
    v_size = int(wanted[2][0].shape[-1])
    output = walk_head_merge(pv.outputs[0], (batch, seqlen, heads * v_size), probe)
    site.q, site.k, site.v, site.output = q.value, k.value, v.value, output
    site.num_heads, site.head_size = int(heads), int(head_size)
    site.softcap, scale = _softcap(steps)
    site.scale = float(q.factor * k.factor * scale)
    return Candidate(site=site, softmax=softmax, steps=steps, output_node=output.producer(), operands=(q, k, v),
                     nan_guard=guarded, value_size=v_size)


def _softcap(steps: list[ScoreStep]) -> tuple[float, float]:
    """(c, the scale) for scores c * tanh(scale * q.k / c) before any mask; (0, the scale) without Tanh."""
    tanhs = [i for i, step in enumerate(steps) if step.kind == "tanh"]
    if not tanhs:
        return 0.0, float(np.prod([step.factor for step in steps if step.kind == "scale"]))
    if len(tanhs) > 1:
        raise NoMatch("the scores go through Tanh more than once")
    i = tanhs[0]
    after = [step for step in steps[i + 1:] if step.kind != "reshape"]
    if any(step.kind != "scale" for step in steps[:i] if step.kind != "reshape") or not after \
            or after[0].kind != "scale" or any(step.kind == "scale" for step in after[1:]):
        raise NoMatch("Tanh on the scores is not c * tanh(scores / c) ahead of the mask")
    cap = after[0].factor
    before = float(np.prod([step.factor for step in steps[:i] if step.kind == "scale"]))
    return float(cap), before * cap


def _heads_first(x: np.ndarray, scores: np.ndarray, probe, run: int, transposed: bool) -> np.ndarray:
    """A MatMul operand of attention as [B, H, L, D] (k^T transposed back)."""
    if x.ndim == 3:  # [B*H, L, D]: the batch from the scores, or the run's inputs
        batch = scores.shape[0] if scores.ndim == 4 else probe.inputs(run).batch
        if not batch or x.shape[0] % batch:
            raise NoMatch("cannot tell batch from heads in 3-D attention")
        x = x.reshape(batch, -1, *x.shape[1:])
    if x.ndim != 4:
        raise NoMatch(f"attention reads a rank-{x.ndim} tensor")
    return x.transpose(0, 1, 3, 2) if transposed else x


def _source(operand: ir.Value, wanted: list[np.ndarray], probe, runs: list[int], name: str) -> Heads:
    """The farthest tensor up the layout ops, head repeats and scalar factors that holds
    `operand`'s heads in a known layout."""
    path, value, factor = [(operand, 1.0)], operand, 1.0
    while (node := value.producer()) is not None:
        if node.op_type in LAYOUT_OPS or node.op_type in HEAD_REPEATS:
            value = node.inputs[0]
        elif node.op_type in ("Mul", "Div") and (found := scalar_operand(node, probe)):
            value, step, _ = found
            factor *= step
        else:
            break
        path.append((value, factor))
    for value, factor in reversed(path):
        if all(probe.get(value.name, run) is not None for run in runs):
            found = heads.recognise(value, factor, wanted, lambda x, run: observed(x, probe, run), runs)
            if found is not None:
                return found
    raise NoMatch(f"cannot find {name} in a known layout of heads")


def walk_scores(logits: ir.Value, probe) -> tuple[ir.Node, list[ScoreStep]]:
    """From the Softmax input back to the q @ k^T MatMul. Steps come out in applied order."""
    steps: list[ScoreStep] = []
    value = logits
    while True:
        node = value.producer()
        if node is None:
            raise NoMatch("the scores do not come from a MatMul")
        op = node.op_type
        rank = observed(value, probe).ndim
        if op == "MatMul" and not _is_projection(node, probe):
            steps.reverse()
            return node, steps
        if op in ("Cast", "Identity", "Dropout"):
            value = node.inputs[0]
        elif op == "Tanh":  # logit soft-capping: c * tanh(s / c)
            steps.append(ScoreStep("tanh", rank=rank))
            value = node.inputs[0]
        elif op in ("Reshape", "Unsqueeze", "Squeeze"):
            steps.append(ScoreStep("reshape", rank=rank))
            value = node.inputs[0]
        elif op in ("Mul", "Div"):
            found = scalar_operand(node, probe)
            if found is None:
                raise NoMatch(f"the scores are multiplied by a tensor ({op} {node.name})")
            value, factor, operand = found
            steps.append(ScoreStep("scale", operand, factor=factor, divide=op == "Div", rank=rank))
        elif op in ("Add", "Sub"):
            main, other = _split_main(node, probe)
            if op == "Sub" and main is not node.inputs[0]:
                raise NoMatch("the scores are subtracted from a tensor")
            steps.append(ScoreStep("add" if op == "Add" else "sub", other, rank=rank))
            value = main
        elif op == "Where":
            condition, if_true, if_false = node.inputs
            main_index = _main_index(node, probe, candidates=(1, 2))
            fill = if_false if main_index == 1 else if_true
            fill_value = constant(fill, probe)
            if fill_value is None or fill_value.size and fill_value.max() > MASKED:
                raise NoMatch("a Where on the scores writes a value that is not a mask")
            steps.append(ScoreStep("where", condition, fill=fill, keep_when=main_index == 1, rank=rank))
            value = node.inputs[main_index]
        else:
            raise NoMatch(f"{op} between the scores and the softmax")


def _is_projection(matmul: ir.Node, probe) -> bool:
    """A MatMul with a constant operand is a projection, not q @ k^T."""
    return any(constant(x, probe) is not None for x in matmul.inputs)


def scalar_operand(node: ir.Node, probe) -> tuple[ir.Value, float, ir.Value] | None:
    """For x * c, c * x or x / c with a constant scalar c: (x, the factor, c), else None."""
    if node.op_type == "Div":
        divisor = scalar(node.inputs[1], probe)
        return (node.inputs[0], 1.0 / divisor, node.inputs[1]) if divisor else None
    for i in (1, 0):
        factor = scalar(node.inputs[i], probe)
        if factor is not None:
            return node.inputs[1 - i], factor, node.inputs[i]
    return None


def _split_main(node: ir.Node, probe) -> tuple[ir.Value, ir.Value]:
    index = _main_index(node, probe, candidates=(0, 1))
    return node.inputs[index], node.inputs[1 - index]


def _main_index(node: ir.Node, probe, candidates) -> int:
    """Which operand carries the scores: the one that leads back to q @ k^T."""
    hits = [i for i in candidates if _reaches_scores(node.inputs[i], probe)]
    if len(hits) != 1:
        raise NoMatch(f"cannot tell the scores from the mask at {node.op_type} {node.name}")
    return hits[0]


def _reaches_scores(value: ir.Value, probe, depth: int = 0) -> bool:
    if value is None or depth > 64 or constant(value, probe) is not None:
        return False
    node = value.producer()
    if node is None:
        return False
    if node.op_type == "MatMul":
        return not _is_projection(node, probe)
    if node.op_type in ("Cast", "Identity", "Dropout", "Reshape", "Unsqueeze", "Squeeze", "Tanh"):
        return _reaches_scores(node.inputs[0], probe, depth + 1)
    if node.op_type in ("Mul", "Div", "Add", "Sub"):
        return any(_reaches_scores(x, probe, depth + 1) for x in node.inputs[:2])
    if node.op_type == "Where":
        return any(_reaches_scores(x, probe, depth + 1) for x in node.inputs[1:])
    return False


def probabilities_consumer(probs: ir.Value) -> tuple[ir.Node, bool]:
    """The MatMul that weights v by the probabilities, past casts and NaN guards; and whether a
    guard zeroes the rows that mask every key (which softmax leaves NaN)."""
    guarded = False
    while True:
        users = [node for node in consumers(probs) if node.op_type != "Shape"]
        if probs.is_graph_output():
            raise NoMatch("the attention probabilities are a graph output")
        ops = sorted(u.op_type for u in users)
        if ops == ["IsNaN", "Where"]:  # SDPA's guard: Where(IsNaN(p), 0, p)
            where = next(u for u in users if u.op_type == "Where")
            fill = constant(where.inputs[1])
            if where.inputs[2] is not probs or fill is None or np.any(fill != 0):
                raise NoMatch("unexpected Where on the probabilities")
            probs, guarded = where.outputs[0], True
            continue
        if len(users) != 1:
            raise NoMatch("the attention probabilities are used elsewhere")
        node = users[0]
        if node.op_type in ("Cast", "Identity", "Dropout", "Reshape", "Unsqueeze", "Squeeze"):
            probs = node.outputs[0]
        elif node.op_type == "MatMul" and node.inputs[0] is probs:
            return node, guarded
        else:
            raise NoMatch(f"the probabilities go into {node.op_type}, not a MatMul with v")


def walk_head_merge(value: ir.Value, merged_shape: tuple[int, ...], probe) -> ir.Value:
    """Forward through the head merge (Transpose, Reshape) to the [batch, seq, hidden] output.

    Shape readers do not count as uses: exporters read shapes to build the merge's
    target shape, and those readers die with the merge.
    """
    while observed(value, probe).shape != merged_shape:
        users = [node for node in consumers(value) if node.op_type != "Shape"]
        if value.is_graph_output() or len(users) != 1:
            break
        node = users[0]
        if node.op_type not in ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"):
            break
        value = node.outputs[0]
    return value
