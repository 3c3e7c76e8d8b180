"""Resume on the default per-sample pipeline (views made in a DataLoader worker, not batched), with undecodable
files in an ImageFolder: a run stopped by SIGTERM mid-epoch and resumed ends bit-identical to an uninterrupted
run, keeps the count and list of undecodable images, and never writes their bank rows (each replacement writes
its own row).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_config
from pirl.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from pirl.train import train
from pirl.training.step import TrainStep

# 24 files, 4 of them undecodable: 3 steps of 8 per epoch, 2 epochs; the stop comes after the 4th step
OPTS = [
    "data.batched_views=false",
    "data.workers=1",
    "optim.epochs=2",
    "data.max_bad_fraction=0.2",
    "train.keep_checkpoints=10",
    "train.knn_every=0",
]
BAD = {
    "a/03_truncated.png": "truncated",
    "a/07_empty.jpg": "empty",
    "b/02_text.jpg": "text",
    "b/09_corrupt.jpg": "corrupt",
}
STOP_AFTER = 4


@pytest.fixture(autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _image_folder(root: Path) -> Path:
    """Two class folders of 12 files each: 20 decodable images of varied shapes and the 4 files of BAD."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            if f"{cls}/{i:02d}" in {name[:4] for name in BAD}:
                continue
            h, w = (16, 20) if i % 2 else (24, 16)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i:02d}.png")
    png = (root / "a" / "00.png").read_bytes()
    payloads = {
        "truncated": png[: len(png) // 2],
        "empty": b"",
        "text": b"not an image\n",
        "corrupt": png[:20] + bytes(rng.integers(0, 256, 300, dtype=np.uint8)),
    }
    for name, kind in BAD.items():
        (root / name).write_bytes(payloads[kind])
    return root


def _bad_rows(root: Path) -> list[int]:
    """Bank rows of the undecodable files: positions in the sorted file list, as the folder source orders it."""
    files = sorted(f"{p.parent.name}/{p.name}" for p in root.glob("*/*"))
    assert len(files) == 24
    return [files.index(name) for name in sorted(BAD)]


def _train_records(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["global_step"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_sigterm_mid_epoch_and_resume_on_the_per_sample_pipeline_is_bit_identical(tmp_path, monkeypatch):
    data = str(_image_folder(tmp_path / "images"))
    cfg = lambda: tiny_config(*OPTS)  # noqa: E731  (train adapts its config: a fresh one per run)
    full = train(cfg(), data, tmp_path / "full", progress=False)
    assert full["complete"] and full["bad_images"] == 4

    run_step = TrainStep.run

    def stop_after(self, batch, global_step, *args, **kwargs):
        result = run_step(self, batch, global_step, *args, **kwargs)
        if global_step + 1 == STOP_AFTER:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler notes it; the run stops after this step
        return result

    with monkeypatch.context() as patch:
        patch.setattr(TrainStep, "run", stop_after)
        stopped = train(cfg(), data, tmp_path / "split", progress=False)
    assert stopped["stopped"] == "SIGTERM" and not stopped["complete"]
    interrupted = load_checkpoint(latest_checkpoint(tmp_path / "split"))
    assert (interrupted["epoch"], interrupted["step"], interrupted["global_step"]) == (1, 1, STOP_AFTER)
    assert len(interrupted["bad_images"]) == 4

    resumed = train(cfg(), data, tmp_path / "split", resume=True, progress=False)
    assert resumed["complete"] and resumed["bad_images"] == 4  # the ones met before the stop still count

    want, got = (
        load_checkpoint(latest_checkpoint(tmp_path / "full")),
        load_checkpoint(latest_checkpoint(tmp_path / "split")),
    )
    assert got["method"].keys() == want["method"].keys() and "bank.memory" in got["method"]
    for key in want["method"]:  # trunk, heads, bank, BatchNorm statistics: bit-identical
        torch.testing.assert_close(got["method"][key], want["method"][key], rtol=0, atol=0, equal_nan=True, msg=key)
    torch.testing.assert_close(got["optimizer"], want["optimizer"], rtol=0, atol=0)
    assert got["bad_images"] == want["bad_images"] == _bad_rows(tmp_path / "images")
    assert _train_records(tmp_path / "split") == _train_records(tmp_path / "full")
    listed = {"/".join(Path(p).parts[-2:]) for p in (tmp_path / "split" / "bad_images.txt").read_text().split()}
    assert listed == set(BAD)

    # the bank rows of undecodable files are never written; every other row is, in every epoch
    epoch_one = load_checkpoint(
        next(p for p in list_checkpoints(tmp_path / "split") if p.name == "checkpoint-e0001-s0000000.pt")
    )["method"]["bank.memory"]
    final = got["method"]["bank.memory"]
    bad = _bad_rows(tmp_path / "images")
    good = [i for i in range(24) if i not in bad]
    assert torch.equal(final[bad], epoch_one[bad])
    assert not (final[good] == epoch_one[good]).all(dim=1).any()
