"""benchmarks/gpu_check.py's machinery, on the CPU: a stage that fails or overruns is recorded and the check
goes on; a stage stopped by SIGTERM finishes cleanly; the PIRL run's summary says whether the loss fell."""

import importlib.util
import json
import sys

import pytest

from helpers import REPO_ROOT


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_results_failures_and_timeouts_are_recorded(gpu_check, tmp_path):
    ok = gpu_check.run_stage("ok", [sys.executable, "-c", "print('{\"a\": 1}'); print('noise')"], 30, tmp_path)
    assert ok["status"] == "ok" and ok["rc"] == 0 and ok["results"] == [{"a": 1}]
    bad = gpu_check.run_stage("bad", [sys.executable, "-c", "import sys; sys.exit('boom')"], 30, tmp_path)
    assert bad["status"] == "failed" and bad["rc"] == 1 and "boom" in bad["tail"]
    slow = gpu_check.run_stage("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 1, tmp_path)
    assert slow["status"] == "timeout" and slow["rc"] is None
    missing = gpu_check.run_stage("missing", [str(tmp_path / "no-such-program")], 5, tmp_path)
    assert missing["status"] == "failed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.log", "missing.log", "ok.log", "slow.log"]


def test_sigterm_after_the_budget_lets_the_command_finish(gpu_check, tmp_path):
    code = (
        "import signal, sys, time\n"
        'signal.signal(signal.SIGTERM, lambda *a: (print(\'{"stopped": "SIGTERM"}\'), sys.exit(0)))\n'
        "time.sleep(60)\n"
    )
    result = gpu_check.run_stage("term", [sys.executable, "-c", code], 30, tmp_path, term_after_s=1)
    assert result["status"] == "ok" and result["results"] == [{"stopped": "SIGTERM"}]


def test_train_summary_says_whether_the_loss_fell(gpu_check, tmp_path):
    rows = [{"kind": "train", "global_step": s, "loss_mean": 8 - s / 10, "images_per_s": 100 + s} for s in range(10)]
    rows += [{"kind": "epoch", "epoch": 1, "loss": 7.5}, {"kind": "epoch", "epoch": 2, "loss": 7.1}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n{cut")
    summary = gpu_check.train_summary(tmp_path)
    assert summary["loss_falls"] is True and summary["epoch_losses"] == [7.5, 7.1]
    assert summary["median_images_per_s"] == 105
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:8]))  # no epoch finished
    assert gpu_check.train_summary(tmp_path)["loss_falls"] is True  # the logged steps decide
    rising = [{**r, "loss_mean": 7 + r["global_step"] / 10} for r in rows[:8]]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rising)))
    assert gpu_check.train_summary(tmp_path)["loss_falls"] is False


def test_synthetic_folder_has_labelled_images(gpu_check, tmp_path):
    from pirl.data.sources import open_source

    gpu_check.synthetic_folder(tmp_path / "img", classes=3, per_class=4)
    source = open_source(str(tmp_path / "img"))
    assert len(source) == 12 and sorted(set(source.labels)) == [0, 1, 2]
