"""What a rollback costs: optimize_onnx and optimize(model) on tiny models with one rewrite made to fail.

Verification is made to fail whenever the run it checks made one chosen rewrite (by its report
name): the attention site applied last, the fusion in the middle of the run, or padding-free.
Printed: the median wall and CPU seconds of each case (CPU time, all threads, is the steadier of the
two on a shared machine), against the same run with nothing to roll back, and how many times the
passes ran.

    python -m benchmarks.forced_rollback [--repeats N]   (from the repository root)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time

import attnfuse
from attnfuse.models import zoo
from attnfuse.models.decoders import cases
from attnfuse.optimizer import api, torch_api

ONNX_MODELS = {"tiny BERT": lambda: zoo.exported(zoo.ZooCase("bert", "dynamo", "sdpa")),
               "tiny Llama": lambda: cases.exported(cases.find("llama-dynamo-sdpa-past"))}


class Culprit:
    """Wraps a front-end's run_passes and verification check: a check after a run that made the
    rewrite named `name` fails."""

    def __init__(self, module, check: str, name: str | None):
        self.module, self.check, self.name = module, check, name
        self.runs, self.made = 0, False

    def run_passes(self, real):
        def run(*args, **kwargs):
            result = real(*args, **kwargs)
            self.runs += 1
            self.made = any(item.name == self.name and item.fused for item in [*result.sites, *result.fusions])
            return result
        return run

    def checked(self, real):
        def check(*args, **kwargs):
            verdict = real(*args, **kwargs)
            return dataclasses.replace(verdict, ok=False, message="forced failure") if self.made else verdict
        return check

    @contextlib.contextmanager
    def installed(self):
        owner = self.module.Verifier if self.check == "Verifier.check" else self.module
        attribute = self.check.rpartition(".")[2]
        saved = (self.module.run_passes, getattr(owner, attribute))
        self.module.run_passes = self.run_passes(saved[0])
        setattr(owner, attribute, self.checked(saved[1]))
        try:
            yield self
        finally:
            self.module.run_passes = saved[0]
            setattr(owner, attribute, saved[1])


def culprits(report) -> dict[str, str | None]:
    """The rewrites to make fail, by role, from a run with nothing rolled back."""
    fused = [f.name for f in report.fusions if f.fused and f.name != "padding-free"]
    return {"none": None, "last attention": [s.name for s in report.sites if s.fused][-1],
            "middle fusion": fused[len(fused) // 2], "padding-free": "padding-free"}


def timed(optimize, culprit: Culprit, repeats: int) -> tuple[float, float, int, list[str]]:
    wall, cpu = [], []
    for _ in range(repeats):
        culprit.runs = 0
        with culprit.installed():
            start, start_cpu = time.perf_counter(), time.process_time()
            report = optimize().report
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), culprit.runs, report.rolled_back


def cases_of(name: str, optimize, module, check: str, repeats: int) -> None:
    for role, rewrite in culprits(optimize().report).items():
        wall, cpu, runs, rolled_back = timed(optimize, Culprit(module, check, rewrite), repeats)
        print(f"{name:16} {role:15} {wall:6.2f} s wall {cpu:6.2f} s CPU {runs:3} runs of the passes  "
              f"rolled back {rolled_back}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name, path in ONNX_MODELS.items():
        model = str(path())
        cases_of(f"{name} ONNX", lambda: attnfuse.optimize_onnx(model), api, "Verifier.check", args.repeats)
    bert = zoo.build_torch("bert", "sdpa")
    example = zoo.example_inputs("bert", batch=2, seqlen=8, lengths=[8, 8])
    cases_of("tiny BERT torch", lambda: attnfuse.optimize(bert, example_kwargs=example), torch_api, "check",
             args.repeats)


if __name__ == "__main__":
    main()
