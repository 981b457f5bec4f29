"""The `attnfuse` command line: exit codes, one-line errors, nothing half-written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_io import run_ort, save_with_external_data, toy_attention_model
from test_verify import _fake_passes

from attnfuse.optimizer import api
from attnfuse.optimizer.inputs import make_inputs
from attnfuse.optimizer.io import load_model
from attnfuse.optimizer.verify import compare
from attnfuse.tools.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy(tmp_path) -> Path:
    path = tmp_path / "toy.onnx"
    onnx.save(toy_attention_model(), path)
    return path


def one_error_line(err: str) -> str:
    """The single line a failed command prints; fails on anything more, or a traceback."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("attnfuse: error: ")
    return lines[0]


# --- bad input: exit 1, one line, nothing written ---------------------------------


def _missing(tmp_path, toy):
    return ["optimize", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "out.onnx")], "nope.onnx: no such file"


def _directory(tmp_path, toy):
    (tmp_path / "dir.onnx").mkdir()
    return ["optimize", str(tmp_path / "dir.onnx"), "-o", str(tmp_path / "out.onnx")], "dir.onnx: is a directory"


def _truncated(tmp_path, toy):
    (tmp_path / "cut.onnx").write_bytes(toy.read_bytes()[:-20])
    return ["optimize", str(tmp_path / "cut.onnx"), "-o", str(tmp_path / "out.onnx")], "cut.onnx: not an ONNX model or truncated"


def _text(tmp_path, toy):
    (tmp_path / "notes.onnx").write_text("not a model at all\n")
    return ["optimize", str(tmp_path / "notes.onnx"), "-o", str(tmp_path / "out.onnx")], "notes.onnx: not an ONNX model"


def _random(tmp_path, toy):
    (tmp_path / "noise.onnx").write_bytes(np.random.default_rng(0).bytes(10_000))
    return ["optimize", str(tmp_path / "noise.onnx"), "-o", str(tmp_path / "out.onnx")], "noise.onnx: not an ONNX model"


def _missing_external_data(tmp_path, toy):
    save_with_external_data(toy_attention_model(), tmp_path / "ext.onnx").unlink()
    return ["optimize", str(tmp_path / "ext.onnx"), "-o", str(tmp_path / "out.onnx")], "external data file ext.onnx.data not found"


def _no_output_directory(tmp_path, toy):
    return ["optimize", str(toy), "-o", str(tmp_path / "no" / "out.onnx")], "does not exist"


def _output_is_directory(tmp_path, toy):
    (tmp_path / "out.onnx").mkdir()
    return ["optimize", str(toy), "-o", str(tmp_path / "out.onnx")], "out.onnx: is a directory"


def _read_only_output_directory(tmp_path, toy):
    if os.geteuid() == 0:
        pytest.skip("root can write into read-only directories")
    (tmp_path / "ro").mkdir(mode=0o555)
    return ["optimize", str(toy), "-o", str(tmp_path / "ro" / "out.onnx")], "cannot write: Permission denied"


def _unwritable_report(tmp_path, toy):
    return ["optimize", str(toy), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "no" / "r.json")], "does not exist"


def _bad_target(tmp_path, toy):
    return ["optimize", str(toy), "-o", str(tmp_path / "out.onnx"), "--target", "tpu"], "argument --target: invalid choice: 'tpu'"


@pytest.mark.parametrize(
    "case",
    [
        _missing,
        _directory,
        _truncated,
        _text,
        _random,
        _missing_external_data,
        _no_output_directory,
        _output_is_directory,
        _read_only_output_directory,
        _unwritable_report,
        _bad_target,
    ],
    ids=lambda case: case.__name__.strip("_"),
)
def test_bad_input_exits_1_with_one_line_and_writes_nothing(tmp_path, toy, capsys, case):
    argv, expected = case(tmp_path, toy)
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 1
    assert expected in one_error_line(capsys.readouterr().err)
    assert sorted(tmp_path.rglob("*")) == before  # no output, no temporary file


def test_missing_subcommand_module_exits_1(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "attnfuse.tools.demo", None)  # import fails even once it exists
    assert main(["demo", "--fast"]) == 1
    assert "demo is not available" in one_error_line(capsys.readouterr().err)


# --- success ---------------------------------------------------------------------


def test_optimize_writes_the_model_and_the_report(tmp_path, toy, capsys):
    assert main(["optimize", str(toy), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "attention fused:" in out and "verify: ok" in out
    assert "padding-free: yes; a batch without padding runs the fused graph" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"total", "fused", "sites"} <= set(report["attention"]) and report["attention"]["total"] >= 0
    assert isinstance(report["fused_ops"], dict)
    verify = report["verify"]
    assert verify["ok"] is True and verify["max_abs_error"] <= verify["tolerance"] * 1e3
    assert [feed["name"] for feed in verify["inputs"][0]["inputs"]] == ["input_ids", "attention_mask"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "r.json", "toy.onnx"]


def test_external_data_model_optimizes_and_matches_the_original(tmp_path, capsys):
    save_with_external_data(toy_attention_model(), tmp_path / "ext.onnx")
    (tmp_path / "out").mkdir()
    assert main(["optimize", str(tmp_path / "ext.onnx"), "-o", str(tmp_path / "out" / "m.onnx")]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["m.onnx", "m.onnx.data"]
    inputs = make_inputs(load_model(tmp_path / "ext.onnx"), batch=3, seqlen=7, seed=5)
    expected = run_ort(tmp_path / "ext.onnx", inputs.feeds)[0]
    got = run_ort(tmp_path / "out" / "m.onnx", inputs.feeds)[0]
    _, max_rel = compare({"y": expected}, {"y": got}, inputs.real)
    assert max_rel <= 1e-4


def test_inspect_prints_the_sites(toy, capsys):
    assert main(["inspect", str(toy)]) == 0
    assert "heads" in capsys.readouterr().out
    assert main(["inspect", str(toy), "--json"]) == 0
    assert "total" in json.loads(capsys.readouterr().out)["attention"]


# --- verification failure: exit 2, no model written unless --force, the report always ----


def test_verification_failure_exits_2_and_writes_only_the_report(tmp_path, toy, capsys, monkeypatch):
    monkeypatch.setattr(api, "run_passes", _fake_passes("bad", wrong_when_excluded=True))
    argv = ["optimize", str(toy), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json")]
    assert main(argv) == 2
    assert "verification failed: max relative error" in one_error_line(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["r.json", "toy.onnx"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "verification_failed" and "max relative error" in report["error"]
    assert report["verify"]["ok"] is False and report["verify"]["max_rel_error"] > report["verify"]["tolerance"]


def test_forced_verification_failure_writes_and_warns(tmp_path, toy, capsys, monkeypatch):
    monkeypatch.setattr(api, "run_passes", _fake_passes("bad", wrong_when_excluded=True))
    assert main(["optimize", str(toy), "-o", str(tmp_path / "out.onnx"), "--force"]) == 0
    captured = capsys.readouterr()
    assert "verify: FAILED" in captured.out
    assert captured.err.startswith("attnfuse: warning: verification failed") and captured.err.count("\n") == 1
    assert (tmp_path / "out.onnx").exists()


# --- internal errors: exit 3, or the traceback with ATTNFUSE_DEBUG --------------------


def test_internal_error_exits_3_with_a_hint(tmp_path, toy, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug\nwith two lines")

    monkeypatch.setattr(api, "run_passes", broken)
    monkeypatch.delenv("ATTNFUSE_DEBUG", raising=False)
    assert main(["optimize", str(toy), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json")]) == 3
    line = one_error_line(capsys.readouterr().err)
    assert "internal error: KeyError" in line and "ATTNFUSE_DEBUG=1" in line
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "internal_error" and report["error"].startswith("KeyError")
    assert not (tmp_path / "out.onnx").exists()
    monkeypatch.setenv("ATTNFUSE_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["optimize", str(toy), "-o", str(tmp_path / "out.onnx")])


def test_a_rule_that_fails_on_one_site_leaves_it_and_fuses_the_rest(tmp_path, monkeypatch):
    """A defect a rule hits on a spelling it did not foresee costs that site, not the run: the site is
    reported with the error, everything else is fused and verified, the file is written."""
    from attnfuse.models import zoo
    from attnfuse.passes.rules import gelu

    toy = zoo.exported(zoo.ZooCase("bert", "dynamo", "sdpa"))

    def broken(self, anchor, graph, view):
        raise AttributeError("'NoneType' object has no attribute 'outputs'")

    monkeypatch.setattr(gelu.Gelu, "match", broken)
    monkeypatch.delenv("ATTNFUSE_DEBUG", raising=False)
    assert main(["optimize", str(toy), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["attention"]["fused"] == report["attention"]["total"] > 0 and report["verify"]["ok"]
    reasons = [f["reason"] for f in report["fusions"] if f.get("reason") and "AttributeError" in f["reason"]]
    assert reasons and all("left as it is" in reason for reason in reasons)
    assert "BiasGelu" not in report["fused_ops"] and report["fused_ops"]["MultiHeadAttention"] == 2
    monkeypatch.setenv("ATTNFUSE_DEBUG", "1")
    with pytest.raises(AttributeError):
        main(["optimize", str(toy), "-o", str(tmp_path / "out2.onnx")])


# --- the real process -------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "attnfuse.tools.cli", *args], capture_output=True, text=True, env=env)


def test_process_exit_codes(tmp_path, toy):
    failed = _cli("optimize", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "out.onnx"))
    assert failed.returncode == 1
    assert "nope.onnx: no such file" in one_error_line(failed.stderr)
    done = _cli("optimize", str(toy), "-o", str(tmp_path / "out.onnx"))
    assert done.returncode == 0, done.stderr
    assert onnx.load(tmp_path / "out.onnx").graph.output[0].name == "last_hidden_state"


def test_a_user_error_still_writes_the_report(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main(["optimize", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "out.onnx"), "--report", str(report)]) == 1
    written = json.loads(report.read_text())
    assert written["status"] == "user_error" and "no such file" in written["error"]
    assert written["error"] in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


@pytest.mark.parametrize("spec", ["pixel_values", "=1,2", "x=1,a", "x=-1,3"])
def test_bad_input_shapes_are_user_errors(tmp_path, toy, capsys, spec):
    assert main(["optimize", str(toy), "-o", str(tmp_path / "out.onnx"), "--input-shape", spec]) == 1
    assert "--input-shape" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out.onnx").exists()


def test_input_shape_must_name_an_input(tmp_path, toy, capsys):
    assert main(["optimize", str(toy), "-o", str(tmp_path / "out.onnx"), "--input-shape", "pixels=1,3,8,8"]) == 1
    assert "does not take as inputs" in one_error_line(capsys.readouterr().err)
