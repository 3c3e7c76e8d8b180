"""The evaluators (per-layer linear, low-shot SVMs, fine-tuning, invariance, retrieval) on data whose
answer is known, and ``pirl eval KIND`` end to end on a tiny generated ImageFolder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from helpers import tiny_config
from pirl.checkpoint import save_checkpoint
from pirl.cli import main
from pirl.config import config_to_dict
from pirl.data.sources import open_source
from pirl.errors import PirlError
from pirl.eval import finetune as ft
from pirl.eval import invariance as inv
from pirl.eval import lowshot as ls
from pirl.eval import retrieval as rt
from pirl.methods import build_method
from pirl.models.trunk import build_trunk

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _clusters(n_per: int, n_cls: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n_cls).repeat_interleave(n_per)
    return torch.eye(n_cls, dim)[y] * 10 + spread * torch.randn(len(y), dim, generator=gen), y


def _folder(root, classes: int = 2, per_class: int = 8, size: int = 16, seed: int = 0):
    """Class subfolders of small PNGs; class c has channel c saturated, the rest is noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
            arr[..., c] = 255
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")
    return root


def _export(root, input_size: int = 16):
    """A trunk-only export (random resnet18), written directly: the format, not training, is what matters here."""
    torch.manual_seed(0)
    root.mkdir(parents=True)
    save_file(build_trunk("resnet18", "imagenet").state_dict(), root / "model.safetensors")
    meta = {
        "format": "pirl-export-1",
        "arch": "resnet18",
        "stem": "imagenet",
        "feature_dim": 512,
        "input_size": input_size,
        "mean": MEAN,
        "std": STD,
    }
    (root / "config.json").write_text(json.dumps(meta))
    return root


def _run_dir(root):
    """A run directory holding one checkpoint of an untrained tiny PIRL model (trunk, f and g heads)."""
    cfg = tiny_config()
    method = build_method(cfg, 16)
    state = {"config": config_to_dict(cfg), "method": method.state_dict(), "epoch": 0, "step": 0}
    save_checkpoint(root, state, 0, 0, keep=1)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    return {
        "data": _folder(root / "images"),
        "export": _export(root / "export"),
        "run": _run_dir(root / "run"),
        "cache": root / "cache",
    }


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These tensors are tiny: a second thread only adds synchronisation, and the CPU is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _cache(tiny, monkeypatch):
    # One feature cache for the module: the CLI tests share the tiny export's features, as users' runs would.
    monkeypatch.setenv("PIRL_CACHE_DIR", str(tiny["cache"]))


# ---------------------------------------------------------------- low-shot SVMs


def test_lowshot_separable_features_are_perfect_from_one_shot() -> None:
    xtr, ytr = _clusters(10, 3, 8, 0.5, seed=0)
    xte, yte = _clusters(10, 3, 8, 0.5, seed=1)
    res = ls.lowshot_svm(xtr, ytr, xte, yte, shots=(1, 2, 4, 8, 32), seeds=2, costs=(0.1, 1.0, 10.0))
    assert res["top1_by_shot"] == {"1": 1.0, "2": 1.0, "4": 1.0, "8": 1.0}
    assert res["skipped_shots"] == [32] and res["top1"] == 1.0 and res["top1_shots"] == 8
    assert res["std_by_shot"]["1"] == 0.0
    detail = res["details"]["by_shot"]
    assert detail["1"]["cost_per_seed"] == [ls.FALLBACK_COST] * 2  # nothing to cross-validate with one shot
    assert "leave-one-out" in detail["2"]["cost_selection"] and "3-fold" in detail["8"]["cost_selection"]


def test_lowshot_random_labels_near_chance_and_deterministic() -> None:
    gen = torch.Generator().manual_seed(0)
    xtr, ytr = torch.randn(200, 16, generator=gen), torch.arange(200) % 4
    xte, yte = torch.randn(400, 16, generator=gen), torch.randint(0, 4, (400,), generator=gen)
    kw = {"shots": (16,), "seeds": 2, "costs": (0.1, 1.0)}
    res = ls.lowshot_svm(xtr, ytr, xte, yte, **kw)
    assert abs(res["top1"] - 0.25) < 0.1
    assert ls.lowshot_svm(xtr, ytr, xte, yte, **kw)["details"] == res["details"]


def test_svm_cost_by_cv_on_linearly_separable_points() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (60, 2))
    x[:, 0] += np.where(x[:, 0] > 0, 0.5, -0.5)  # a margin of 1 around x0 = 0
    y = (x[:, 0] > 0).astype(int)
    cost, scores = ls.choose_cost(x, y, (0.001, 1.0, 100.0), n=30, seed=0)
    assert scores[cost] == 1.0 and set(scores) == {0.001, 1.0, 100.0}
    assert cost == min(c for c, s in scores.items() if s == 1.0)  # ties go to the stronger penalty
    assert (ls._svm(cost, 0).fit(x, y).predict(x) == y).all()


def test_sample_per_class_is_balanced_and_seeded() -> None:
    y = np.array([0] * 10 + [1] * 5 + [2] * 7)
    idx = ls.sample_per_class(y, 4, seed=3)
    assert np.bincount(y[idx]).tolist() == [4, 4, 4] and len(set(idx)) == 12
    assert (ls.sample_per_class(y, 4, seed=3) == idx).all()
    assert not (ls.sample_per_class(y, 4, seed=4) == idx).all()


def test_lowshot_bad_input() -> None:
    x, y = _clusters(2, 2, 4, 0.1, seed=0)
    with pytest.raises(PirlError, match="smallest class"):
        ls.lowshot_svm(x, y, x, y, shots=(8,), seeds=1)
    with pytest.raises(PirlError):
        ls.lowshot_svm(x, y, x, y, shots=(0,), seeds=1)


# ---------------------------------------------------------------- fine-tuning


def test_balanced_subset_takes_the_fraction_of_every_class() -> None:
    labels = [0] * 100 + [1] * 50 + [2] * 3 + [-1] * 5
    idx = ft.balanced_subset(labels, 0.1, seed=0)
    assert np.bincount([labels[i] for i in idx]).tolist() == [10, 5, 1]
    assert idx == sorted(idx) == ft.balanced_subset(labels, 0.1, seed=0) != ft.balanced_subset(labels, 0.1, seed=1)
    assert len(ft.balanced_subset(labels, 1.0)) == 153
    for bad in (0.0, -0.5, 1.01, float("nan")):
        with pytest.raises(PirlError, match="fraction"):
            ft.balanced_subset(labels, bad)


def test_finetune_learns_colour_classes(tiny) -> None:
    # A small conv trunk keeps this to a second on a busy CPU; the CLI test below fine-tunes a ResNet-18.
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    source = open_source(str(tiny["data"]))
    res = ft.finetune(
        trunk,
        source,
        source,
        input_size=16,
        mean=MEAN,
        std=STD,
        fraction=1.0,
        epochs=14,
        lr=0.1,
        batch_size=8,
        device="cpu",
        seed=0,
        out_dim=8,
    )
    assert res["top1"] >= 0.9, res
    assert res["train_images"] == 16 and res["milestones"] == [6] and res["device"] == "cpu"
    assert res["details"]["train_loss_per_epoch"][-1] < res["details"]["train_loss_per_epoch"][0]
    assert ft.default_milestones(70) == [30] and ft.default_milestones(1) == []


# ---------------------------------------------------------------- invariance


def test_unit_distances_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 5.0], [-2.0, 0.0], [2.0, 2.0], [1.0, math.sqrt(3)]])
    # orthogonal: sqrt(2); opposite: 2; same direction: 0; 30 degrees apart: 2 sin(15 deg)
    want = torch.tensor([math.sqrt(2), 2.0, 0.0, 2 * math.sin(math.radians(15))])
    torch.testing.assert_close(inv.unit_distances(a, b), want)


def test_shuffle_grid_and_centre_patches_by_hand() -> None:
    img = torch.arange(2 * 7 * 7, dtype=torch.float32).reshape(2, 7, 7)
    assert inv.crop_to_grid(img, 3).shape == (2, 6, 6)
    assert torch.equal(inv.shuffle_grid(img, torch.arange(9)), inv.crop_to_grid(img, 3))
    x = torch.arange(16.0).reshape(1, 4, 4)  # 2x2 grid of 2x2 cells: swap the cells in each row
    swapped = inv.shuffle_grid(x, torch.tensor([1, 0, 3, 2]), grid=2)
    assert swapped[0].tolist() == [[2, 3, 0, 1], [6, 7, 4, 5], [10, 11, 8, 9], [14, 15, 12, 13]]
    patches = inv.centre_patches(torch.arange(36.0).reshape(1, 6, 6), torch.tensor([3, 0, 1, 2]), grid=2, patch=1)
    # cells of 3 px, centre pixel at offset 1: cell 0 -> (1, 1) = 7, 1 -> (1, 4) = 10, 2 -> (4, 1) = 25,
    # 3 -> (4, 4) = 28
    assert patches.flatten().tolist() == [28.0, 7.0, 10.0, 25.0]
    order = inv.random_order(3, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(9)) and order.tolist() != list(range(9))


class _MeanColour(nn.Module):
    """Global average pool: the same value for any rearrangement of the image's cells."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) + torch.tensor([1.0, 2.0, 3.0])


def test_invariance_zero_for_a_model_that_sees_identical_inputs(tiny) -> None:
    source = open_source(str(tiny["data"]))
    idx = list(range(len(source)))
    invariant = inv.Subject("mean", "trunk", _MeanColour(), None, "jigsaw", 15, MEAN, STD)
    torch.testing.assert_close(inv.distances(invariant, source, idx, device="cpu"), torch.zeros(16), atol=1e-3, rtol=0)
    sensitive = inv.Subject("flat", "trunk", nn.Flatten(), None, "jigsaw", 15, MEAN, STD)
    assert (inv.distances(sensitive, source, idx, device="cpu") > 0.1).all()


class _TopLeftColour(nn.Module):
    """The mean colour of the top-left 5x5 pixels: it changes when the cells are shuffled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :5, :5].mean(dim=(2, 3))


def _pooled_bn() -> nn.Module:
    """That colour through a BatchNorm whose running statistics are far from any batch's."""
    bn = nn.BatchNorm1d(3)
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(4.0)
    return nn.Sequential(_TopLeftColour(), bn)


def test_invariance_with_batch_statistics_normalises_each_pass_by_its_own_batch(tiny) -> None:
    source = open_source(str(tiny["data"]))
    idx = list(range(len(source)))
    trunk = _pooled_bn()
    subject = inv.Subject("bn", "trunk", trunk, None, "jigsaw", 15, MEAN, STD)
    pairs = inv._Pairs(source, idx, subject, 0)
    a, b = (torch.stack([pairs[i][0][k] for i in range(len(idx))]) for k in (0, 1))
    pooled_a, pooled_b = _TopLeftColour()(a), _TopLeftColour()(b)

    def batch_norm(x: torch.Tensor) -> torch.Tensor:  # by hand: the batch's mean and biased variance
        return (x - x.mean(0)) / (x.var(0, unbiased=False) + 1e-5).sqrt()

    want_batch = inv.unit_distances(batch_norm(pooled_a), batch_norm(pooled_b))
    want_running = inv.unit_distances((pooled_a - 5.0) / (4.0 + 1e-5) ** 0.5, (pooled_b - 5.0) / (4.0 + 1e-5) ** 0.5)
    # batch size 15 would leave a last batch of one image, which has no batch statistics: one batch of 16
    got_batch = inv.distances(subject, source, idx, batch_size=15, device="cpu", bn_stats="batch")
    torch.testing.assert_close(got_batch, want_batch, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(inv.distances(subject, source, idx, device="cpu"), want_running, atol=1e-5, rtol=1e-4)
    assert (want_batch - want_running).abs().max() > 0.05  # the two settings measure different things here
    bn = trunk[1]  # the model itself is left as it was: running statistics, eval mode
    assert bn.running_mean.tolist() == [5.0] * 3 and bn.running_var.tolist() == [4.0] * 3 and not bn.training
    with pytest.raises(PirlError, match="unknown bn_stats 'train'"):
        inv.distances(subject, source, idx, device="cpu", bn_stats="train")


def test_load_subject_heads_for_runs_trunk_for_exports(tiny) -> None:
    heads = inv.load_subject(str(tiny["run"]))
    assert heads.space == "heads" and heads.pretext == "jigsaw" and set(heads.heads) == {"f", "g"}
    assert inv.load_subject(str(tiny["run"]), "trunk").space == "trunk"
    assert inv.load_subject(str(tiny["export"])).space == "trunk"
    with pytest.raises(PirlError, match="trunk only"):
        inv.load_subject(str(tiny["export"]), "heads")
    source = open_source(str(tiny["data"]))
    res = inv.invariance(
        [heads, inv.load_subject(str(tiny["export"]), random_init=True)], source, images=5, device="cpu"
    )
    assert res["images"] == 5 and len(res["mean_distance"]) == 2
    assert all(0.0 <= d <= 2.0 for d in res["mean_distance"].values())
    assert sum(res["details"]["per_model"][heads.name]["histogram"]["counts"]) == 5


# ---------------------------------------------------------------- retrieval


def test_retrieval_identical_sets_return_themselves_first() -> None:
    x, y = _clusters(5, 3, 6, 1.0, seed=0)
    sims, idx = rt.nearest(x, x, k=4)
    assert idx[:, 0].tolist() == list(range(15))
    torch.testing.assert_close(sims[:, 0], torch.ones(15))
    assert rt.label_metrics(idx, y, y) == {"precision_at_k": 1.0, "top1": 1.0}


def test_retrieval_metrics_by_hand(tmp_path) -> None:
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = torch.tensor([0, 1, 1])
    _, idx = rt.nearest(train, torch.tensor([[1.0, 0.0], [0.0, 3.0]]), k=2)
    assert idx.tolist() == [[0, 1], [2, 1]]
    # query 0 (label 0): neighbours labelled 0, 1; query 1 (label 1): 1, 1
    assert rt.label_metrics(idx, train_y, torch.tensor([0, 1])) == {"precision_at_k": 0.75, "top1": 1.0}
    queries = rt.choose_queries(10, 20, seed=0)
    assert queries == rt.choose_queries(10, 20, seed=0) and sorted(queries) == list(range(10))
    img = Image.new("RGB", (16, 16), (255, 0, 0))
    rt.plot_grid([img, img], [[img, img], [img]], [[True, False], [True]], tmp_path / "grid.png", size=16)
    assert Image.open(tmp_path / "grid.png").size[0] > 0


# ---------------------------------------------------------------- CLI end to end


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("kind", "extra", "keys"),
    [
        ("knn", [], {"top1", "top1_k20"}),
        ("linear", ["--stage", "all"], {"top1", "best_stage", "top1_by_stage"}),
        ("lowshot", ["--shots", "1", "2", "4", "--seeds", "2"], {"top1", "top1_by_shot", "std_by_shot"}),
        (
            "finetune",
            ["--fraction", "0.25", "--epochs", "1", "--batch-size", "4", "--lr", "0.05", "--device", "cpu"],
            {"top1", "fraction", "train_images"},
        ),
        ("retrieval", ["--queries", "3", "--k", "4"], {"top1", "precision_at_k"}),
        ("invariance", ["--random-init", "--images", "4"], {"mean_distance", "models"}),
    ],
)
def test_cli_each_kind(tiny, tmp_path, capsys, kind, extra, keys) -> None:
    out = tmp_path / "out"
    models = ["--model", tiny["export"]] + (["--model", tiny["run"]] if kind == "invariance" else [])
    code, stdout, err = _cli(
        capsys,
        "eval",
        kind,
        *models,
        "--data",
        tiny["data"],
        "--val-data",
        tiny["data"],
        "--workers",
        "0",
        "--out",
        out,
        *extra,
    )
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert keys <= set(summary) and summary["eval"] == kind and "details" not in summary
    written = {p.name for p in out.iterdir()}
    full = json.loads(next(out.glob("*.json")).read_text())
    assert full["eval"] == kind and full["protocol"]
    if kind == "linear":
        assert set(summary["top1_by_stage"]) == {"conv1", "res2", "res3", "res4", "res5", "pool"}
        assert summary["top1"] == summary["top1_by_stage"][summary["best_stage"]]
        assert written == {"linear-all.json"}
    elif kind == "retrieval":
        assert summary["top1"] == 1.0 and summary["top1_all_test"] == 1.0  # test images are the train images
        assert [q["neighbours"][0] for q in full["details"]["queries"]] == [
            q["test_index"] for q in full["details"]["queries"]
        ]
        assert written == {"retrieval-pool.json", "retrieval-pool.png"}
    elif kind == "invariance":
        assert len(summary["mean_distance"]) == 3 and written == {"invariance.json", "invariance.png"}
        assert [m["space"] for m in summary["per_model"].values()] == ["trunk", "heads", "trunk"]
    elif kind == "finetune":
        assert summary["train_images"] == 4 and written == {"finetune-f0.25.json"}
    else:
        assert 0.0 <= summary["top1"] <= 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["finetune", "--fraction", "0"], "--fraction must be in (0, 1]"),
        (["finetune", "--fraction", "1.5"], "--fraction must be in (0, 1]"),
        (["knn", "--model", "{tmp}/missing"], "model not found"),
        (["invariance", "--model", "{tmp}/missing"], "model not found"),
        (["knn", "--model", "{export}"], "only 'pirl eval invariance' compares several models"),
        (["lowshot", "--stage", "all"], "--stage all is for 'pirl eval linear'"),
        (["lowshot", "--seeds", "0"], "--seeds must be at least 1"),
        (["finetune", "--device", "gpu"], "unknown device 'gpu'"),
        (["retrieval", "--seed", "-1"], "--seed must be in [0, 2**32)"),
    ],
)
def test_cli_bad_input_is_one_line(tiny, tmp_path, capsys, args, message) -> None:
    args = [a.format(tmp=tmp_path, export=tiny["export"]) for a in args]
    models = [] if "missing" in " ".join(args) else ["--model", tiny["export"]]
    code, stdout, err = _cli(capsys, "eval", *args, *models, "--data", tiny["data"], "--workers", "0")
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
