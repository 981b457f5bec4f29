"""The runtime peers: which there are, whether each is installed, how each is built, opened and run
on a workload, their peak memory, and their timing in one interleaved run with bench's contenders.

Each runtime module (genai, ct2) offers the same four names: `build(folder, out)` (its builder or
converter on the transformers folder), `layout(ids, lengths)` (its prompts from right-padded ids),
and `Model(model_dir, threads)` with `prefill`, `logits`, `stepper` and `generate`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np

from attnfuse.models.decoders.bench import cached_folder
from attnfuse.tools import bench
from attnfuse.tools.decoder_peers import ct2, genai
from attnfuse.tools.decoder_peers.prompts import Prompts, packed
from attnfuse.tools.memory import feeds_file, peak_memory_mb

INSTALL_SCRIPT = "benchmarks/peers/install_decoder_peers.sh"


@dataclasses.dataclass(frozen=True)
class RuntimePeer:
    name: str  # as the tables name it
    package: str  # the import that says whether it is installed
    runtime: ModuleType  # genai or ct2
    build_tag: str  # its built model's folder is <build_tag>-<transformers folder's name>, in the zoo cache
    rows_end_at_eos: bool = False  # its generation ends a row at the end-of-sequence id (genai)
    build_options: tuple[tuple[str, str], ...] = ()  # passed to its runtime's build (genai's precision)

    def missing(self) -> str | None:
        """Why it cannot run here, or None."""
        from attnfuse.tools.encoder_peers import installed

        return None if installed(self.package) else f"not installed ({INSTALL_SCRIPT})"

    def built(self, folder: Path) -> Path:
        """Its own model, built from the transformers folder on first use."""
        return cached_folder(f"{self.build_tag}-{folder.name}",
                             lambda out: self.runtime.build(folder, out, **dict(self.build_options)))

    def open(self, model_dir: Path, threads: int) -> OpenPeer:
        return OpenPeer(self, model_dir, self.runtime.Model(model_dir, threads))


# genai's builder with -p int4: the int4 decode row's peer (tools/bench_int4.py)
GENAI_INT4 = RuntimePeer("onnxruntime-genai int4", "onnxruntime_genai", genai, "genai-int4", rows_end_at_eos=True,
                         build_options=(("precision", "int4"),))


def runtime_peers() -> tuple[RuntimePeer, ...]:
    return (RuntimePeer("onnxruntime-genai", "onnxruntime_genai", genai, "genai-fp32", rows_end_at_eos=True),
            RuntimePeer("CTranslate2", "ctranslate2", ct2, "ct2-float32"))


@dataclasses.dataclass
class PeerRun:
    """A peer's timed call on one workload, and what its first run is checked by."""
    run: Callable[[], object]
    logits: Callable[[object], np.ndarray] | None = None  # a run's logits, right padded; None: its greedy tokens judge it
    close: Callable[[], None] | None = None  # releases what the run holds (a paused generation)


@dataclasses.dataclass
class OpenPeer:
    """A peer's model, loaded once for every workload."""
    peer: RuntimePeer
    model_dir: Path
    model: object

    @property
    def attention(self) -> str:
        """"fused/total" attention sites of its ONNX file, if it has one (genai's), else "" (CTranslate2)."""
        import onnx

        from attnfuse.models.peers import count_attention

        files = sorted(self.model_dir.glob("*.onnx"))
        if not files:
            return ""
        fused, total = count_attention(onnx.load(files[0], load_external_data=False))
        return f"{fused}/{total}"

    def prompts(self, prompts: Prompts):
        return self.peer.runtime.layout(prompts.right_padded(), prompts.lengths)

    def prefill(self, prompts: Prompts) -> PeerRun:
        own = self.prompts(prompts)
        return PeerRun(lambda: self.model.prefill(own), self.model.logits)

    def decode(self, prompts: Prompts, steps: int) -> PeerRun:
        """One step per call over the prompts' own cache, after their forward and first token (untimed)."""
        step = self.model.stepper(self.prompts(prompts), steps)
        return PeerRun(step, close=getattr(step, "close", None))

    def generate(self, prompts: Prompts, new_tokens: int) -> np.ndarray:
        return self.model.generate(self.prompts(prompts), new_tokens)


def check_and_time(contenders: list[bench.Contender], peers: dict[str, PeerRun], feeds: dict[str, np.ndarray],
                   real: Callable[[list[np.ndarray]], list[np.ndarray]], repeats: int, desc: str) -> bench.Checked:
    """bench.check_and_time over the contenders and the runtime peers together: one interleaved run.

    The peers take their own inputs, so check_and_time cannot compare their outputs (it finds them
    wrong: they return none). Each compares its first run's logits with torch's itself, at the real
    tokens of a batch without a past (torch's are kept when `real` receives them), and that verdict
    replaces check_and_time's; a peer without logits to compare gets NaN (its tokens judge it)."""
    lengths = feeds["attention_mask"].sum(1).tolist()
    expected: dict[str, np.ndarray] = {}
    errors: dict[str, float] = {}

    def keep_torch_logits(outputs: list[np.ndarray]) -> list[np.ndarray]:
        if any(p.logits for p in peers.values()):
            expected["logits"] = packed(outputs[0], lengths, "left")
        return real(outputs)

    def checked_on_first_run(name: str, peer: PeerRun) -> bench.Contender:
        def run(_feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            output = peer.run()
            if name not in errors:
                errors[name] = float("nan") if peer.logits is None else bench.relative_error(
                    packed(peer.logits(output), lengths, "right"), expected["logits"], np.True_)
                if len(errors) == len(peers):
                    expected.clear()  # every peer is checked: torch's logits are not needed while timing
            return []
        return bench.Contender(name, run)

    checked = bench.check_and_time(contenders + [checked_on_first_run(n, p) for n, p in peers.items()], feeds,
                                   keep_torch_logits, repeats, desc)
    checked.errors.update(errors)
    return checked


def peak_memory(peer: OpenPeer, prompts: Prompts, workload: str, threads: int) -> float:
    """Peak resident MB of a fresh process that imports only the peer's runtime module (numpy and the
    runtime, not attnfuse), loads its model and runs the workload once ("decode": the prompts' forward,
    the first token and one step)."""
    once = ("model.prefill(prompts)\n" if workload == "prefill" else
            "step = model.stepper(prompts, 1)\nstep()\ngetattr(step, 'close', lambda: None)()\n")
    with feeds_file({"ids": prompts.right_padded(), "lengths": np.asarray(prompts.lengths)}) as path:
        return peak_memory_mb(
            "import runpy, numpy as np\n"
            f"runtime = runpy.run_path({peer.peer.runtime.__file__!r})\n"
            f"model = runtime['Model']({str(peer.model_dir)!r}, {threads})\n"
            f"data = np.load({str(path)!r})\n"
            "prompts = runtime['layout'](data['ids'], data['lengths'].tolist())\n" + once)
