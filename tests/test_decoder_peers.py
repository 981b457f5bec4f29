"""The decoder benchmark's runtime peers (onnxruntime-genai, CTranslate2): their bookkeeping, without the
peers installed, nothing timed, nothing fetched. Prompt layouts, the checks that replace bench's for a
peer, the greedy loop over a runner, token verdicts, CTranslate2's step pacing, a missing peer."""
from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from attnfuse.tools import bench
from attnfuse.tools.decoder_peers import ct2, generation, peers
from attnfuse.tools.decoder_peers.prompts import Prompts, packed

LEFT = {"input_ids": np.array([[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 0, 11]]),
        "attention_mask": np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub


# ---- prompt layouts ------------------------------------------------------------------------------

def test_prompts_in_every_layout():
    prompts = Prompts.from_feeds(LEFT, pad=0)
    assert prompts.lengths == [2, 4, 1] and prompts.width == 4
    assert prompts.lists() == [[5, 6], [7, 8, 9, 10], [11]]
    assert prompts.right_padded().tolist() == [[5, 6, 0, 0], [7, 8, 9, 10], [11, 0, 0, 0]]
    back = prompts.left_padded()
    assert all((back[name] == LEFT[name]).all() for name in LEFT)
    assert ct2.layout(prompts.right_padded(), prompts.lengths) == prompts.lists()


def test_a_batch_with_a_past_is_not_a_prompt():
    with pytest.raises(ValueError, match="without a past"):
        Prompts.from_feeds({"input_ids": np.ones((2, 1), int), "attention_mask": np.ones((2, 5), int)}, pad=0)


def test_decode_prompts_are_the_decode_steps_ids():
    """A decode step's rows, as prompts: the ids its past and new token were drawn from (same seed)."""
    from attnfuse.models.decoders import Step, cases

    case = cases.find("llama-dynamo-sdpa-past")
    step = Step(new=1, past=6, lengths=(6, 3, 5))  # no row fills the past: the mask is wider than the rows
    feeds = cases.example(case, step)
    prompts = Prompts.of_lengths(step.lengths, vocab=cases.config(case).vocab_size, pad=0, width=step.past + step.new)
    assert prompts.lengths == [6, 3, 5]
    assert [row[-1] for row in prompts.rows] == feeds["input_ids"][:, 0].tolist()


def test_packed_reads_each_rows_real_positions():
    lengths = [2, 4, 1]
    left = np.arange(3 * 4).reshape(3, 4, 1)
    right = np.stack([np.roll(row, n - 4, axis=0) for row, n in zip(left, lengths)])  # the same rows, right padded
    assert packed(left, lengths, "left").ravel().tolist() == [2, 3, 4, 5, 6, 7, 11]
    assert (packed(right, lengths, "right") == packed(left, lengths, "left")).all()
    with pytest.raises(ValueError, match="side"):
        packed(left, lengths, "middle")


# ---- checking and timing beside bench's contenders ------------------------------------------------

def test_peers_check_their_logits_against_torchs_at_real_tokens():
    """A peer's right-padded logits equal to torch's at the real tokens is right whatever its padding holds;
    one that differs at a real token is wrong; one without logits waits for its tokens (NaN); all are timed."""
    lengths = [2, 4, 1]
    logits = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    mask = LEFT["attention_mask"]
    right = np.stack([np.roll(row, n - 4, axis=0) for row, n in zip(logits, lengths)])
    right_garbage_padding = right.copy()
    right_garbage_padding[0, 2:] = 99.0
    wrong = right.copy()
    wrong[1, 0] += 1.0
    torch_contender = bench.Contender(bench.TORCH, run=lambda feeds: [logits])
    runs = {"same": peers.PeerRun(lambda: right_garbage_padding, logits=lambda out: out),
            "wrong": peers.PeerRun(lambda: wrong, logits=lambda out: out),
            "tokens": peers.PeerRun(lambda: None)}
    checked = peers.check_and_time([torch_contender], runs, LEFT,
                                   lambda outs: [mask[:, :, None].astype(bool)], repeats=1, desc="test")
    assert checked.errors["same"] == 0.0
    assert checked.errors["wrong"] == pytest.approx(1.0 / np.abs(logits[mask.astype(bool)]).max())
    assert np.isnan(checked.errors["tokens"])
    assert set(checked.seconds) == {bench.TORCH, "same", "wrong", "tokens"}


def test_missing_peer_is_a_contender_with_the_install_script(monkeypatch):
    from attnfuse.tools import bench_decoder

    absent = peers.RuntimePeer("nowhere", "attnfuse_no_such_runtime", ct2, "none")
    monkeypatch.setattr(peers, "runtime_peers", lambda: (absent,))
    steps = []
    entries, opened = bench_decoder.open_peers(SimpleNamespace(name="m", folder=lambda: 1 / 0), 2, steps.append)
    assert opened == {} and steps == ["m: nowhere"]
    assert entries[0].error == "not installed (benchmarks/peers/install_decoder_peers.sh)" and entries[0].peer
    assert os.path.exists(os.path.join(os.path.dirname(__file__), "..", peers.INSTALL_SCRIPT))


def test_a_peer_that_fails_to_build_is_a_result(monkeypatch, tmp_path):
    from attnfuse.tools import bench_decoder

    broken = SimpleNamespace(__name__="broken", build=lambda folder, out: (_ for _ in ()).throw(RuntimeError("no")))
    monkeypatch.setattr(peers, "runtime_peers", lambda: (peers.RuntimePeer("broken", "json", broken, "broken"),))
    monkeypatch.setattr(peers, "cached_folder", lambda name, build: build(tmp_path))
    entries, opened = bench_decoder.open_peers(SimpleNamespace(name="m", folder=lambda: tmp_path), 2, lambda _: None)
    assert opened == {} and entries[0].error == "RuntimeError: no"


def test_peak_memory_runs_the_runtime_module_without_attnfuse(tmp_path):
    """The fresh process loads the runtime module by path: it must not need attnfuse (whose imports would
    weigh in), and runs the workload once."""
    runtime = tmp_path / "fake_runtime.py"
    runtime.write_text(
        "import sys\n"
        "def layout(ids, lengths):\n    return ids\n"
        "class Model:\n"
        "    def __init__(self, model_dir, threads):\n        assert 'attnfuse' not in sys.modules\n"
        "    def prefill(self, ids):\n"
        "        self.block = bytearray(100 * 2**20)\n"
        "        self.block[::4096] = b'x' * len(self.block[::4096])\n")
    module = SimpleNamespace(__file__=str(runtime))
    opened = peers.OpenPeer(peers.RuntimePeer("fake", "json", module, "fake"), tmp_path, model=None)
    assert peers.peak_memory(opened, Prompts.from_feeds(LEFT, 0), "prefill", threads=1) > 100


@pytest.mark.parametrize("second_op, same", [("Relu", True), ("Sigmoid", False)])
def test_an_optimizer_type_that_writes_the_same_graph_is_not_run_twice(monkeypatch, second_op, same):
    import onnx
    from onnx import helper

    from attnfuse.tools import bench_decoder

    def model(op):
        x, y = (helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in "xy")
        return helper.make_model(helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g", [x], [y]))

    graphs = {"gpt2": model("Relu"), "qwen3": model(second_op)}
    monkeypatch.setattr(bench, "peer_model", lambda path, peer, model_type, **geometry: graphs[model_type])
    builders = bench_decoder.ort_optimizer_builders("x.onnx", SimpleNamespace(num_attention_heads=2, hidden_size=4))
    assert list(builders) == ["ORT optimizer (gpt2)", "ORT optimizer (qwen3)"]
    assert builders["ORT optimizer (gpt2)"]() is graphs["gpt2"]
    if same:
        with pytest.raises(bench_decoder.SameGraph, match=r"the graph of ORT optimizer \(gpt2\), not run twice"):
            builders["ORT optimizer (qwen3)"]()
    else:
        assert builders["ORT optimizer (qwen3)"]() is graphs["qwen3"]


# ---- generation ------------------------------------------------------------------------------------

def test_greedy_loop_over_a_runner_is_transformers_generate():
    """The deployment loop over bench's runner of the torch wrapper gives the tokens of transformers' own
    generate (the reference every contender is held to)."""
    from attnfuse.models.decoders import cases
    from attnfuse.models.decoders.generate import causal_prompt, greedy_torch_causal

    module = cases.build_torch(cases.find("llama-dynamo-sdpa-past"))
    prompt = causal_prompt((5, 2, 7), seed=3)
    tokens = generation.greedy_over_runner(bench.torch_runner(module, positional=True), module.signature.input_names,
                                           module.model.config, prompt, new_tokens=6)
    assert tokens.shape == (3, 6)
    assert (tokens == greedy_torch_causal(module.model, prompt, 6)).all()


def test_token_verdicts():
    expected = np.array([[1, 2, 3], [4, 5, 6]])
    assert generation.token_mismatch(expected.copy(), expected) is None
    assert generation.token_mismatch(np.array([[1, 2, 3], [4, 9, 9]]), expected) == "1 of 2 rows differ, from token 2"
    assert generation.token_mismatch(expected[:, :2], expected) == "shape [2, 2] instead of [2, 3]"


def test_a_row_that_ends_at_the_end_id_is_compared_up_to_it():
    """genai ends a row at the end-of-sequence id (pad after it); torch's reference goes on."""
    expected = np.array([[5, 2, 7, 2], [4, 5, 6, 7]])
    ended = np.array([[5, 2, 0, 0], [4, 5, 6, 7]])
    assert generation.token_mismatch(ended, expected, ends_at=2) is None
    assert generation.token_mismatch(ended, expected) == "1 of 2 rows differ, from token 3"
    assert generation.token_mismatch(np.array([[5, 3, 0, 0], [4, 5, 6, 7]]), expected, ends_at=2) is not None


def test_generation_check_marks_wrong_and_failed_contenders():
    reference = np.array([[1, 2], [3, 4]])

    def fails():
        raise RuntimeError("boom")

    ended = np.array([[1, 2], [3, 0]])  # row 1 ended at id 3 (the pad id after it)
    generators = {bench.TORCH: lambda: reference, "same": lambda: reference.copy(), "other": lambda: reference + 1,
                  "fails": fails, "ended": lambda: ended}
    checked, mismatches = generation.check(generators, ends_at={"ended": 3})
    assert checked.errors == {bench.TORCH: 0.0, "same": 0.0, "other": np.inf, "ended": 0.0}
    assert mismatches == {bench.TORCH: None, "same": None, "other": "2 of 2 rows differ, from token 1", "ended": None}
    assert checked.failures == {"fails": "generate failed: RuntimeError: boom"}
    generation.time_generations(checked, generators, repeats=1, desc="test")
    assert set(checked.seconds) == {bench.TORCH, "same", "other", "ended"}


def test_generation_flops_are_a_prefill_and_single_token_steps():
    from attnfuse.models.decoders import Step

    calls = []
    flops = generation.generation_flops(lambda step: calls.append(step) or 1, Step(new=4, lengths=(4, 2)), new_tokens=3)
    assert flops == 3
    assert calls == [Step(new=4, lengths=(4, 2)), Step(new=1, past=4, lengths=(5, 3)), Step(new=1, past=5, lengths=(6, 4))]


# ---- CTranslate2's step pacing, on a stand-in for its asynchronous generate_batch ----------------------

class FakeAsyncGenerator:
    """Calls the step callback for each row at each step from a thread of its own, as CTranslate2's
    asynchronous generate_batch does, counting the steps it has computed."""

    def __init__(self):
        self.computed, self.stopped = 0, threading.Event()

    def generate_batch(self, tokens, asynchronous, callback, max_length, **options):
        assert asynchronous
        done = threading.Event()

        def loop():
            for step in range(max_length):
                self.computed = step + 1
                if any([callback(SimpleNamespace(step=step, batch_id=row)) for row in range(len(tokens))]):
                    self.stopped.set()
                    break
            done.set()
        threading.Thread(target=loop, daemon=True).start()
        return [SimpleNamespace(done=done.is_set, result=lambda: done.wait(5))]


def fake_ct2_model(generator):
    model = SimpleNamespace(generator=generator, tokens=lambda rows: rows)
    model.generate_options = lambda rows, n: dict(max_length=max(map(len, rows)) - 1 + n)
    return model


def test_ct2_stepper_runs_one_step_per_call_after_the_forced_ones():
    generator = FakeAsyncGenerator()
    stepper = ct2.Stepper(fake_ct2_model(generator), [[1] * 6, [2] * 3], steps=3)
    assert generator.computed == 6  # steps 0-5: the longest prompt's tokens, forced; step 5 gives its first token
    for expected in (7, 8, 9):
        stepper()
        assert generator.computed == expected
    with pytest.raises(RuntimeError, match="more steps"):
        stepper()
    stepper.close()


def test_ct2_stepper_closed_early_stops_the_generation():
    generator = FakeAsyncGenerator()
    stepper = ct2.Stepper(fake_ct2_model(generator), [[1] * 4], steps=10)
    stepper()
    stepper.close()
    assert generator.stopped.wait(5) and generator.computed == 5


# ---- reporting --------------------------------------------------------------------------------------

def test_summary_table_has_a_row_per_contender():
    from attnfuse.tools import bench_decoder

    def record(workload, contender, ms, correct=True, error=None, mismatch=None):
        return dict(workload=workload, contender=contender, median_ms=ms, correct=correct, build_error=error,
                    attention_fused="4/4" if contender == "attnfuse" else None, token_mismatch=mismatch,
                    vs_fastest_peer=None if ms is None else 2.0)

    missing = "not installed (benchmarks/peers/install_decoder_peers.sh)"
    records = [record("prefill", "attnfuse", 1234.0), record("prefill", "genai", None, error=missing),
               record("decode", "attnfuse", 20.5), record("decode", "genai", None, error=missing),
               record("generate 32", "attnfuse", 5000.0, correct=False, mismatch="1 of 16 rows differ, from token 9"),
               record("generate 32", "genai", None, error=missing)]
    lines = bench_decoder.summary_table(records).splitlines()
    assert lines[0] == ("| contender | attention fused | prefill (ms) | decode (ms per step) | generate 32 (ms) "
                        "| tokens equal |")
    assert lines[2] == ("| attnfuse | 4/4 | 1234 (2.00x) | 20.5 (2.00x) | 5000 (2.00x) wrong "
                        "| no: 1 of 16 rows differ, from token 9 |")
    assert lines[3] == f"| genai | - | {missing} | {missing} | {missing} | - |"


def test_the_runtime_modules_import_without_their_runtimes():
    """genai.py and ct2.py import their runtime only when a model is built or loaded (and never attnfuse),
    so that the bench lists a missing runtime instead of failing to import."""
    for module in ("genai", "ct2"):
        source = open(os.path.join(os.path.dirname(peers.__file__), f"{module}.py")).read()
        top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
        assert all("attnfuse" not in line and "onnxruntime_genai" not in line and "ctranslate2" not in line
                   for line in top_level), top_level
