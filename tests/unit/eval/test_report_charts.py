"""``pirl report``'s evaluation section: one chart per probe, random init as a reference in every chart, seed
groups with their spread, a headline table only, and the page as a headless browser draws it."""

import base64
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from helpers import tiny_config
from pirl.config import config_to_dict
from pirl.eval.report import collect_probes, headline_table, load_run, probe_png, seed_groups, write_report

STAGES = ("conv1", "res2", "res3", "res4", "res5", "pool")


def _run(root, method, seed, base, *, random_init=False):
    (root / "eval").mkdir(parents=True)
    cfg = config_to_dict(tiny_config(f"loss.method={method}", f"train.seed={seed}"))
    (root / "config.json").write_text(json.dumps({"data": "cifar10", "num_samples": 100, "config": cfg}))
    by_stage = {s: round(base + d, 4) for s, d in zip(STAGES, (0.05, 0.1, 0.12, 0.08, 0.02, 0.0))}
    results = {
        "knn-pool": {"eval": "knn", "protocol": "weighted kNN", "stage": "pool", "top1": base, "top1_k20": base + 0.01},
        "linear-all": {
            "eval": "linear",
            "protocol": "per-layer probes",
            "stage": "all",
            "top1": max(by_stage.values()),
            "top1_by_stage": by_stage,
        },
    }
    if random_init:
        results["knn-random-pool"] = {
            "eval": "knn",
            "protocol": "weighted kNN",
            "stage": "pool",
            "top1": 0.125,
            "random_init": True,
        }
        results["linear-random-all"] = {
            "eval": "linear",
            "protocol": "per-layer probes",
            "stage": "all",
            "top1": 0.2,
            "top1_by_stage": {s: 0.2 for s in STAGES},
            "random_init": True,
        }
    for name, result in results.items():
        (root / "eval" / f"{name}.json").write_text(json.dumps(result))
    return root


@pytest.fixture
def runs(tmp_path):
    """Three seeds of one PIRL config (random init evaluated under the first only) and one NPID run."""
    return [
        _run(tmp_path / "pirl-s0", "pirl", 0, 0.40, random_init=True),
        _run(tmp_path / "pirl-s1", "pirl", 1, 0.44),
        _run(tmp_path / "pirl-s2", "pirl", 2, 0.36),
        _run(tmp_path / "npid", "npid", 0, 0.30),
    ]


def test_runs_that_differ_only_in_seed_form_one_group(runs):
    loaded = [load_run(r) for r in runs]
    assert seed_groups(loaded) == [("pirl-s0 (seeds 0, 1, 2)", [0, 1, 2]), ("npid", [3])]


def test_probes_collect_every_run_and_random_init_from_any_run(runs):
    probes = collect_probes([load_run(r) for r in runs])
    assert [(p.kind, p.variant, p.shape) for p in probes] == [("knn", "pool", "bar"), ("linear", "all", "layers")]
    knn = probes[0]
    assert sorted(r["top1"] for r in knn.results["pirl-s0 (seeds 0, 1, 2)"]) == [0.36, 0.40, 0.44]
    assert [r["top1"] for r in knn.random] == [0.125]  # a reference for every group, not under one run only


def test_headline_table_holds_means_with_seed_spread_and_random_init(runs):
    loaded = [load_run(r) for r in runs]
    html = headline_table(loaded, collect_probes(loaded))
    assert html.count("<table>") == 1 and html.count("<tr>") == 4  # header, two groups, random init
    assert "0.4 ± 0.04 (3 seeds)" in html  # knn: mean of 0.36, 0.40, 0.44; farthest seed 0.04 away
    assert "0.52 ± 0.04 (3 seeds)" in html  # best layer (res3) of each seed
    assert '<i>random init</i></th><td class="num">0.125</td><td class="num">0.2</td>' in html
    assert "top1_k20" not in html  # secondary scores stay out of the table


def _decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("L"), dtype=np.float32)


def test_each_chart_draws_the_random_init_reference(runs):
    """The same chart without the random-init results differs from it: the reference line is drawn."""
    loaded = [load_run(r) for r in runs]
    for probe in collect_probes(loaded):
        with_ref = _decode(probe_png(probe))
        probe.random = []
        without = _decode(probe_png(probe))
        assert with_ref.shape == without.shape and np.abs(with_ref - without).max() > 100, probe.title


def test_report_page_is_offline_with_one_chart_per_probe(runs, tmp_path):
    out = tmp_path / "report.html"
    summary = write_report(runs, out)
    html = out.read_text()
    assert summary["runs"] == 4 and html.count('class="probe"') == 2
    assert html.count("<table>") == 2  # the runs' summary and the headline figures
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert not re.search(r"""(src|href)\s*=\s*(?!["']?(data:|#))""", html)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_headless_browser_draws_the_report(runs, tmp_path):
    out = tmp_path / "report.html"
    write_report(runs, out)
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,1600",
        f"--screenshot={shot}",
        out.as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (1600, 1200)
    # not blank: the page's text, tables and coloured chart pixels are there (matplotlib's C0 blue, C1 orange)
    assert (pixels.std(axis=(0, 1)) > 10).all()
    blue = (np.abs(pixels - (31, 119, 180)).sum(axis=2) < 40).sum()
    orange = (np.abs(pixels - (255, 127, 14)).sum(axis=2) < 40).sum()
    assert blue > 500 and orange > 500
