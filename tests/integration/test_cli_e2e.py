"""The command-line contract end to end, on a tiny folder of images: train, resume, export, evaluate."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from helpers import TINY


def _folder(root, classes=2, per_class=12, size=16):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            arr[..., c] = 255  # classes differ in colour, so kNN has something to find
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")
    return root


def _pirl(*args):
    result = subprocess.run(
        [sys.executable, "-m", "pirl", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_train_resume_export_eval(tmp_path):
    data = _folder(tmp_path / "images")
    run = tmp_path / "run"
    _pirl("train", "--data", data, "--out", run, "--epochs", "1", *TINY)
    _pirl("train", "--data", data, "--out", run, "--resume", "--epochs", "2")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["epoch"] for r in rows if r["kind"] == "epoch") == 2
    _pirl("export", run, "--out", tmp_path / "exp")
    assert (tmp_path / "exp" / "model.safetensors").is_file()
    result = _pirl("eval", "knn", "--model", tmp_path / "exp", "--data", data, "--val-data", data)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["eval"] == "knn" and 0.0 <= summary["top1"] <= 1.0
    assert summary["top1_k20"] > 0.9  # the colour cue is trivial for features of the same images
