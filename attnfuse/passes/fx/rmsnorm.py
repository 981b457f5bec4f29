"""(Residual +) RMSNorm -> attnfuse::rms_norm / attnfuse::skip_rms_norm, recognised by evaluation.

An RMSNorm is anchored at its statistic, a mean over the last dim of x squared. The
norm's output is the farthest tensor of x's shape after it whose region (the ops from
x to it) reads nothing but x and at most one vector of x's width (the weight, or
Gemma's 1 + weight). The region is not parsed: it is evaluated, once on the probe and
once on x scaled down to a mean square of 1e-12, where the epsilon dominates and can
be measured. It is accepted when it equals reference.rms_norm(x, weight, eps) at both
scales. A region without an epsilon is refused (it is not RMSNorm: x * rsqrt(mean(x^2))
is undefined at x = 0). When x is (a no-op cast of) a residual sum a + b, the fused
op takes a and b and also gives the sum back, which decoders read again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from attnfuse.kernels import ops, reference
from attnfuse.passes.fx.graph import (
    PASS_THROUGH, FxProbe, NoMatch, Rewrite, aten, between, close_enough, evaluate_region, is_op, region_inputs,
)

TOLERANCE = 1e-5
SMALL = 1e-12  # the mean square x is scaled to when measuring epsilon
NO_EPSILON = 1e-15  # an epsilon measured below this is none


@dataclass
class Norm:
    x: fx.Node
    output: fx.Node
    weight: fx.Node | None
    eps: float


def rms_norm(anchor: fx.Node, probe: FxProbe) -> Rewrite | None:
    """The rule: at a mean of squares, rms_norm(x) or, after a residual add, skip_rms_norm(a, b)."""
    norm = _norm(anchor, probe)
    if norm is None:
        return None
    residual = _residual(norm.x, probe)
    if residual is not None:
        return Rewrite(ops.skip_rms_norm, (*residual.args[:2], norm.weight, norm.eps), [norm.output, residual],
                       name="skip_rms_norm")
    return Rewrite(ops.rms_norm, (norm.x, norm.weight, norm.eps), [norm.output])


RULES = [("rms_norm", rms_norm)]


def _norm(anchor: fx.Node, probe: FxProbe) -> Norm | None:
    x = _mean_of_squares(anchor, probe)
    if x is None:
        return None
    shape = probe.tensor(x, 0).shape
    for output in _outputs(anchor, shape, probe):
        region = between(x, output)
        weight = _weight(region, x, shape[-1], probe) if region else False
        if weight is False:
            continue
        eps = _epsilon(region, x, weight, probe)
        if eps is not None and _is_norm(region, x, weight, max(eps, 0.0), probe):
            if eps < NO_EPSILON:
                raise NoMatch("x * rsqrt(mean(x^2)) * w has no epsilon: not an RMSNorm")
            return Norm(x, output, weight, eps)
    raise NoMatch("the mean of x^2 over the last dim does not feed x * rsqrt(mean(x^2) + eps) * w")


def _mean_of_squares(anchor: fx.Node, probe: FxProbe) -> fx.Node | None:
    """x, if `anchor` is mean(x * x or x ** 2) over x's last dim, kept as a dim."""
    if not is_op(anchor, aten.mean.dim) or not (len(anchor.args) > 2 and anchor.args[2] or anchor.kwargs.get("keepdim")):
        return None
    square = anchor.args[0]
    if is_op(square, aten.pow.Tensor_Scalar) and square.args[1] == 2:
        x = square.args[0]
    elif is_op(square, aten.mul.Tensor) and square.args[0] is square.args[1]:
        x = square.args[0]
    else:
        return None
    value = probe.tensor(x, 0)
    if value is None or not value.dtype.is_floating_point or list(anchor.args[1]) not in ([-1], [value.dim() - 1]):
        return None
    return x


def _outputs(anchor: fx.Node, shape: torch.Size, probe: FxProbe, depth: int = 6) -> list[fx.Node]:
    """Tensors of x's shape downstream of the statistic, farthest first."""
    found, frontier = [], [anchor]
    for _ in range(depth):
        frontier = [user for node in frontier for user in node.users if user not in found]
        found.extend(n for n in dict.fromkeys(frontier) if isinstance(probe.tensor(n, 0), torch.Tensor)
                     and probe.tensor(n, 0).shape == shape)
    return found[::-1]


def _weight(region: list[fx.Node], x: fx.Node, width: int, probe: FxProbe):
    """The one vector of x's width the region reads (None if it reads none); False if it reads anything else."""
    tensors = [t for t in region_inputs(region, x) if isinstance(probe.tensor(t, 0), torch.Tensor)]
    if len(tensors) > 1 or any(probe.tensor(t, 0).shape != (width,) for t in tensors):
        return False
    return tensors[0] if tensors else None


@torch.no_grad()
def _epsilon(region: list[fx.Node], x: fx.Node, weight: fx.Node | None, probe: FxProbe) -> float | None:
    """eps from the region on x scaled to a mean square of SMALL: 1 / rsqrt(SMALL + eps)^2 - SMALL."""
    small = _scaled_down(probe.tensor(x, 0))
    out = evaluate_region(region, x, small, probe, 0)
    if not isinstance(out, torch.Tensor) or out.shape != small.shape:
        return None
    numerator = small.float() * (probe.tensor(weight, 0).float() if weight is not None else 1.0)
    seen = (numerator.abs() > 1e-3 * numerator.abs().amax(-1, keepdim=True)) & (out != 0)
    if not seen.any():
        return None
    return float(((numerator / out.float()) ** 2 - SMALL)[seen].median())


def _scaled_down(x: torch.Tensor) -> torch.Tensor:
    """Each row of x scaled to a mean square of SMALL (rows of zeros left as they are)."""
    mean_square = x.float().pow(2).mean(-1, keepdim=True)
    factor = torch.where(mean_square > 0, (SMALL / mean_square.clamp_min(1e-30)).sqrt(), torch.ones_like(mean_square))
    return (x.float() * factor).to(x.dtype)


@torch.no_grad()
def _is_norm(region: list[fx.Node], x: fx.Node, weight: fx.Node | None, eps: float, probe: FxProbe) -> bool:
    for run in range(probe.runs):
        w = probe.tensor(weight, run) if weight is not None else None
        for value in (probe.tensor(x, run), _scaled_down(probe.tensor(x, run))):
            if not close_enough(evaluate_region(region, x, value, probe, run), reference.rms_norm(value, w, eps), TOLERANCE):
                return False
    return True


def _residual(x: fx.Node, probe: FxProbe) -> fx.Node | None:
    """The add a + b that x is (through no-op casts), when a and b both have x's shape."""
    node = x
    while is_op(node, *PASS_THROUGH) and all(
            torch.equal(probe.tensor(node, r), probe.tensor(node.args[0], r)) for r in range(probe.runs)):
        node = node.args[0]
    if not is_op(node, aten.add.Tensor) or node.kwargs.get("alpha", 1) != 1:
        return None
    shape = probe.tensor(x, 0).shape
    if all(isinstance(probe.tensor(a, 0), torch.Tensor) and probe.tensor(a, 0).shape == shape for a in node.args[:2]):
        return node
    return None
