"""Shared by the zoo and MiniLM: export a wrapper to ONNX quietly, and cache the file."""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import pathlib
import tempfile
import warnings
from typing import Callable, Mapping, Sequence

import torch

EXPORTERS = ("dynamo", "torchscript")


def default_cache_dir() -> pathlib.Path:
    root = os.environ.get("ATTNFUSE_CACHE")
    return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "attnfuse" / "zoo"


def versions_tag() -> str:
    """Exports depend on both libraries' versions; a new version means a new file."""
    import transformers

    torch_version = torch.__version__.split("+")[0]
    return f"torch{torch_version}-tf{transformers.__version__}"


@contextlib.contextmanager
def quiet():
    """Exporters and peers print progress, emoji and warnings on every call; keep them out of tests and benchmarks."""
    loggers = [logging.getLogger(name) for name in ("", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(
    module: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    dynamo: bool,
    dynamic_dims: Mapping[str, Mapping[int, str]],
    output_names: Sequence[str] = ("last_hidden_state",),
    opset: int = 18,
) -> pathlib.Path:
    """Export `module(*inputs.values())` as one self-contained .onnx file.

    `dynamic_dims` maps input names, and the output names, to {axis: dim name}. The inputs
    after the forward's named parameters go to its *args (a decoder's flat past k/v). From opset 23
    the dynamo exporter writes ONNX's own Attention, RMSNormalization and RotaryEmbedding.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(inputs)
    args = tuple(inputs[name] for name in names)
    common = dict(input_names=names, output_names=list(output_names), opset_version=opset)
    with quiet(), torch.no_grad():
        if dynamo:
            program = torch.onnx.export(
                module, args, dynamo=True, dynamic_shapes=_dynamo_shapes(module, names, dynamic_dims),
                optimize=True, verbose=False, **common,
            )
            program.save(str(path), external_data=False)
        else:
            dynamic_axes = {name: dict(dims) for name, dims in dynamic_dims.items()}
            torch.onnx.export(module, args, str(path), dynamo=False, dynamic_axes=dynamic_axes, **common)
    return path


def _dynamo_shapes(module: torch.nn.Module, names: list[str], dynamic_dims: Mapping[str, Mapping[int, str]]):
    """torch.export's dynamic_shapes follow the forward's structure: one entry per named
    parameter, and one tuple for *args."""
    shapes = [dict(dynamic_dims.get(name, {})) for name in names]
    parameters = inspect.signature(module.forward).parameters.values()
    named = [p.name for p in parameters if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    if len(names) <= len(named):
        return dict(zip(named, shapes))
    return (*shapes[:len(named)], tuple(shapes[len(named):]))


def cached(name: str, build: Callable[[pathlib.Path], object], cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return `<cache>/<name>-<versions>.onnx`, calling `build(tmp_path)` once to make it.

    The file is written under a temporary name and renamed, so a crashed or concurrent
    export never leaves a half-written model where a reader would find it.
    """
    folder = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / f"{name}-{versions_tag()}.onnx"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}-", suffix=".onnx")
    os.close(fd)
    try:
        build(pathlib.Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
