"""Crafted datasets, run folders, checkpoints and exports from untrusted hands: each is refused with one line or
handled correctly, and nothing is written outside the run folder or the cache.

Archive and image-decoding cases live in test_archive.py and test_images.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import TINY
from pirl.checkpoint import CHECKPOINT_FORMAT
from pirl.cli import main
from pirl.data.sources import open_source
from pirl.errors import PirlError
from pirl.eval.report import load_run
from pirl.models.trunk import build_trunk
from pirl.safe_io import atomic_write_text, open_append, read_regular

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("PIRL_CACHE_DIR", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _colour_folder(root: Path, colours: dict[str, int], per_class: int = 6, seed: int = 0) -> Path:
    """One subfolder per class; class images have one channel saturated, the same file names in every class."""
    rng = np.random.default_rng(seed)
    for name, channel in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            arr[..., channel] = 255
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def _export(root: Path) -> Path:
    torch.manual_seed(0)
    root.mkdir(parents=True)
    save_file(build_trunk("resnet18", "imagenet").state_dict(), root / "model.safetensors")
    (root / "config.json").write_text(
        json.dumps(
            {
                "format": "pirl-export-1",
                "arch": "resnet18",
                "stem": "imagenet",
                "feature_dim": 512,
                "input_size": 16,
                "mean": MEAN,
                "std": STD,
            }
        )
    )
    return root


# --------------------------------------------------------------------------- the feature cache


def test_knn_after_swapping_two_class_folders_gives_the_new_figure(tmp_path, capsys) -> None:
    train = _colour_folder(tmp_path / "train", {"red": 0, "green": 1})
    test = _colour_folder(tmp_path / "test", {"red": 0, "green": 1}, seed=1)
    model = _export(tmp_path / "export")
    args = ["eval", "knn", "--model", model, "--data", train, "--val-data", test, "--workers", "0"]
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["top1"] == 1.0
    entries = set((tmp_path / "cache" / "features").iterdir())
    assert len(entries) == 2  # train and test features are cached
    # swap the class folders of the training images: same file names, sizes and mtimes, labels now wrong
    os.rename(train / "red", train / "tmp")
    os.rename(train / "green", train / "red")
    os.rename(train / "tmp", train / "green")
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["top1"] == 0.0  # every red test image now meets "green"
    assert len(set((tmp_path / "cache" / "features").iterdir()) - entries) == 1  # the train features, recomputed


def test_cache_entry_that_does_not_repeat_its_key_is_recomputed(tmp_path) -> None:
    from pirl.eval.features import extract_features_cached

    class Trunk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return x.flatten(1)[:, :3] * self.w

    data = torch.utils.data.TensorDataset(torch.rand(6, 3, 2, 2), torch.tensor([0, 1, 0, 1, 0, 1]))
    trunk = Trunk()
    f1, _ = extract_features_cached(trunk, data, cache_dir=tmp_path, key_parts={"k": 1}, device="cpu")
    (path,) = tmp_path.glob("*/features.pt")
    torch.save(
        {"key": "someone else's", "features": torch.zeros(6, 3), "labels": torch.zeros(6, dtype=torch.long)}, path
    )
    calls = trunk.calls
    f2, _ = extract_features_cached(trunk, data, cache_dir=tmp_path, key_parts={"k": 1}, device="cpu")
    assert trunk.calls > calls and torch.equal(f1, f2)
    with torch.no_grad():  # new weights, same everything else: a new entry
        trunk.w.fill_(2.0)
    f3, _ = extract_features_cached(trunk, data, cache_dir=tmp_path, key_parts={"k": 1}, device="cpu")
    assert torch.allclose(f3, 2 * f1) and len(list(tmp_path.glob("*/features.pt"))) == 2


# --------------------------------------------------------------------------- the report


def _run(root: Path) -> Path:
    (root / "eval").mkdir(parents=True)
    (root / "metrics.jsonl").write_text('{"kind": "train", "global_step": 1, "loss": 1.0}\n')
    return root


def test_report_embeds_nothing_from_outside_the_run_and_never_blocks(tmp_path, capsys) -> None:
    run = _run(tmp_path / "run")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n" + b"private" * 10)
    (run / "eval" / "stolen.png").symlink_to(secret)
    os.mkfifo(run / "eval" / "pipe.png")  # opening it for reading would wait for a writer forever
    (run / "config.json").symlink_to("/dev/zero")  # reading it whole would exhaust memory
    loaded = load_run(run)
    assert loaded.images == [] and loaded.config == {}
    notes = "\n".join(loaded.notes)
    assert "eval/stolen.png: links outside" in notes and "eval/pipe.png: not a regular file" in notes
    assert "config.json: links outside" in notes
    code, out, err = _cli(capsys, "report", run, "--out", tmp_path / "page.html")
    assert code == 0, err
    assert "private" not in (tmp_path / "page.html").read_text()


def test_report_size_cap_and_link_inside_the_run(tmp_path, monkeypatch) -> None:
    import pirl.eval.report as report

    run = _run(tmp_path / "run")
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
    (run / "eval" / "a.png").write_bytes(png)
    (run / "eval" / "alias.png").symlink_to("a.png")  # a link that stays inside the run is fine
    (run / "eval" / "big.png").write_bytes(png + b"\0" * 1000)
    monkeypatch.setattr(report, "MAX_EMBED_BYTES", 500)
    loaded = load_run(run)
    assert [name for name, _ in loaded.images] == ["eval/a.png", "eval/alias.png"]
    assert any(n.startswith("eval/big.png: larger than the 500-byte limit") for n in loaded.notes)


def test_report_title_and_run_names_with_dollars(tmp_path, capsys) -> None:
    runs = []
    for name in ("plain", "r$\\frac{$"):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text(
            "".join(
                json.dumps({"kind": "train", "global_step": s, "loss": 1 / s, "loss_mean": 1 / s}) + "\n"
                for s in (1, 2, 3)
            )
        )
        runs.append(run)
    code, out, err = _cli(capsys, "report", *runs, "--title", "$\\frac{$ cost $5", "--out", tmp_path / "r.html")
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert "<h1>$\\frac{$ cost $5</h1>" in page and "r$\\frac{$" in page


# --------------------------------------------------------------------------- writes in a run folder


def test_safe_io_replaces_or_refuses_links(tmp_path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "out" / "config.json"
    link.parent.mkdir()
    link.symlink_to(victim)
    atomic_write_text(link, "{}")
    assert victim.read_text() == "keep me" and not link.is_symlink() and link.read_text() == "{}"
    (tmp_path / "out" / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(PirlError, match="symbolic link; refusing to write through it"):
        open_append(tmp_path / "out" / "metrics.jsonl")
    with pytest.raises(PirlError, match="links outside"):
        read_regular(tmp_path / "out" / "metrics.jsonl", 100, root=tmp_path / "out")
    assert victim.read_text() == "keep me"


def test_training_into_a_folder_with_planted_links_writes_nothing_outside(tmp_path, capsys) -> None:
    data = _colour_folder(tmp_path / "data", {"a": 0, "b": 1}, per_class=8)
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (run / "config.json").symlink_to(victim)
    # a folder holding a config.json is another run's: refused, and nothing is written through the link
    code, out, err = _cli(capsys, "train", "--data", data, "--out", run, *TINY, "optim.epochs=1")
    assert code == 2 and "already holds a run" in err and victim.read_text() == "keep me"
    # --overwrite moves the link aside (the link itself, not its target) and writes a real file
    code, out, err = _cli(capsys, "train", "--data", data, "--out", run, *TINY, "optim.epochs=1", "--overwrite")
    assert code == 0, err
    assert victim.read_text() == "keep me" and not (run / "config.json").is_symlink()
    assert json.loads((run / "config.json").read_text())["num_samples"] == 16
    # a metrics.jsonl link is refused with one line before anything is written through it
    run2 = tmp_path / "run2"
    run2.mkdir()
    (run2 / "metrics.jsonl").symlink_to(victim)
    code, out, err = _cli(capsys, "train", "--data", data, "--out", run2, *TINY, "optim.epochs=1")
    assert code == 2 and err.count("\n") == 1 and "metrics.jsonl is a symbolic link" in err
    assert victim.read_text() == "keep me"


def test_eval_outputs_replace_planted_links(tmp_path, capsys) -> None:
    data = _colour_folder(tmp_path / "data", {"a": 0, "b": 1}, per_class=4)
    model = _export(tmp_path / "export")
    out = tmp_path / "out"
    out.mkdir()
    victims = {}
    for name in ("knn-pool.json", "retrieval-pool.png"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("keep me")
        (out / name).symlink_to(victims[name])
    for kind, extra in (("knn", []), ("retrieval", ["--queries", "2", "--k", "2"])):
        code, _, err = _cli(
            capsys,
            "eval",
            kind,
            "--model",
            model,
            "--data",
            data,
            "--val-data",
            data,
            "--workers",
            "0",
            "--out",
            out,
            *extra,
        )
        assert code == 0, err
    assert all(v.read_text() == "keep me" for v in victims.values())
    assert json.loads((out / "knn-pool.json").read_text())["eval"] == "knn"
    assert (out / "retrieval-pool.png").read_bytes().startswith(b"\x89PNG")


# --------------------------------------------------------------------------- one line, not a traceback


def test_folder_nested_deeper_than_the_recursion_limit(tmp_path) -> None:
    import sys

    depth = sys.getrecursionlimit() + 200
    deep = tmp_path / "data"
    deep.mkdir()
    Image.new("RGB", (4, 4)).save(deep / "top.png")  # so the scan starts at the top, not at the deepest folder
    for _ in range(depth):  # os.makedirs itself recurses once per level
        deep = deep / "d"
        deep.mkdir()
    Image.new("RGB", (4, 4)).save(deep / "x.png")
    try:
        source = open_source(tmp_path / "data")
        assert len(source) == 2 and source.labels is None and source.path(1).endswith(os.sep + "x.png")
    finally:  # bottom up: shutil.rmtree (and so pytest's clean-up) recurses once per level before Python 3.12
        (deep / "x.png").unlink()
        (tmp_path / "data" / "top.png").unlink()
        while deep != tmp_path:
            deep.rmdir()
            deep = deep.parent


def test_undecodable_image_with_a_non_utf8_name_is_listed(tmp_path, capsys) -> None:
    data = _colour_folder(tmp_path / "data", {"a": 0, "b": 1}, per_class=8)
    odd = os.fsencode(str(data / "a")) + b"/bad-\xff.png"
    with open(odd, "wb") as fh:
        fh.write(b"not an image")
    run = tmp_path / "run"
    code, out, err = _cli(
        capsys, "train", "--data", data, "--out", run, *TINY, "optim.epochs=1", "data.max_bad_fraction=0.2"
    )
    assert code == 0, err
    assert "skipped 1 undecodable image(s), e.g. " in out and "bad-\\xff.png" in out
    assert (run / "bad_images.txt").read_bytes().strip() == odd


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"arch": "resnet18", "stem": "imagenet", "mean": MEAN, "std": STD}, "malformed pirl export (no input_size)"),
        (
            {"arch": "resnet18", "stem": "imagenet", "input_size": 16, "mean": [1], "std": STD},
            "malformed pirl export (mean is not three numbers)",
        ),
        ([1, 2], "malformed pirl export (config.json is not a JSON object)"),
        ("{not json", "not readable JSON"),
    ],
)
def test_malformed_export_is_one_line(tmp_path, capsys, meta, message) -> None:
    data = _colour_folder(tmp_path / "data", {"a": 0, "b": 1}, per_class=2)
    model = _export(tmp_path / "export")
    (model / "config.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    code, out, err = _cli(capsys, "eval", "knn", "--model", model, "--data", data, "--workers", "0")
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"method": {}, "epoch": 0, "step": 0}, "malformed pirl checkpoint (no 'config' dict)"),
        (
            {"config": {"model": {"arch": "resnet18"}}, "method": {}, "epoch": 0, "step": 0},
            "malformed pirl checkpoint (no model.stem in its config)",
        ),
        ({"config": {}, "method": {"w": 1}, "epoch": 0, "step": 0}, "not a mapping of names to tensors"),
    ],
)
def test_malformed_checkpoint_is_one_line(tmp_path, capsys, state, message) -> None:
    data = _colour_folder(tmp_path / "data", {"a": 0, "b": 1}, per_class=2)
    ckpt = tmp_path / "checkpoint-e0001-s0000000.pt"
    torch.save({"format": CHECKPOINT_FORMAT, **state}, ckpt)
    for args in (
        ["eval", "knn", "--model", ckpt, "--data", data, "--workers", "0"],
        ["export", ckpt, "--out", tmp_path / "x"],
    ):
        code, out, err = _cli(capsys, *args)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_checkpoint_whose_trunk_does_not_fit_is_one_line(tmp_path, capsys) -> None:
    from helpers import tiny_config
    from pirl.config import config_to_dict

    data = _colour_folder(tmp_path / "data", {"a": 0, "b": 1}, per_class=2)
    ckpt = tmp_path / "checkpoint-e0001-s0000000.pt"
    state = {
        "config": config_to_dict(tiny_config()),
        "method": {"encoder.trunk.conv1.weight": torch.zeros(1)},
        "epoch": 1,
        "step": 0,
    }
    torch.save({"format": CHECKPOINT_FORMAT, **state}, ckpt)
    code, out, err = _cli(capsys, "eval", "knn", "--model", ckpt, "--data", data, "--workers", "0")
    assert code == 2 and err.count("\n") == 1 and "trunk weights do not fit resnet18" in err, err
