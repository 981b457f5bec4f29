"""--attention: opt-in approximations run, report their error, and get closer to exact
attention as their size grows; ALiBi is read as slopes; bad modes are user errors."""
from __future__ import annotations

import numpy as np
import pytest

import attnfuse
from attnfuse.kernels.reference import alibi_slopes
from attnfuse.models import zoo
from attnfuse.tools.cli import main

BERT = zoo.ZooCase("bert", "dynamo", "sdpa")
GPT2 = zoo.ZooCase("gpt2", "dynamo", "sdpa")


def site_error(case: zoo.ZooCase, mode: str) -> float:
    """The largest error any site's approximation showed against exact attention."""
    report = attnfuse.optimize_onnx(str(zoo.exported(case)), attention=mode).report
    assert report.attention_fused == report.attention_total == 2
    assert report.verify.ok and report.verify.mean_cosine > 0.5
    return max(site.approximation["max_rel_error"] for site in report.sites)


@pytest.mark.parametrize("case", [BERT, GPT2], ids=lambda c: c.id)
def test_window_error_shrinks_and_vanishes(case):
    errors = [site_error(case, f"window={w}") for w in (1, 4, 11)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-5  # the probe's longest row is 12 tokens: a window of 11 sees them all


def test_global_tokens_help_the_window():
    assert site_error(BERT, "window=2,global=2") < site_error(BERT, "window=2")


def test_linformer_error_shrinks_and_vanishes():
    errors = [site_error(BERT, f"linformer={k}") for k in (2, 6, 12)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-5  # one segment per key: exact


@pytest.mark.parametrize("case", [BERT, GPT2], ids=lambda c: c.id)
def test_performer_error_shrinks(case):
    assert site_error(case, "performer=256") < site_error(case, "performer=8")


@pytest.mark.parametrize("case", [BERT, GPT2], ids=lambda c: c.id)
def test_elu_linear_attention_runs_and_reports(case):
    assert 0 < site_error(case, "elu") < 1


def test_exact_is_exact_and_default():
    report = attnfuse.optimize_onnx(str(zoo.exported(BERT))).report
    assert report.attention_mode == "exact"
    assert report.verify.ok and report.verify.max_rel_error < 1e-4
    assert all("approximation" not in site.summary() for site in report.sites)


def test_bloom_alibi_read_as_slopes():
    report = attnfuse.inspect_onnx(str(zoo.exported(zoo.ZooCase("bloom", "dynamo", "eager"))))
    for site in report.sites:
        assert site.bias == "alibi"
        np.testing.assert_allclose(site.alibi_slopes, alibi_slopes(4).numpy(), rtol=1e-4)


@pytest.mark.parametrize("mode", ["window", "window=0", "performer=x", "fast", "linformer=4,global=1"])
def test_bad_mode_is_a_user_error(mode, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(zoo.exported(BERT)), "-o", str(out), "--attention", mode]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad attention mode" in err[0]
    assert not out.exists()
