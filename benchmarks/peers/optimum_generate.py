"""Optimum's export of the benchmark Llama, optimized by attnfuse, generates the same tokens through Optimum.

What a user of Hugging Face Optimum does, on the decoder benchmark's model (the transformers folder every
peer of `attnfuse bench --model llama` is built from; --quick: the decoder zoo's tiny Llama):

  1. `optimum-cli export onnx --model FOLDER --task text-generation-with-past` (in Optimum's venv:
     optimum-onnx 0.1.0 caps transformers below 4.58; make it with benchmarks/peers/optimum_venv.sh);
  2. `attnfuse optimize model.onnx -o model.onnx` (here, in attnfuse's env), into a copy of the export's
     folder (config, generation config, tokenizer);
  3. `ORTModelForCausalLM.from_pretrained(folder).generate(...)` on the original and on the optimized
     folder (in Optimum's venv), greedy, from the benchmark's 16 left-padded prompts, N tokens each;
     both are compared with transformers' own `generate` on the same model (here).

    python benchmarks/peers/optimum_generate.py [--quick] [--new-tokens N] [--venv PYTHON] [--work DIR]

Prints each step's exit code and time, the optimize report's attention sites, and whether each file's
tokens equal torch's; exits 1 if a file could not be made or generated with, 2 if tokens differ. The
file runs in both environments: the venv side (`generate`) imports neither attnfuse nor torch at the top.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_VENV = Path(os.environ.get("ATTNFUSE_VENVS", Path.home() / ".cache" / "attnfuse" / "venvs")) / "optimum"
MAKE_VENV = "bash benchmarks/peers/optimum_venv.sh"
THREADS = 2


# ---- the venv side ---------------------------------------------------------------------------------

def generate(folder: Path, prompts: Path, out: Path, new_tokens: int) -> None:
    """In Optimum's venv: greedy tokens [batch, new_tokens] of ORTModelForCausalLM on the saved prompts, to `out`
    (.npy), and the generate's seconds on stdout. It does not stop at the end-of-sequence id, as torch's reference."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    model = ORTModelForCausalLM.from_pretrained(folder, session_options=options, provider="CPUExecutionProvider")
    model.generation_config.eos_token_id = None
    data = np.load(prompts)
    start = time.perf_counter()
    tokens = model.generate(input_ids=torch.from_numpy(data["input_ids"]),
                            attention_mask=torch.from_numpy(data["attention_mask"]), max_new_tokens=new_tokens,
                            do_sample=False, pad_token_id=int(model.config.pad_token_id or 0))
    seconds = time.perf_counter() - start
    np.save(out, tokens[:, data["input_ids"].shape[1]:].numpy())
    print(f"{seconds:.3f}")


# ---- attnfuse's side -------------------------------------------------------------------------------

def run(command: list[str], what: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    last = (done.stderr.strip().splitlines() or [""])[-1]
    print(f"{what}: exit {done.returncode}, {seconds:.1f} s{'' if done.returncode == 0 else ': ' + last}", flush=True)
    return done, seconds


def export(venv: Path, folder: Path, out: Path) -> bool:
    """optimum-cli's export into `out`, once (a folder that holds model.onnx is kept)."""
    if (out / "model.onnx").exists():
        print(f"export: {out} (kept from an earlier run)")
        return True
    cli = venv.parent / "optimum-cli"
    done, _ = run([str(cli), "export", "onnx", "--model", str(folder), "--task", "text-generation-with-past", str(out)],
                  "optimum-cli export onnx --task text-generation-with-past")
    return done.returncode == 0


def optimize(exported: Path, out: Path) -> dict | None:
    """`attnfuse optimize` on the export's model.onnx into a copy of its folder; the report, or None."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(exported, out, ignore=shutil.ignore_patterns("model.onnx", "model.onnx_data", "model.onnx.data"))
    report = out / "attnfuse-report.json"
    done, seconds = run([sys.executable, "-m", "attnfuse.tools.cli", "optimize", str(exported / "model.onnx"),
                         "-o", str(out / "model.onnx"), "--report", str(report)], "attnfuse optimize")
    if done.returncode != 0:
        return None
    summary = json.loads(report.read_text())
    attention = summary.get("attention", {})
    print(f"  attention sites fused {attention.get('fused')}/{attention.get('total')}, {seconds:.0f} s")
    return summary


def generate_in_venv(venv: Path, folder: Path, prompts: Path, new_tokens: int, what: str) -> np.ndarray | None:
    out = folder / "generated.npy"
    done, _ = run([str(venv), __file__, "generate", str(folder), str(prompts), str(out), "--new-tokens", str(new_tokens)],
                  f"ORTModelForCausalLM.generate ({what})")
    if done.returncode != 0:
        return None
    print(f"  generate: {float(done.stdout.strip().splitlines()[-1]):.2f} s")
    return np.load(out)


def reference(quick: bool, new_tokens: int):
    """The transformers folder, the prompts (the decoder benchmark's prefill batch) and torch's tokens."""
    from attnfuse.models.decoders.bench import bench_family, bench_inputs, prefill_step, transformers_folder
    from attnfuse.models.decoders.cases import find
    from attnfuse.models.decoders.families import FAMILIES, build
    from attnfuse.models.decoders.generate import greedy_torch_causal
    from attnfuse.tools.bench_decoder import decoder_bench

    if quick:
        case = find("llama-dynamo-sdpa-past")
        spec, model = FAMILIES[case.family], decoder_bench(quick=True)
        prompt = model.inputs(model.steps["prefill"])
    else:
        spec, prompt = bench_family(), bench_inputs(prefill_step())
    prompt = {name: prompt[name].numpy() for name in ("input_ids", "attention_mask")}
    tokens = greedy_torch_causal(build(spec, "sdpa"), prompt, new_tokens)
    return transformers_folder(spec), prompt, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", nargs="?", choices=("all", "generate"), default="all",
                        help="generate: the venv side, run by `all` (the default)")
    parser.add_argument("paths", nargs="*", type=Path, help="generate: FOLDER PROMPTS.npz OUT.npy")
    parser.add_argument("--quick", action="store_true", help="the decoder zoo's tiny Llama")
    parser.add_argument("--new-tokens", type=int, default=32, metavar="N")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV / "bin" / "python", metavar="PYTHON",
                        help=f"Optimum's venv's python (default {DEFAULT_VENV}/bin/python; make it: {MAKE_VENV})")
    parser.add_argument("--work", type=Path, default=None, metavar="DIR",
                        help="where the exported and optimized folders go (default ~/.cache/attnfuse/optimum-generate)")
    args = parser.parse_args(argv)
    if args.step == "generate":
        if len(args.paths) != 3:
            parser.error("generate takes FOLDER PROMPTS.npz OUT.npy")
        generate(*args.paths, args.new_tokens)
        return 0
    if args.paths:
        parser.error("paths are the generate step's")
    if not args.venv.exists():
        parser.error(f"Optimum's venv not found at {args.venv}: make it with {MAKE_VENV}")

    from attnfuse.tools.decoder_peers.generation import token_mismatch

    folder, prompt, expected = reference(args.quick, args.new_tokens)
    work = (args.work or Path.home() / ".cache" / "attnfuse" / "optimum-generate") / folder.name
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.npz"
    np.savez(prompts, **prompt)
    print(f"model: {folder}; prompts {list(prompt['input_ids'].shape)}, {args.new_tokens} tokens; work: {work}")
    if not export(args.venv, folder, work / "exported"):
        return 1
    files = {"Optimum's export": work / "exported"}
    if optimize(work / "exported", work / "optimized") is not None:
        files["attnfuse optimized"] = work / "optimized"
    verdicts = {}
    for what, path in files.items():
        tokens = generate_in_venv(args.venv, path, prompts, args.new_tokens, what)
        verdicts[what] = "generate failed" if tokens is None else token_mismatch(tokens, expected)
        print(f"  tokens equal to torch's generate: {'yes' if verdicts[what] is None else 'no: ' + verdicts[what]}")
    if len(files) < 2 or "generate failed" in verdicts.values():
        return 1
    return 0 if all(v is None for v in verdicts.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
