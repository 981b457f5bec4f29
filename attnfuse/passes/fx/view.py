"""The View over an fx graph: the probe's values as numpy arrays, and regions evaluated in torch.

Measurements (core/measure) are written over numpy arrays, so values come out as arrays of
the tensor's own dtype (bfloat16 through ml_dtypes). A region is evaluated by running its
nodes' aten ops in order on the chosen points, with everything else as on the run.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Number

import numpy as np
import torch
import torch.fx as fx

from attnfuse.core.rule import NoMatch
from attnfuse.passes.fx.graph import FxProbe, evaluate


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


class TorchView:
    """A View (core/view.py) of an fx graph on the probe's runs. `mask` is the padding-mask placeholder
    and `tokens` the ids (or embeddings) placeholder of this step's tokens; with a KV cache the mask
    is wider than the tokens (it covers the cache too)."""

    def __init__(self, probe: FxProbe, mask: fx.Node | None = None, tokens: fx.Node | None = None):
        self.probe, self.mask, self.tokens = probe, mask, tokens
        self._arrays: dict[tuple[fx.Node, int], np.ndarray] = {}

    @property
    def run_count(self) -> int:
        return self.probe.runs

    def value(self, x, run: int | None = None) -> np.ndarray | None:
        if isinstance(x, Number):
            return np.asarray(x)
        if not isinstance(x, fx.Node):
            return None
        for r in range(self.run_count) if run is None else [run]:
            tensor = self.probe.tensor(x, r)
            if tensor is not None:
                key = (x, r)
                if key not in self._arrays:
                    self._arrays[key] = to_numpy(tensor)
                return self._arrays[key]
        return None

    def tensor(self, x, run: int) -> torch.Tensor | None:
        return self.probe.tensor(x, run)

    def runs(self, *values) -> list[int]:
        runs = [r for r in range(self.run_count)
                if all(isinstance(v, Number) or self.probe.tensor(v, r) is not None for v in values)]
        if not runs:
            raise NoMatch("no run computed every value the rewrite reads")
        return runs

    def constant(self, x) -> np.ndarray | None:
        if isinstance(x, Number):
            return np.asarray(x)
        if not isinstance(x, fx.Node) or x.op == "placeholder":
            return None
        seen = [self.value(x, r) for r in range(self.run_count)]
        if any(v is None for v in seen):
            return None
        if x.op == "get_attr" or (len(seen) >= 2 and all(v.shape == seen[0].shape and np.array_equal(v, seen[0])
                                                         for v in seen[1:])):
            return seen[0]
        return None

    def evaluate(self, nodes: Sequence[fx.Node], outputs: Sequence[fx.Node], feeds: Mapping[fx.Node, np.ndarray],
                 run: int) -> list[np.ndarray]:
        env = {node: to_torch(array) for node, array in feeds.items()}
        try:
            with torch.no_grad():
                for node in nodes:
                    env[node] = evaluate(node, env, self.probe, run)
        except Exception as error:  # the ops refuse these shapes or types
            raise NoMatch(f"the fused op does not run on the probe's values: {str(error).splitlines()[0][:300]}") \
                from None
        return [to_numpy(env[out]) if out in env else self.value(out, run) for out in outputs]

    def real(self, run: int) -> np.ndarray | None:
        if self.mask is None:
            return None
        real = self.probe.tensor(self.mask, run) != 0
        width = self._new_tokens(run)
        return to_numpy(real[:, -width:] if width else real)

    def real_total(self, run: int) -> np.ndarray | None:
        if self.mask is None:
            return None
        real = self.probe.tensor(self.mask, run) != 0
        width = self._new_tokens(run)
        return to_numpy(real) if width and width < real.shape[1] else None

    def batch(self, run: int) -> int:
        for node, value in self.probe.values[run].items():
            if node.op == "placeholder" and isinstance(value, torch.Tensor):
                return value.shape[0]
        raise NoMatch("the graph has no tensor input")

    def committed(self, replacement) -> None:
        self.probe.record(*replacement.nodes)
        for old, new in replacement.claims:
            self.probe.alias(new, old)
        self._arrays.clear()

    def _new_tokens(self, run: int) -> int | None:
        tokens = self.probe.tensor(self.tokens, run) if self.tokens is not None else None
        return tokens.shape[1] if tokens is not None and tokens.dim() >= 2 else None
