"""attnfuse at the size people deploy: a 1.1B Llama of TinyLlama's shape (hidden 2048, 22 layers,
32 query / 4 key-value heads, MLP 5632, vocab 32000; random weights), exported by Optimum with its
KV cache (`model.onnx` + `model.onnx_data`) and optimized through the command line.

Optimum needs a venv of its own (optimum-onnx 0.1.0 caps transformers below 4.58), made by
`bash benchmarks/peers/optimum_venv.sh`, that is:

    python -m venv ~/.cache/attnfuse/venvs/optimum && ~/.cache/attnfuse/venvs/optimum/bin/pip install torch==2.13.0 \
        && ~/.cache/attnfuse/venvs/optimum/bin/pip install "optimum-onnx[onnxruntime]==0.1.0"

(the onnxruntime extra: the export's last step, which fixes the dynamic shapes, needs it.)

then, here:

    python benchmarks/scale_llama.py [--json benchmarks/results/scale_llama.json]

Steps, each skipped when its output is already in the cache folder (~/.cache/attnfuse/scale_llama):
1. the model, from a transformers LlamaConfig with random weights (seed 0), saved with
   save_pretrained (in Optimum's venv, whose transformers reads it back);
2. `optimum-cli export onnx --task text-generation-with-past` of it;
3. `attnfuse optimize model.onnx -o out.onnx --report r.json` in a fresh process, into a temporary
   folder that is removed after: wall time, peak resident memory of that process (VmHWM), the
   weights' size on disk, attention sites fused / found, and the verification.
The issue's floor: at most 300 s, and a peak of at most 1.5x the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CACHE = Path.home() / ".cache" / "attnfuse"
VENV = Path(os.environ.get("ATTNFUSE_VENVS", CACHE / "venvs")) / "optimum"  # as benchmarks/peers/optimum_venv.sh
WORK = CACHE / "scale_llama"
RESULT = Path(__file__).resolve().parent / "results" / "scale_llama.json"
VENV_COMMAND = "bash benchmarks/peers/optimum_venv.sh"
FLOOR_SECONDS, FLOOR_MEMORY_RATIO = 300, 1.5

# TinyLlama-1.1B's shape.
CONFIG = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
              intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

# Runs in Optimum's venv: the export reads the folder with that venv's transformers.
_MAKE_MODEL = """
import sys, torch, transformers
torch.manual_seed(0)
config = transformers.LlamaConfig(**{config!r})
model = transformers.LlamaForCausalLM(config).eval()
model.save_pretrained(sys.argv[1])
"""

# Runs `attnfuse optimize` and reports its own peak: VmHWM, read before the process exits (see
# attnfuse/tools/memory.py for why not ru_maxrss).
_OPTIMIZE = """
import sys
from attnfuse.tools.cli import main
try:
    code = main(sys.argv[2:])
finally:
    peak = [line for line in open('/proc/self/status') if line.startswith('VmHWM:')][0].split()[1]
    open(sys.argv[1], 'w').write(peak)
sys.exit(code)
"""


class BenchmarkError(Exception):
    """A step that cannot run; its message is the one line printed."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=WORK, help="cache folder for the model and its export")
    parser.add_argument("--json", type=Path, default=RESULT, help="where to write the result")
    args = parser.parse_args(argv)
    try:
        onnx_file = exported_model(args.work)
        result = measure(onnx_file)
    except BenchmarkError as e:
        print(f"scale_llama: error: {e}", file=sys.stderr)
        return 1
    write_json(args.json, result)
    print(readme_line(result))
    return 0 if result["exit_code"] == 0 else 1


# --- the model and its export ---------------------------------------------


def venv_python() -> Path:
    python = VENV / "bin" / "python"
    if not (python.exists() and (VENV / "bin" / "optimum-cli").exists()):
        raise BenchmarkError(f"Optimum's venv is missing; make it with: {VENV_COMMAND}")
    if subprocess.run([str(python), "-c", "import onnxruntime"], capture_output=True).returncode != 0:
        raise BenchmarkError(f"Optimum's venv has no onnxruntime; make it with: {VENV_COMMAND}")
    return python


def exported_model(work: Path) -> Path:
    """work/onnx/model.onnx, made (model, then export) unless a finished export is there already."""
    onnx_file = work / "onnx" / "model.onnx"
    finished = work / "onnx" / ".exported"  # written last: an export cut short is redone
    if finished.exists() and onnx_file.exists():
        return onnx_file
    python = venv_python()
    folder = work / "model"
    if not (folder / "config.json").exists():
        print(f"making the model in {folder} ...", flush=True)
        run_step([str(python), "-c", _MAKE_MODEL.format(config=CONFIG), str(folder)], "making the model")
    # onnx appends to an existing data file: an export cut short is removed, not written over.
    shutil.rmtree(onnx_file.parent, ignore_errors=True)
    print(f"exporting it with Optimum into {onnx_file.parent} (minutes) ...", flush=True)
    started = time.perf_counter()
    run_step([str(python.with_name("optimum-cli")), "export", "onnx", "--model", str(folder), "--task",
              "text-generation-with-past", str(onnx_file.parent)], "optimum-cli export")
    print(f"exported in {time.perf_counter() - started:.0f} s", flush=True)
    if not onnx_file.exists():
        raise BenchmarkError(f"optimum-cli wrote no {onnx_file}")
    finished.write_text("")
    return onnx_file


def run_step(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchmarkError(f"{what} failed (exit {done.returncode}): {last}")


# --- optimizing -------------------------------------------------------------


def measure(onnx_file: Path) -> dict:
    """`attnfuse optimize` on the export, in a fresh process, with its time, peak and report."""
    weights = weights_bytes(onnx_file)
    with tempfile.TemporaryDirectory(dir=onnx_file.parent.parent, prefix="optimized-") as out:
        out = Path(out)
        command = ["attnfuse", "optimize", str(onnx_file), "-o", str(out / "out.onnx"), "--report",
                   str(out / "r.json")]
        print(f"running: {' '.join(command)}", flush=True)
        load = LoadSampler()
        started = time.perf_counter()
        with load:
            done = subprocess.run([sys.executable, "-c", _OPTIMIZE, str(out / "peak"), *command[1:]],
                                  capture_output=True, text=True)
        seconds = time.perf_counter() - started
        report = json.loads((out / "r.json").read_text()) if (out / "r.json").exists() else {}
        peak_kb = int((out / "peak").read_text()) if (out / "peak").exists() else None
        written = sum(f.stat().st_size for f in out.glob("out.onnx*"))
    peak = peak_kb * 1024 if peak_kb is not None else None
    attention, verify = report.get("attention", {}), report.get("verify") or {}
    return {
        "model": "Llama, TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32/4 heads, MLP 5632, vocab 32000), "
                 "random weights, optimum-cli export onnx --task text-generation-with-past",
        "command": " ".join(["attnfuse", "optimize", "model.onnx", "-o", "out.onnx", "--report", "r.json"]),
        "exit_code": done.returncode,
        "error": (done.stderr.strip().splitlines() or [""])[-1] if done.returncode else None,
        "seconds": round(seconds, 1),
        "peak_memory_bytes": peak,
        "weights_bytes": weights,
        "peak_over_weights": round(peak / weights, 3) if peak else None,
        "written_bytes": written,
        "attention_fused": attention.get("fused"),
        "attention_total": attention.get("total"),
        "fused_ops": report.get("fused_ops"),
        "verify_ok": verify.get("ok"),
        "verify_max_rel_error": verify.get("max_rel_error"),
        "verify_tolerance": verify.get("tolerance"),
        "optimize_seconds": report.get("seconds"),  # the run's own clock: load to verify, no save
        "load_average": load.summary(),
        "meets_floor": bool(done.returncode == 0 and seconds <= FLOOR_SECONDS and peak
                            and peak <= FLOOR_MEMORY_RATIO * weights),
        "floor": f"at most {FLOOR_SECONDS} s and a peak of at most {FLOOR_MEMORY_RATIO}x the weights",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    **versions()},
    }


def weights_bytes(onnx_file: Path) -> int:
    """The model file and every external data file beside it (Optimum writes one, model.onnx_data)."""
    return sum(f.stat().st_size for f in onnx_file.parent.iterdir()
               if f.name == onnx_file.name or f.name.startswith(onnx_file.name + "_") or f.suffix == ".data")


class LoadSampler:
    """The 1-minute load average at the start, at the end, and its mean over the run (every 5 s):
    this machine is shared, and the wall time means little without it."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()

    def __enter__(self) -> LoadSampler:
        self.samples.append(os.getloadavg()[0])
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        return {"start": self.samples[0], "end": self.samples[-1],
                "mean": round(sum(self.samples) / len(self.samples), 2), "max": max(self.samples)}


def versions() -> dict:
    import onnx_ir
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "onnx_ir": onnx_ir.__version__}


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)  # whole or not at all


def readme_line(result: dict) -> str:
    if result["exit_code"] != 0:
        return f"`python benchmarks/scale_llama.py`: attnfuse optimize exited {result['exit_code']}: {result['error']}"
    gb = 1e9
    load = result["load_average"]
    return (f"`python benchmarks/scale_llama.py` (`{result['command']}` on Optimum's export of a TinyLlama-shape "
            f"1.1B Llama, {result['weights_bytes'] / gb:.2f} GB of weights): {result['seconds']:.0f} s at "
            f"{result['peak_memory_bytes'] / gb:.2f} GB peak ({result['peak_over_weights']:.2f}x the weights), "
            f"attention {result['attention_fused']}/{result['attention_total']} fused, verification "
            f"{'ok' if result['verify_ok'] else 'failed'} (max relative error {result['verify_max_rel_error']:.2g}); "
            f"{result['machine']['cpus']} cores, 1-minute load average {load['mean']:.1f} "
            f"(from {load['start']:.1f} to {load['end']:.1f})")


if __name__ == "__main__":
    sys.exit(main())
