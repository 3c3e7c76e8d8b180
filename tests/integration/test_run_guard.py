"""A reused run folder, two runs on one folder, a failed checkpoint write, exit statuses, bounded caches."""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pirl.checkpoint as checkpoint_module
from helpers import TINY, random_source, tiny_config
from pirl.cache import clear_cache, entries, make_temp_dir, used
from pirl.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from pirl.cli import main
from pirl.data.archive import extract_archive
from pirl.errors import PirlError, WriteError
from pirl.run_dir import LOCK_NAME, RunLock
from pirl.train import train


@pytest.fixture(autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _pngs(root: Path, n: int = 32) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    return root


def _run(run: Path, *overrides: str, n: int = 32, **kwargs) -> dict:
    return train(tiny_config(*overrides), random_source(n), run, progress=False, **kwargs)


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- a reused run folder


def test_a_second_run_into_a_used_folder_is_refused_and_the_old_run_is_untouched(tmp_path, capsys):
    data, run = _pngs(tmp_path / "images"), tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *TINY, "optim.epochs=2"]) == 0
    before = {p.name: p.read_bytes() for p in list_checkpoints(run)}
    config_before = (run / "config.json").read_text()
    capsys.readouterr()
    # the silent hazard: a fresh, shorter run beside the old one would leave the old epoch-2 checkpoint newest
    assert main(["train", "--data", str(data), "--out", str(run), *TINY, "optim.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert len(_errors(err)) == 1 and "already holds a run" in err and "--overwrite" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in list_checkpoints(run)} == before
    assert (run / "config.json").read_text() == config_before and not (run / LOCK_NAME).exists()


def test_a_folder_with_only_a_config_json_is_refused_too(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    with pytest.raises(PirlError, match="already holds a run"):
        _run(run, "optim.epochs=1")


def test_overwrite_moves_the_earlier_run_aside_and_the_new_run_is_the_one_used(tmp_path):
    run = tmp_path / "run"
    _run(run, "optim.epochs=2")
    old = {p.name: p.read_bytes() for p in list_checkpoints(run)}
    _run(run, "optim.epochs=1", "train.seed=1", overwrite=True)
    aside = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1
    assert {p.name: p.read_bytes() for p in list_checkpoints(aside[0])} == old
    assert (aside[0] / "config.json").is_file() and (aside[0] / "metrics.jsonl").is_file()
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-e0001-s0000000.pt"]
    assert load_checkpoint(latest_checkpoint(run))["config"]["train"]["seed"] == 1
    assert json.loads((run / "config.json").read_text())["config"]["train"]["seed"] == 1
    with pytest.raises(PirlError, match="contradict"):
        _run(run, resume=True, overwrite=True)


def test_resume_refuses_a_changed_model_or_data_key_and_names_it(tmp_path):
    run = tmp_path / "run"
    _run(run, "optim.epochs=1")
    with pytest.raises(PirlError) as info:
        _run(run, "optim.epochs=2", "model.embed_dim=32", "data.image_size=12", resume=True)
    message = str(info.value)
    assert "model.embed_dim (16 -> 32)" in message and "data.image_size (16 -> 12)" in message
    assert "optim.epochs" not in message and "\n" not in message
    with pytest.raises(PirlError, match=r"dataset size \(32 -> 40\)"):
        _run(run, "optim.epochs=2", n=40, resume=True)
    with pytest.raises(PirlError, match="loss.method"):
        _run(run, "optim.epochs=2", "loss.method=npid", resume=True)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-e0001-s0000000.pt"]


def test_resume_allows_epochs_logging_and_workers_and_records_them(tmp_path):
    run = tmp_path / "run"
    _run(run, "optim.epochs=1")
    summary = _run(run, "optim.epochs=2", "train.log_every=3", "data.workers=0", resume=True)
    assert summary["complete"] and Path(summary["checkpoint"]).name == "checkpoint-e0002-s0000000.pt"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r["kind"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["global_step"] == 4
    assert resumed[0]["changes"] == {"optim.epochs": [1, 2], "train.log_every": [1, 3]}


# --------------------------------------------------------------------------- two processes, one folder


def test_a_second_process_on_the_same_folder_stops_at_once(tmp_path, capsys):
    data, run = _pngs(tmp_path / "images"), tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from pirl.run_dir import RunLock; RunLock(Path(sys.argv[1])).acquire(); "
            "print('held', flush=True); time.sleep(60)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        run.mkdir()
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", "--data", str(data), "--out", str(run), *TINY, "optim.epochs=1"]) == 2
        err = capsys.readouterr().err
        assert _errors(err) == [
            f"error: {run} is in use by pirl train (process {holder.pid} on "
            f"{socket.gethostname()}); wait for it, or delete {run / LOCK_NAME} if that "
            "process is gone"
        ]
        assert list_checkpoints(run) == [] and not (run / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    summary = _run(run, "optim.epochs=1")
    assert summary["complete"] and not (run / LOCK_NAME).exists()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".lock")) == []


def test_a_lock_from_another_host_or_a_live_process_is_respected(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere.example"}))
    with pytest.raises(PirlError, match="on elsewhere.example"):
        RunLock(run).acquire()
    (run / LOCK_NAME).unlink()
    with RunLock(run):
        assert json.loads((run / LOCK_NAME).read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(PirlError, match=f"process {os.getpid()}"):
            RunLock(run).acquire()
    assert not (run / LOCK_NAME).exists()


def test_the_lock_is_released_when_training_fails(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(PirlError, match="loss is"):
        _run(run, "optim.epochs=1", "optim.base_lr=1e30")
    assert not (run / LOCK_NAME).exists()


# --------------------------------------------------------------------------- a failed checkpoint write


class _FailingFile(io.RawIOBase):
    """A file that takes ``budget`` bytes, writes them to the real file, then fails as a full disk does."""

    def __init__(self, real, budget: int) -> None:
        self.real, self.budget = real, budget

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.budget:
            self.real.write(data[: self.budget])
            self.real.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(data)
        return self.real.write(data)

    def fileno(self) -> int:
        return self.real.fileno()

    def flush(self) -> None:
        self.real.flush()

    def __exit__(self, *exc) -> None:
        self.real.close()


def _fail_writes_after(monkeypatch, good_writes: int) -> None:
    """Checkpoint files after the first ``good_writes`` fail mid-file; every other file (images, logs) is left
    alone: only the checkpoint module sees the failing ``os.fdopen``."""
    real_fdopen, calls = os.fdopen, [0]

    def fdopen(fd, *args, **kwargs):
        calls[0] += 1
        real = real_fdopen(fd, *args, **kwargs)
        return real if calls[0] <= good_writes else _FailingFile(real, 1000)

    class _CheckpointOs:
        def __getattr__(self, name):
            return fdopen if name == "fdopen" else getattr(os, name)

    monkeypatch.setattr(checkpoint_module, "os", _CheckpointOs())


def test_a_checkpoint_write_that_fails_mid_file_keeps_the_previous_one(tmp_path, monkeypatch):
    state = {"config": {}, "epoch": 0, "weights": torch.arange(100_000, dtype=torch.float32)}
    first = save_checkpoint(tmp_path, state, 1, 0, keep=2)
    _fail_writes_after(monkeypatch, 0)
    with pytest.raises(WriteError) as info:
        save_checkpoint(tmp_path, {**state, "epoch": 2}, 2, 0, keep=1)
    message = str(info.value)
    assert str(tmp_path / "checkpoint-e0002-s0000000.pt") in message and "No space left on device" in message
    assert "it needs 0.4 MB" in message and "MB free" in message and f"{first} is intact" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no temporary file left behind
    assert torch.equal(load_checkpoint(first)["weights"], state["weights"])


def test_a_full_disk_during_training_exits_1_with_one_line(tmp_path, monkeypatch, capsys):
    data, run = _pngs(tmp_path / "images"), tmp_path / "run"
    _fail_writes_after(monkeypatch, 1)  # the first checkpoint (after step 1) is written, the second fails
    code = main(
        ["train", "--data", str(data), "--out", str(run), *TINY, "optim.epochs=1", "train.checkpoint_every_steps=1"]
    )
    err = capsys.readouterr().err
    assert code == 1 and len(_errors(err)) == 1 and "Traceback" not in err, err
    assert f"cannot write checkpoint {run / 'checkpoint-e0000-s0000002.pt'}" in err and "it needs" in err
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-e0000-s0000001.pt"]
    assert load_checkpoint(list_checkpoints(run)[0])["global_step"] == 1
    assert not any(p.name.endswith(".tmp") for p in run.iterdir()) and not (run / LOCK_NAME).exists()


# --------------------------------------------------------------------------- exit statuses


@pytest.mark.parametrize(
    "stopped, complete, code", [("SIGTERM", False, 143), ("SIGINT", False, 130), ("SIGTERM", True, 0), (None, True, 0)]
)
def test_exit_status_of_a_stopped_run(tmp_path, monkeypatch, capsys, stopped, complete, code):
    import pirl.train

    def fake_train(cfg, data, out, **kwargs):
        return {"epochs": 2, "stopped": stopped, "complete": complete, "checkpoint": str(Path(out) / "c.pt")}

    monkeypatch.setattr(pirl.train, "train", fake_train)
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == code


# --------------------------------------------------------------------------- caches


def _entry(path: Path, size: int, age_s: float) -> Path:
    path.mkdir(parents=True)
    (path / "blob").write_bytes(b"x" * size)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def test_the_cache_is_bounded_least_recently_used_first(tmp_path, monkeypatch):
    monkeypatch.setenv("PIRL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PIRL_CACHE_MAX_GB", str(2500 / 1e9))  # 2,500 bytes
    oldest = _entry(tmp_path / "a-1111", 1000, 300)
    middle = _entry(tmp_path / "features" / "f", 1000, 200)
    newer = _entry(tmp_path / "b-2222", 1000, 100)
    dataset = _entry(tmp_path / "datasets" / "cifar10", 5000, 400)
    just_made = _entry(tmp_path / "features" / "g", 1000, 0)
    used(just_made)
    assert not oldest.exists() and not middle.exists()  # 4,000 -> 2,000 bytes
    assert newer.exists() and just_made.exists() and dataset.exists()
    used(newer)  # within the bound: nothing more goes
    assert newer.exists() and just_made.exists()
    monkeypatch.setenv("PIRL_CACHE_MAX_GB", "0")
    used(newer)
    assert newer.exists() and not just_made.exists()  # the entry just used always stays
    monkeypatch.setenv("PIRL_CACHE_MAX_GB", "lots")
    with pytest.raises(PirlError, match="PIRL_CACHE_MAX_GB"):
        used(newer)


def test_pirl_cache_clear_empties_the_caches_but_not_downloaded_datasets(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIRL_CACHE_DIR", str(tmp_path))
    _entry(tmp_path / "a-1111", 1000, 10)
    _entry(tmp_path / "features" / "f", 500, 10)
    _entry(tmp_path / ".tmp-a-1111-abc", 100, 10)
    dataset = _entry(tmp_path / "datasets" / "cifar10", 100, 10)
    assert main(["cache", "clear"]) == 0
    assert capsys.readouterr().out.strip() == f"removed 3 cache entries, 0.0 MB, from {tmp_path}"
    assert entries(tmp_path) == [] and dataset.exists() and not (tmp_path / ".tmp-a-1111-abc").exists()
    assert clear_cache(tmp_path)["entries"] == 0


def test_temporary_folders_of_killed_extractions_are_removed(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    host = socket.gethostname().replace("-", "_")
    dead = cache / f".tmp-x-0123abcd-{host}-{_dead_pid()}-q1w2e3"
    alive = cache / f".tmp-y-0123abcd-{host}-{os.getpid()}-q1w2e3"
    other_host = cache / f".tmp-z-0123abcd-otherhost-{_dead_pid()}-q1w2e3"
    old_unknown = _entry(cache / ".tmp-w-abcdef", 10, 2 * 24 * 3600)
    for folder in (dead, alive, other_host):
        folder.mkdir()
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(_pngs(tmp_path / "images", 2), arcname="images")
    out = extract_archive(archive, cache)
    assert (out / "images" / "img000.png").is_file()
    assert not dead.exists() and not old_unknown.exists() and alive.exists() and other_host.exists()
    made = make_temp_dir(cache, "v")
    assert made.name.startswith(f".tmp-v-{host}-{os.getpid()}-")
