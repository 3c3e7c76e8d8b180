"""The reproduction script end to end on a few dozen images: plan, resume, skip, results file and page."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "experiments" / "reproduce.py"
MARKERS = (
    "<!-- main-table: written by experiments/study_report.py from docs/results/reproduction.json -->",
    "<!-- /main-table -->",
)
CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()


def _tiny_cifar(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((32, 32, 3)) * 60 + c * 19).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg")
    return root


def _reproduce(tmp_path: Path, *names: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--data",
        str(tmp_path / "cifar"),
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "reproduction.json"),
        "--html",
        str(tmp_path / "reproduction.html"),
        "--markdown",
        str(tmp_path / "reproduction.md"),
        "--smoke",
        "--eval-train-every",
        "1",
        "--only",
        *names,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.study
def test_reproduce_smoke_appends_each_run_and_skips_it_next_time(tmp_path):
    _tiny_cifar(tmp_path / "cifar")
    (tmp_path / "reproduction.md").write_text(f"# Study\n\n{MARKERS[0]}\nold\n{MARKERS[1]}\n\nThe claims.\n")
    # random init needs its model's export: asked first, it is skipped, and done once the run exists
    first = _reproduce(tmp_path, "main-random", "main-pirl-s0", "main-random")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "skip main-random: needs main-pirl-s0 first" in first.stdout
    results = json.loads((tmp_path / "reproduction.json").read_text())
    rows = {r["name"]: r for r in results["runs"]}
    assert list(rows) == ["main-pirl-s0", "main-random"]
    pirl = rows["main-pirl-s0"]
    assert pirl["method"] == "pirl" and pirl["study"] == "main" and pirl["lam"] == 0.5
    assert pirl["epochs"] == 1 and pirl["images_per_s"] > 0
    for key in ("knn_k20", "knn_k200", "linear", "linear_best"):
        assert 0.0 <= pirl[key] <= 1.0 and 0.0 <= rows["main-random"][key] <= 1.0
    assert Path(pirl["export"], "model.safetensors").is_file()
    # each run's invariance (Fig. 4) is part of its evaluation: the trunk space for all, the heads for PIRL (in
    # eval mode and with each pass's own batch statistics)
    assert set(pirl["invariance"]) == {"trunk", "heads", "heads_batch"}
    assert set(rows["main-random"]["invariance"]) == {"trunk"}
    for stats in [*pirl["invariance"].values(), rows["main-random"]["invariance"]["trunk"]]:
        assert stats["n"] == 20 and sum(stats["histogram"]["counts"]) == 20  # the 20 tiny test images
        assert 0.0 < stats["mean"] <= 2.0
    assert pirl["invariance"]["trunk"] != rows["main-random"]["invariance"]["trunk"]
    assert results["testbed"]["smoke"] is True and results["testbed"]["epochs"] == 10
    page = (tmp_path / "reproduction.html").read_text()
    assert "main-pirl-s0" in page and "data:image/png;base64," in page
    md = (tmp_path / "reproduction.md").read_text()  # the write-up's tables, between their markers only
    assert md.startswith("# Study\n\n") and md.endswith(f"{MARKERS[1]}\n\nThe claims.\n") and "old" not in md
    assert f"| `main-pirl-s0` | {pirl['knn_k20']:.3f} | {pirl['knn_k200']:.3f} | {pirl['linear']:.3f} |" in md
    # a second call finds both runs done: nothing is trained or evaluated again
    again = _reproduce(tmp_path, "main-pirl-s0", "main-random")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "+ pirl" not in again.stdout
    assert json.loads((tmp_path / "reproduction.json").read_text())["runs"] == results["runs"]


def test_reproduce_refuses_an_unknown_run_name(tmp_path):
    _tiny_cifar(tmp_path / "cifar")
    done = _reproduce(tmp_path, "main-pirl-s9")
    assert done.returncode == 2 and "unknown run name(s): main-pirl-s9" in done.stderr


@pytest.mark.study
def test_reproduce_invariance_fills_rows_that_lack_it_from_exports_on_disk(tmp_path):
    _tiny_cifar(tmp_path / "cifar")
    assert _reproduce(tmp_path, "main-npid-s0").returncode == 0
    results_path = tmp_path / "reproduction.json"
    measured = json.loads(results_path.read_text())
    assert set(measured["runs"][0]["invariance"]) == {"trunk"}  # NPID++ has no g head
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--data",
        str(tmp_path / "cifar"),
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(results_path),
        "--html",
        str(tmp_path / "reproduction.html"),
        "--smoke",
        "--eval-train-every",
        "1",
        "--invariance",
    ]

    def strip_and_fill() -> tuple[subprocess.CompletedProcess, dict]:
        stripped = json.loads(results_path.read_text())
        del stripped["runs"][0]["invariance"]  # a row written before invariance was part of the evaluation
        results_path.write_text(json.dumps(stripped))
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done, json.loads(results_path.read_text())

    # a random-init row whose own model (main-pirl-s0) was never exported here borrows another run's architecture
    with_random = json.loads(results_path.read_text())
    probes = ("knn_k20", "knn_k200", "linear", "linear_best", "best_stage", "linear_by_stage")
    figures = {k: measured["runs"][0][k] for k in probes}  # any figures: the page draws them
    with_random["runs"].append({"name": "main-random", "study": "main", "method": "random", "seed": 0, **figures})
    results_path.write_text(json.dumps(with_random))
    _, filled = strip_and_fill()
    assert filled["runs"][0] == measured["runs"][0]  # the same seeded images and model: the same figures
    random_trunk = filled["runs"][1]["invariance"]["trunk"]
    assert set(filled["runs"][1]["invariance"]) == {"trunk"} and random_trunk["n"] == 20
    assert random_trunk != measured["runs"][0]["invariance"]["trunk"]
    assert "Invariance to the jigsaw transform (Fig. 4)" in (tmp_path / "reproduction.html").read_text()
    export = tmp_path / "runs" / "main-npid-s0" / "export"
    export.rename(export.with_name("moved"))
    skipped, left = strip_and_fill()
    assert f"skip invariance of main-npid-s0: its export {export} is gone" in skipped.stdout
    assert "invariance" not in left["runs"][0] and "+ pirl" not in skipped.stdout
    assert left["runs"][1]["invariance"]["trunk"] == random_trunk and len(left["runs"]) == 2  # kept: it had its figures


def test_the_invariance_figure_takes_each_method_by_its_lowest_measured_seed(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "experiments"))
    import study_report

    def stats(mean):
        return {"mean": mean, "std": 0.1, "median": mean, "n": 4, "histogram": {"counts": [4], "bin_edges": [0, 2]}}

    def run(name, method, seed, mean, heads=None, study="main"):
        inv = {"trunk": stats(mean)} | ({"heads": stats(heads)} if heads is not None else {})
        return {"name": name, "study": study, "method": method, "seed": seed, "invariance": inv}

    runs = [
        run("main-pirl-s1", "pirl", 1, 0.5, heads=0.3),
        run("main-pirl-s0", "pirl", 0, 0.4, heads=0.2),
        run("main-npid-s1", "npid", 1, 0.9),
        {"name": "main-npid-s0", "study": "main", "method": "npid", "seed": 0},  # measured before: no invariance
        run("main-rotation-s0", "rotation", 0, 1.1),  # not a method of the figure
        run("why-bn-image-stats-s0", "pirl", 0, 0.1, heads=0.1, study="why"),  # not a main run
        run("main-random", "random", 0, 1.3),
    ]
    figure = study_report.invariance_figure({"runs": runs})
    assert {k: v["mean"] for k, v in figure["trunk"].items()} == {
        "main-pirl-s0": 0.4,
        "main-npid-s1": 0.9,
        "random": 1.3,
    }
    assert {k: v["mean"] for k, v in figure["heads"].items()} == {"main-pirl-s0": 0.2}
    assert study_report.invariance_figure({"runs": runs[2:4]}) == {"trunk": {"main-npid-s1": stats(0.9)}}
    table = study_report.markdown_tables({"runs": runs})
    assert "| `main-pirl-s0` | 0.400 ± 0.100 | 0.200 ± 0.100 |" in table
    assert "| `main-npid-s1` | 0.900 ± 0.100 |  |" in table and "| `main-npid-s0` | 0.9" not in table


def test_the_write_ups_tables_average_the_seeds_of_each_method(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "experiments"))
    import study_report

    assert (study_report.MARKDOWN_START, study_report.MARKDOWN_END) == MARKERS

    def run(name, method, seed, knn, linear, study="main", lam=0.5):
        by_stage = {"conv1": 0.5, "res2": 0.55, "res3": 0.52, "res4": 0.5, "res5": 0.45, "pool": linear}
        return {
            "name": name, "study": study, "method": method, "seed": seed, "knn_k20": knn + 0.01, "knn_k200": knn,
            "linear": linear, "linear_best": 0.55, "best_stage": "res2", "linear_by_stage": by_stage,
            "images_per_s": 58.0, "load_avg": 2.1, "lam": lam,
        }  # fmt: skip

    results = {
        "runs": [
            run("main-pirl-s0", "pirl", 0, 0.40, 0.50),
            run("main-pirl-s1", "pirl", 1, 0.44, 0.54),
            run("main-npid-s0", "npid", 0, 0.45, 0.51, lam=0.0),
            run("why-bn-s0", "pirl", 0, 0.47, 0.53, study="why"),
            run("lambda-1.0-s0", "pirl", 0, 0.30, 0.30, study="lambda", lam=1.0),
        ]
    }
    tables = study_report.markdown_tables(results)
    assert "| `main-pirl-s0` | 0.410 | 0.400 | 0.500 | 0.550 (res2) | 58 (2.1) |" in tables
    assert "`why-bn-s0`" in tables and "\n| `lambda-1.0-s0` |" not in tables  # the main and why runs only
    # the lambda ablation: the main PIRL and NPID++ runs are its 0.5 and 0 (the why run is not)
    assert "| 0 | `main-npid-s0` | 0.460 | 0.450 | 0.510 | 0.550 |" in tables
    assert "| 0.5 | `main-pirl-s0`, `main-pirl-s1` | 0.430 ± 0.028 | 0.420 ± 0.028 | 0.520 ± 0.028 |" in tables
    assert "| 1 | `lambda-1.0-s0` | 0.310 | 0.300 | 0.300 | 0.550 |" in tables
    assert "negatives ablation" not in tables  # no run of it
    assert "| pirl | 2 | 0.430 ± 0.028 | 0.420 ± 0.028 | 0.520 ± 0.028 | 0.550 ± 0.000 |" in tables  # not why-bn
    assert "| npid | 1 | 0.460 | 0.450 | 0.510 | 0.550 |" in tables
    assert "| `main-npid-s0` | 0.500 | 0.550 | 0.520 | 0.500 | 0.450 | 0.510 |" in tables
    doc = tmp_path / "write-up.md"
    assert not study_report.update_markdown(results, doc)  # no file
    doc.write_text("no markers\n")
    assert not study_report.update_markdown(results, doc) and doc.read_text() == "no markers\n"


def test_a_plan_entry_reuses_only_a_finished_run_of_the_same_configuration(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "experiments"))
    import reproduce

    runs = {r.name: r for r in reproduce.plan()}
    reusing = [r for r in runs.values() if r.same_as is not None]
    assert [r.name for r in reusing] == ["main-supervised-s0"]
    for run in reusing:
        target = runs[run.same_as]
        for key in ("method", "seed", "testbed", "data"):
            assert getattr(run, key) == getattr(target, key)
        assert run.config_overrides() == target.config_overrides()
    run = runs["main-supervised-s0"]
    assert reproduce.reused_row(run, {}) is None  # not finished yet: it would be trained
    rows = {run.same_as: {"name": run.same_as, "study": "testbed", "method": "supervised", "linear": 0.6}}
    assert reproduce.reused_row(run, rows) == {
        "name": "main-supervised-s0",
        "study": "main",
        "method": "supervised",
        "linear": 0.6,
        "same_run_as": run.same_as,
    }
    assert rows[run.same_as]["name"] == run.same_as  # the finished row itself is left as it was
    assert reproduce.reused_row(runs["main-supervised-s1"], rows) is None


def test_the_headline_table_averages_the_main_runs_and_fills_its_markers(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "experiments"))
    import study_report

    def run(name, method, seed, knn, linear, study="main", speed=50.0, stage="res2", testbed="t64"):
        return {
            "name": name, "study": study, "method": method, "seed": seed, "testbed": testbed, "knn_k20": knn + 0.01,
            "knn_k200": knn, "linear": linear, "linear_best": linear + 0.05, "best_stage": stage,
            "images_per_s": speed, "epochs": 10, "train_s": 900,
        }  # fmt: skip

    results = {
        "testbed": {"chosen": "t64", "candidates": {"t64": "64 px"}, "subset": 10000, "epochs": 10, "eval": "e"},
        "runs": [
            run("main-pirl-s0", "pirl", 0, 0.40, 0.50, speed=58.0),
            run("main-pirl-s1", "pirl", 1, 0.44, 0.54, speed=72.0, stage="conv1"),
            run("main-pirl-s2", "pirl", 2, 0.42, 0.52, speed=60.0),
            run("why-bn-s0", "pirl", 0, 0.90, 0.90, study="why"),  # not a main run: not in the headline
            {**run("main-random", "random", 0, 0.30, 0.40, speed=None), "images_per_s": None, "epochs": 0},
            run("quick-e5-s0", "pirl", 0, 0.37, 0.46, study="quick"),
        ],
    }
    table = study_report.headline(results)
    assert [r["method"] for r in table["runs"]] == ["pirl", "random"]
    pirl, rand = table["runs"]
    assert pirl["seeds"] == [0, 1, 2] and pirl["runs"] == ["main-pirl-s0", "main-pirl-s1", "main-pirl-s2"]
    assert pirl["knn"] == pirl["knn_k200"] == pytest.approx(0.42) and pirl["linear"] == pytest.approx(0.52)
    assert pirl["linear_std"] == pytest.approx(0.02) and pirl["best_stage"] == "res2"  # two of the three seeds
    assert pirl["images_per_s"] == 72.0 and rand["images_per_s"] is None and rand["linear_std"] is None
    assert table["protocol"]["testbed"] == "64 px" and "10000" in table["protocol"]["pretraining"]
    md = study_report.headline_markdown(table)
    assert "| pirl | 3 | 0.420 ± 0.020 | 0.430 ± 0.020 | 0.520 ± 0.020 | 0.570 ± 0.020 (res2) | 72 |" in md
    assert "| random init | 1 | 0.300 | 0.310 | 0.400 | 0.450 (res2) | - |" in md
    page, other = tmp_path / "README.md", tmp_path / "other.md"
    page.write_text(f"# T\n{study_report.HEADLINE_START}\nold\n{study_report.HEADLINE_END}\nafter\n")
    other.write_text("no markers\n")
    study_report.update_headline(results, tmp_path / "cifar10.json", [page, other, tmp_path / "missing.md"])
    assert json.loads((tmp_path / "cifar10.json").read_text()) == json.loads(json.dumps(table))
    assert page.read_text() == f"# T\n{study_report.HEADLINE_START}\n{md}\n{study_report.HEADLINE_END}\nafter\n"
    assert other.read_text() == "no markers\n"
    # the cpu-quick candidates, each against the random trunk of its testbed
    quick = study_report.markdown_tables(results)
    row = "| `quick-e5-s0` | 900 | 0.380 (+7.0) | 0.370 (+7.0) | 0.460 (+6.0) | 0.510 (res2) | 0.310 / 0.300 / 0.400 |"
    assert row in quick
