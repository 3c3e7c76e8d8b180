"""Nothing lost, nothing unsafe: signals, kill -9, non-finite losses, bad images, untrusted files, lost peers."""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, random_source, tiny_config
from pirl.checkpoint import (
    CHECKPOINT_FORMAT,
    export,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from pirl.cli import main
from pirl.data.images import load_rgb
from pirl.errors import PirlError
from pirl.methods.pirl import PIRL
from pirl.train import RunLog, train

# One torch thread: these runs are tiny, and two threads spin badly when the cores are shared.
FAST = [*TINY, "train.threads=1"]


@pytest.fixture(autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _pngs(root: Path, n: int, size: int = 16, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    return root


def _epoch_step(path: Path) -> tuple[int, int]:
    """(completed epochs, steps into the next one) from a checkpoint's name."""
    name = path.name  # checkpoint-e0001-s0000003.pt
    return int(name[12:16]), int(name[18:25])


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _wait(proc: subprocess.Popen, ready, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _popen(args: list, log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "w") as fh:  # a file, not a pipe: a full pipe would stall the run
        # SIGINT as in a terminal, even when the test runner itself was started in the background
        return subprocess.Popen(
            [str(a) for a in args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# --------------------------------------------------------------------------- signals


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_mid_epoch_checkpoint_and_resume_finishes(tmp_path, capsys, sig, code):
    data, run = _pngs(tmp_path / "images", 96), tmp_path / "run"  # 12 steps per epoch
    proc = _popen([sys.executable, "-m", "pirl", "train", "--data", data, "--out", run, *FAST], tmp_path / "log")
    _wait(proc, lambda: '"kind": "train"' in _text(run / "metrics.jsonl"), "the first step")
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code, (tmp_path / "log").read_text()[-2000:]
    log = (tmp_path / "log").read_text()
    assert f"stopped by {sig.name}" in log and "--resume" in log and "Traceback" not in log
    ckpts = list_checkpoints(run)
    assert len(ckpts) == 1 and _epoch_step(ckpts[0])[0] == 0 and 0 < _epoch_step(ckpts[0])[1] < 12
    state = load_checkpoint(ckpts[0])
    assert state["global_step"] == _epoch_step(ckpts[0])[1]
    summary = next(json.loads(line) for line in log.splitlines() if line.startswith('{"epochs"'))
    assert summary["stopped"] == sig.name and summary["checkpoint"] == str(ckpts[0])
    if sig == signal.SIGTERM:
        assert main(["train", "--data", str(data), "--out", str(run), "--resume"]) == 0
        assert f"step {_epoch_step(ckpts[0])[1]})" in capsys.readouterr().out
        assert [r["epoch"] for r in _metrics(run) if r["kind"] == "epoch"] == [1, 2]
        assert _epoch_step(list_checkpoints(run)[-1]) == (2, 0)


# --------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_is_bit_identical(tmp_path):
    data = _pngs(tmp_path / "images", 48)  # 6 steps per epoch
    opts = [*FAST, "optim.epochs=3", "train.checkpoint_every_steps=1"]
    run = tmp_path / "killed"
    proc = _popen([sys.executable, "-m", "pirl", "train", "--data", data, "--out", run, *opts], tmp_path / "log")
    _wait(proc, lambda: any(_epoch_step(p) >= (0, 3) for p in list_checkpoints(run)), "a mid-epoch checkpoint")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    resumed_from = latest_checkpoint(run)
    assert resumed_from is not None and _epoch_step(resumed_from) < (3, 0)

    train(tiny_config(*opts[len(TINY) :]), str(data), run, resume=True, progress=False)
    train(tiny_config(*opts[len(TINY) :]), str(data), tmp_path / "uninterrupted", progress=False)
    got = load_checkpoint(latest_checkpoint(run))["method"]
    want = load_checkpoint(latest_checkpoint(tmp_path / "uninterrupted"))["method"]
    assert got.keys() == want.keys() and "bank.memory" in got
    for key in want:  # bit-identical (log_z stays NaN under InfoNCE)
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, equal_nan=True, msg=key)
    # the steps the killed run logged past its checkpoint were redone, and each is listed once
    losses = [(r["global_step"], r["loss"]) for r in _metrics(run) if r["kind"] == "train"]
    assert losses == [
        (r["global_step"], r["loss"]) for r in _metrics(tmp_path / "uninterrupted") if r["kind"] == "train"
    ]


def test_resumed_log_drops_the_steps_a_crashed_run_will_redo(tmp_path):
    rows = [json.dumps({"kind": "train", "global_step": g, "loss": 1.0}) for g in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"kind": "tra')  # killed mid-line
    log = RunLog(tmp_path, True, resumed_step=3)
    log.record("train", 4, {"loss": 2.0})
    log.close()
    assert [(r["global_step"], r["loss"]) for r in _metrics(tmp_path)] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0)]


def test_latest_checkpoint_skips_a_truncated_newest_and_stray_tmp(tmp_path, recwarn):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, {"w": torch.full((1000,), float(step))}, 0, step, keep=5)
    newest = list_checkpoints(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # as if the disk lost its tail
    (tmp_path / ".checkpoint-e0000-s0000004.pt.x1y2.tmp").write_bytes(b"PK\x03\x04 half written")
    found = latest_checkpoint(tmp_path)
    assert found is not None and found.name == "checkpoint-e0000-s0000002.pt"
    assert load_checkpoint(found)["w"][0] == 2.0
    assert any("skipping damaged checkpoint" in str(w.message) for w in recwarn)
    # a resumed run saves with keep=1: its fresh checkpoint survives even though the damaged one sorts later
    fresh = save_checkpoint(tmp_path, {"w": torch.zeros(3)}, 0, 2, keep=1)
    assert fresh.is_file() and list_checkpoints(tmp_path) == [fresh]


# --------------------------------------------------------------------------- non-finite loss


def _assert_finite(method_state: dict) -> None:
    for key, value in method_state.items():
        if key != "criterion.log_z":  # NaN until an NCE form estimates it
            assert torch.isfinite(value).all(), key


def _poison(monkeypatch, at_step: int) -> None:
    original = PIRL.training_step

    def training_step(self, batch, step, encoder=None):
        out = original(self, batch, step, encoder)
        if step == at_step:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(PIRL, "training_step", training_step)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, at_step=2)
    cfg = tiny_config("optim.epochs=1", "train.checkpoint_every_steps=1", "train.threads=1")
    with pytest.raises(PirlError, match=r"loss is nan at epoch 1, step 3 .*checkpoint-e0000-s0000002\.pt"):
        train(cfg, random_source(32), tmp_path, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "checkpoint-e0000-s0000002.pt"
    state = load_checkpoint(latest_checkpoint(tmp_path))
    _assert_finite(state["method"])


def test_nonfinite_loss_skip_continues(tmp_path, monkeypatch):
    _poison(monkeypatch, at_step=2)
    with pytest.warns(UserWarning, match="step 3 .*batch skipped"):
        summary = train(
            tiny_config("optim.epochs=1", "train.nonfinite=skip", "train.threads=1"),
            random_source(32),
            tmp_path,
            progress=False,
        )
    assert np.isfinite(summary["loss"]) and summary["checkpoint"].endswith("checkpoint-e0001-s0000000.pt")
    assert [r["step"] for r in _metrics(tmp_path) if r["kind"] == "train"] == [1, 2, 4]
    state = load_checkpoint(summary["checkpoint"])
    _assert_finite(state["method"])


# --------------------------------------------------------------------------- bad images


def _jpeg(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def _messy_folder(root: Path) -> tuple[Path, set[str]]:
    """20 decodable images of every awkward kind and 4 undecodable files (24: three batches of 8)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    good = {
        "gray.jpg": _jpeg(rgb.convert("L")),
        "cmyk.jpg": _jpeg(rgb.convert("CMYK")),
        "large.jpg": _jpeg(Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8))),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    good["exif_rotated.jpg"] = _jpeg(rgb, exif=exif.tobytes())
    for name, img in {
        "rgba.png": rgb.convert("RGBA"),
        "palette.png": rgb.convert("P"),
        "sixteen_bit.png": Image.fromarray((rng.integers(0, 65536, (30, 30))).astype(np.uint16)),
        "tiny.png": rgb.resize((3, 2)),  # far below the 15-pixel jigsaw crop
        "one_bit.png": rgb.convert("1"),
    }.items():
        img.save(root / name)
    for name, payload in good.items():
        (root / name).write_bytes(payload)
    _pngs(root, 11, seed=2)
    whole = _jpeg(rgb)
    bad = {
        "truncated.jpg": whole[: len(whole) // 2],
        "corrupt.jpg": whole[:20] + bytes(rng.integers(0, 256, 2000, dtype=np.uint8)),
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n",
    }
    for name, payload in bad.items():
        (root / name).write_bytes(payload)
    return root, set(bad)


def test_awkward_images_decode_as_expected(tmp_path):
    root, _ = _messy_folder(tmp_path / "images")
    assert load_rgb(root / "exif_rotated.jpg").size == (40, 60)  # EXIF applied: stored 60 x 40
    for name in ("gray.jpg", "cmyk.jpg", "rgba.png", "palette.png", "sixteen_bit.png", "tiny.png", "one_bit.png"):
        assert load_rgb(root / name).mode == "RGB", name


def test_bad_images_are_skipped_counted_and_listed(tmp_path, capsys):
    root, bad = _messy_folder(tmp_path / "images")
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(root),
                "--out",
                str(run),
                *FAST,
                "optim.epochs=1",
                "data.workers=1",
                "data.max_bad_fraction=0.2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    summary = [line for line in out if line.startswith("skipped ")]
    assert len(summary) == 1 and summary[0].startswith("skipped 4 undecodable image(s)")
    assert "bad_images.txt" in summary[0]
    assert {Path(p).name for p in (run / "bad_images.txt").read_text().split()} == bad
    assert json.loads(out[-1])["bad_images"] == 4
    assert [r["bad_images"] for r in _metrics(run) if r["kind"] == "epoch"] == [4]


def test_too_many_bad_images_stop_with_one_line(tmp_path, capsys):
    root, bad = _messy_folder(tmp_path / "images")
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(run), *FAST]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    assert "could not be decoded" in line and "data.max_bad_fraction=0.01" in line and "bad_images.txt" in line
    assert {Path(p).name for p in (run / "bad_images.txt").read_text().split()} <= bad


def test_a_run_of_bad_files_in_a_worker_is_one_line(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(24):
        (root / f"broken{i:02d}.jpg").write_bytes(b"" if i % 2 else b"not a jpeg")
    # a subprocess: the real stderr, and no wait for PyTorch to reap a worker that raised
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pirl",
            "train",
            "--data",
            str(root),
            "--out",
            str(tmp_path / "run"),
            *FAST,
            "data.workers=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    err = result.stderr
    assert "Traceback" not in err and "DataLoader worker" not in err
    (line,) = _error_lines(err)
    assert "broken" in line and ("empty file" in line or "not an image" in line)


# --------------------------------------------------------------------------- untrusted files


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_malicious_checkpoint_is_refused(tmp_path, capsys, legacy, recwarn):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    evil = run / "checkpoint-e0001-s0000000.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "method": _Evil(marker)}, evil, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(PirlError, match="not a loadable pirl checkpoint"):
        load_checkpoint(evil)
    assert latest_checkpoint(run) is None  # a resume would start afresh rather than run it
    assert main(["export", str(evil), "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    with pytest.raises(PirlError):
        export(run, tmp_path / "exp")
    assert not marker.exists() and not (tmp_path / "exp").exists()
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load would have run it
    assert marker.exists()


def test_archive_escaping_its_folder_is_refused_by_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PIRL_CACHE_DIR", str(tmp_path / "box" / "cache"))
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        for name in ("images/ok.png", "../../escaped.png", "/tmp/pirl-absolute-escape.png"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(evil), "--out", str(run), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to extract archive member" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["box", "evil.tar.gz"]  # no run directory either
    assert list((tmp_path / "box").iterdir()) == [tmp_path / "box" / "cache"]
    assert not any((tmp_path / "box" / "cache").iterdir())
    assert not Path("/tmp/pirl-absolute-escape.png").exists()


# --------------------------------------------------------------------------- torchrun


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)


def _worker(launcher: subprocess.Popen, rank: int) -> int:
    found: list[int] = []

    def ready() -> bool:
        found[:] = [p for p in _children(launcher.pid) if _rank_of(p) == rank]
        return bool(found)

    _wait(launcher, ready, f"the rank-{rank} worker")
    return found[0]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_torchrun_two_processes_stop_together_and_survive_a_lost_peer(tmp_path):
    data, run = _pngs(tmp_path / "images", 96), tmp_path / "run"  # 12 global steps per epoch
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pirl",
        "train",
        "--data",
        data,
        "--out",
        run,
    ]
    env = {"OMP_NUM_THREADS": "1"}
    # A plain two-process run; SIGTERM to one worker stops both at the same step with one checkpoint.
    proc = _popen([*launch, *FAST, "optim.epochs=3"], tmp_path / "log1", env)
    _wait(proc, lambda: any(_epoch_step(p) == (1, 0) for p in list_checkpoints(run)), "the first epoch")
    os.kill(_worker(proc, 1), signal.SIGTERM)
    # each worker saved, then exited 143 (stopped before the last epoch): torchrun reports a failure
    assert proc.wait(timeout=120) != 0, (tmp_path / "log1").read_text()[-3000:]
    stop = list_checkpoints(run)[-1]
    assert _epoch_step(stop)[0] == 1 and 0 < _epoch_step(stop)[1] < 12
    assert "stopped by SIGTERM" in (tmp_path / "log1").read_text()
    steps = [r["global_step"] for r in _metrics(run) if r["kind"] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == load_checkpoint(stop)["global_step"]

    # Resume, then lose a worker for good: the job ends, non-zero and soon, with a loadable checkpoint.
    proc = _popen([*launch, "--resume", "train.checkpoint_every_steps=1"], tmp_path / "log2", env)
    _wait(proc, lambda: _epoch_step(list_checkpoints(run)[-1]) > _epoch_step(stop), "a checkpoint after resuming")
    os.kill(_worker(proc, 1), signal.SIGKILL)
    start = time.monotonic()
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("torchrun did not end within 60 s of losing a worker")
    assert rc != 0 and time.monotonic() - start < 60
    last = latest_checkpoint(run)
    assert last is not None and _epoch_step(last) > _epoch_step(stop)
    load_checkpoint(last)
