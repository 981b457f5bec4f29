"""Running a model in OpenVINO, for verifying what the openvino target writes.

OpenVINO can abort the process on a graph it mis-runs (`free(): corrupted unsorted chunks` on a Loop that
carries a sequence), so a model runs in a child process: the model and its input sets go to a scratch
folder, the child compiles the model for the CPU at the precision asked for and writes the outputs back.
A child that dies is an error of that run, not of attnfuse's.

This file is also the child (`python openvino_run.py MODEL FEEDS OUTPUTS PRECISION GROUP`): as such it imports
numpy and openvino only.
"""
from __future__ import annotations

import sys

import numpy as np

INSTALL = "pip install 'attnfuse[openvino]'"
PRECISIONS = ("f32", "bf16")
# What a CPU needs for OpenVINO's bf16 to be native (else it emulates it, slower than f32).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# OpenVINO's CPU default for DYNAMIC_QUANTIZATION_GROUP_SIZE: activations quantized per 32 values along K.
ACTIVATION_GROUP = 32


def installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):  # a module that is blocked (sys.modules[name] = None) has no spec
        return False


def has_bf16() -> bool:
    """Whether this CPU computes bf16 natively: AVX512_BF16 or AMX (read from /proc/cpuinfo; elsewhere,
    OpenVINO's own list of the CPU's capabilities)."""
    try:
        with open("/proc/cpuinfo") as info:
            return bool(BF16_FLAGS & set(info.read().split()))
    except OSError:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def run(model, feeds: list[dict[str, np.ndarray]], precision: str = "f32", int8_activations: bool = False
        ) -> list[dict[str, np.ndarray]]:
    """`model` (an onnx_ir.Model) compiled by OpenVINO for the CPU at `precision` (its
    INFERENCE_PRECISION_HINT), run on each set of `feeds`: the outputs by name. OpenVINO quantizes the
    activations of MatMuls with int8 weights per group of ACTIVATION_GROUP, as it does by default, only
    with `int8_activations`: without, such a MatMul computes in float. RuntimeError when OpenVINO refuses
    the model or its process dies."""
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    from attnfuse.optimizer import io

    with tempfile.TemporaryDirectory(prefix="attnfuse-openvino-") as scratch:
        folder = Path(scratch)
        io.save_model(model, folder / "model.onnx")
        np.savez(folder / "feeds.npz", **{f"{i}/{name}": array for i, sets in enumerate(feeds)
                                          for name, array in sets.items()})
        command = [sys.executable, os.path.abspath(__file__), *(str(folder / name) for name in
                                                                 ("model.onnx", "feeds.npz", "outputs.npz")), precision,
                   str(ACTIVATION_GROUP if int8_activations else 0)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"OpenVINO {_ended(done.returncode)}: {_last_line(done.stderr)}")
        wanted = {value.name for value in model.graph.outputs}
        with np.load(folder / "outputs.npz") as saved:
            outputs: list[dict[str, np.ndarray]] = [{} for _ in feeds]
            for key in saved.files:
                index, name = key.split("/", 1)
                if name in wanted:
                    outputs[int(index)][name] = saved[key]
    return outputs


def _ended(code: int) -> str:
    if code < 0:
        import signal

        return f"died ({signal.Signals(-code).name})"
    return f"failed (exit {code})"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    meaningful = [line for line in lines if not line.startswith(("Exception from src", "Traceback", "File "))]
    return (meaningful or lines or ["no message"])[-1][:400]


def _child(model: str, feeds: str, outputs: str, precision: str, activation_group: str) -> None:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                      "DYNAMIC_QUANTIZATION_GROUP_SIZE": activation_group})
    request = compiled.create_infer_request()
    sets: dict[str, dict[str, np.ndarray]] = {}
    with np.load(feeds) as saved:
        for key in saved.files:
            index, name = key.split("/", 1)
            sets.setdefault(index, {})[name] = saved[key]
    results = {}
    for index, given in sets.items():
        got = request.infer({port: given[_named(port, given)] for port in compiled.inputs})
        # A port has every name of its tensor: the model's output name is one of them (padding-free's restore
        # gave it that name); the parent keeps those it asked for.
        results.update({f"{index}/{name}": np.array(got[port]) for port in compiled.outputs for name in port.get_names()})
    np.savez(outputs, **results)


def _named(port, names) -> str:
    return next(name for name in port.get_names() if name in names)


if __name__ == "__main__":
    _child(*sys.argv[1:6])
