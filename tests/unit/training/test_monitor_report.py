"""The online kNN monitor during pretraining, and ``pirl report``'s offline HTML page."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, random_source, tiny_config
from pirl.checkpoint import latest_checkpoint, load_checkpoint
from pirl.cli import main
from pirl.data.sources import ArraySource, open_source
from pirl.errors import PirlError
from pirl.eval.report import write_report
from pirl.models.trunk import build_trunk
from pirl.train import train
from pirl.training.monitor import KnnMonitor, plan_monitor, start_monitor


def _coloured(n: int = 32, classes: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 128, (n, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(n) % classes
    images[np.arange(n), :, :, labels] = 255  # classes differ in colour: something for kNN to find
    return images, labels


def _folder(root, classes=("a", "b"), per_class=8, seed=0):
    images, labels = _coloured(per_class * len(classes), len(classes), seed)
    for i, (img, label) in enumerate(zip(images, labels)):
        (root / classes[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / classes[label] / f"{i}.png")
    return root


def _records(run, kind):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if json.loads(x)["kind"] == kind]


class _Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, int, dict]] = []

    def record(self, kind, step, values) -> None:
        self.records.append((kind, step, values))


# --------------------------------------------------------------------------- monitor


def test_monitor_logs_every_epoch_and_leaves_training_unchanged(tmp_path, capsys):
    images, labels = _coloured(16)
    source = ArraySource(images, labels)
    train(tiny_config("train.knn_every=0"), source, tmp_path / "off", progress=False)
    assert "kNN monitor" not in capsys.readouterr().out and not _records(tmp_path / "off", "eval")
    train(tiny_config("train.knn_every=1"), source, tmp_path / "on", progress=False)
    out = capsys.readouterr().out
    assert "held-out training images" in out and out.count("kNN monitor, epoch") == 3
    evals = _records(tmp_path / "on", "eval")
    assert [r["epoch"] for r in evals] == [0, 1, 2]  # epoch 0: the random-init trunk, before the first step
    assert all(0 <= r["knn_top1_k20"] <= 1 and 0 <= r["knn_top1_k200"] <= 1 for r in evals)
    assert evals[0]["knn_query_images"] == 3 and evals[0]["knn_memory_images"] == 13  # a 20% held-out slice
    # same RNG stream, same BatchNorm statistics: bit-identical with and without the monitor
    off, on = (load_checkpoint(latest_checkpoint(tmp_path / n))["method"] for n in ("off", "on"))
    for key in off:
        torch.testing.assert_close(off[key], on[key], rtol=0, atol=0, equal_nan=True, msg=key)
    assert [r["loss"] for r in _records(tmp_path / "off", "train")] == [
        r["loss"] for r in _records(tmp_path / "on", "train")
    ]


def test_knn_every_schedule_and_config_checks():
    cfg = tiny_config("optim.epochs=5", "train.knn_every=2")
    monitor = start_monitor(plan_monitor(cfg, random_source(16)), cfg, None, torch.device("cpu"))
    assert [e for e in range(1, 6) if monitor.due(e, 5)] == [2, 4, 5]  # every 2nd epoch, and the last
    for bad in ("train.knn_every=-1", "train.knn_max_images=0"):
        with pytest.raises(PirlError, match=bad.split("=")[0]):
            tiny_config(bad)


def test_query_sets_val_data_then_test_split_then_held_out(tmp_path):
    cfg = tiny_config("train.knn_max_images=5")
    data = tmp_path / "data"
    _folder(data / "train", ("a", "b", "c")), _folder(data / "test", ("a", "b", "c"), seed=1)
    source = open_source(str(data))
    plan = plan_monitor(cfg, source, str(data))
    assert plan.queries is not None and "test-split" in plan.query_name
    monitor = start_monitor(plan, cfg, None, torch.device("cpu"))
    assert len(monitor.memory_idx) == 5 and len(monitor.query_idx) == 5  # knn_max_images caps both
    # --val-data with the classes in another order: labels are matched by class name
    val = _folder(tmp_path / "val", classes=("b", "c"))  # classes 0, 1 of --val-data are 1, 2 of --data
    plan = plan_monitor(cfg, source, str(data), str(val))
    assert plan.query_name == "--val-data images" and plan.label_map == [1, 2]
    with pytest.raises(PirlError, match="classes the training data lacks"):
        plan_monitor(cfg, source, str(data), str(_folder(tmp_path / "other", classes=("a", "z"))))
    # --val-data naming the training images: queries would find themselves in the memory, so it is ignored
    assert plan_monitor(cfg, source, str(data), str(data / "train")).query_name == "test-split images of --data"
    train_only = open_source(str(data / "train"))  # and without a test split: a held-out slice
    assert plan_monitor(cfg, train_only, str(data / "train"), str(data / "train")).queries is None


def test_unlabelled_data_is_off_with_one_line_and_unlabelled_val_data_is_an_error(tmp_path, capsys):
    flat = ArraySource(_coloured(16)[0])  # no labels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(tiny_config("optim.epochs=1"), flat, tmp_path / "r", progress=False)
    out = capsys.readouterr().out
    assert out.count("kNN monitor: off (the training images have no labels") == 1
    assert not _records(tmp_path / "r", "eval")
    with pytest.raises(PirlError, match="--val-data .* has no labels"):
        train(tiny_config(), flat, tmp_path / "r2", val_data=flat, progress=False)
    assert not (tmp_path / "r2").exists()  # checked before the run directory is made
    # unlabelled training images with a labelled --val-data: memory and queries both from --val-data
    val = ArraySource(*_coloured(20))
    plan = plan_monitor(tiny_config(), flat, None, val)
    assert plan.memory is val and plan.queries is None and plan.query_name == "held-out --val-data images"


def test_undecodable_images_are_dropped_not_fatal(tmp_path):
    data = _folder(tmp_path / "data")
    (data / "a" / "broken.png").write_bytes(b"not a png")
    cfg = tiny_config("train.knn_max_images=100")
    source = open_source(str(data))
    monitor = start_monitor(plan_monitor(cfg, source, str(data)), cfg, None, torch.device("cpu"))
    assert isinstance(monitor, KnnMonitor)
    trunk = build_trunk("resnet18", "imagenet").train()
    log = _Log()
    state = torch.get_rng_state()
    values = monitor.run(trunk, 1, 10, log)
    assert trunk.training and torch.equal(state, torch.get_rng_state())  # mode and RNG stream restored
    ((kind, step, record),) = log.records
    assert kind == "eval" and step == 10 and record["knn_top1_k20"] == values["knn_top1_k20"]
    assert record["knn_memory_images"] + record["knn_query_images"] == 16  # 17 files, one broken


def _heartbeat_worker(rank: int, init: str, result_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    cfg = tiny_config()
    source = ArraySource(*_coloured(40))
    monitor = start_monitor(plan_monitor(cfg, source), cfg, None, torch.device("cpu"), rank, 2)
    values = monitor.run(build_trunk("resnet18", "imagenet"), 1, 5, _Log())
    after = torch.tensor([rank + 1.0])
    dist.all_reduce(after)  # both ranks reach the next collective together
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"values": values, "sum": after.item()}, fh)
    dist.destroy_process_group()


def test_distributed_rank0_computes_while_the_others_wait(tmp_path):
    import torch.multiprocessing as mp

    # fork: a spawned process would spend most of the test importing torch again
    mp.start_processes(
        _heartbeat_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, start_method="fork"
    )
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["values"] is not None and r1["values"] is None and r0["sum"] == r1["sum"] == 3.0


def test_cli_train_val_data_then_report(tmp_path, capsys):
    data, val, run = _folder(tmp_path / "data"), _folder(tmp_path / "val", seed=1), tmp_path / "run"
    assert main(["train", "--data", str(data), "--val-data", str(val), "--out", str(run), *TINY, "optim.epochs=1"]) == 0
    assert "16 --val-data images against 16 training images" in capsys.readouterr().out
    baseline, record = _records(run, "eval")  # epoch 0 (random init), epoch 1
    assert (baseline["epoch"], record["epoch"]) == (0, 1)
    assert json.loads((run / "config.json").read_text())["val_data"] == str(val)
    assert record["knn_top1_k20"] > 0.9  # the colour cue survives a random-ish trunk
    html_path = tmp_path / "report.html"
    assert main(["report", str(run), "--out", str(html_path)]) == 0
    html = html_path.read_text()
    assert "online kNN" in html and html.count("data:image/png;base64,") == 1  # the curves


# --------------------------------------------------------------------------- report


def _png_bytes(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _fake_run(root, method, top1, knn_curve):
    root.mkdir(parents=True)
    cfg = tiny_config(f"loss.method={method}")
    from pirl.config import config_to_dict

    (root / "config.json").write_text(
        json.dumps({"data": "cifar10", "num_samples": 2000, "config": config_to_dict(cfg)})
    )
    rows = [
        {
            "kind": "train",
            "global_step": s,
            "epoch": 1 + s // 5,
            "step": s,
            "loss": 6 - s / 10,
            "loss_mean": 6 - s / 10,
            "lr": 0.01,
            "images_per_s": 40.0 + s,
        }
        for s in range(1, 11)
    ]
    rows += [
        {"kind": "eval", "global_step": 5 * e, "epoch": e, "knn_top1_k20": v, "knn_top1_k200": v - 0.01}
        for e, v in enumerate(knn_curve, start=1)
    ]
    (root / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + '\n{"kind": "tra')  # cut short
    (root / "eval").mkdir()
    (root / "eval" / "knn-pool.json").write_text(
        json.dumps(
            {
                "eval": "knn",
                "protocol": "weighted kNN (NPID), cosine, T=0.07",
                "top1": top1,
                "top1_k20": top1 + 0.01,
                "stage": "pool",
                "train_images": 50000,
                "test_images": 10000,
            }
        )
    )
    return root


def test_report_is_self_contained_and_holds_every_number(tmp_path, capsys):
    a = _fake_run(tmp_path / "runs" / "pirl", "pirl", 0.4123, [0.31, 0.35])
    b = _fake_run(tmp_path / "runs" / "npid", "npid", 0.3877, [0.29, 0.30])
    (a / "eval" / "linear-pool.json").write_text(
        json.dumps({"eval": "linear", "protocol": "L-BFGS <logistic> & friends", "top1": 0.5061})
    )
    (b / "lowshot.json").write_text(
        json.dumps(  # a result straight in the run directory
            {"eval": "lowshot", "protocol": "SVM per shot", "top1": 0.2222, "top1_by_shot": {"1": 0.111, "8": 0.2222}}
        )
    )
    (b / "notes.json").write_text("[1, 2]")  # not an evaluation: ignored
    png = _png_bytes()
    (a / "eval" / "plots").mkdir()
    (a / "eval" / "plots" / "retrieval.png").write_bytes(png)
    (a / "eval" / "fake.png").write_bytes(b"<svg onload=alert(1)>")
    out = tmp_path / "site" / "report.html"
    assert main(["report", str(a), str(b), "--out", str(out), "--title", "Runs <script>x</script> & co"]) == 0
    assert "2 run(s), 4 evaluation(s), 1 image(s)" in capsys.readouterr().out
    html = out.read_text()
    for number in ("0.4123", "0.3877", "0.5061", "0.2222", "top1_by_shot[1] 0.111", "0.35", "2000"):
        assert number in html, number
    assert "weighted kNN (NPID), cosine, T=0.07" in html and "SVM per shot" in html
    assert "L-BFGS &lt;logistic&gt; &amp; friends" in html and "<logistic>" not in html
    assert "Runs &lt;script&gt;x&lt;/script&gt; &amp; co" in html and "<script" not in html
    assert base64.b64encode(png).decode() in html and "eval/plots/retrieval.png" in html
    assert "eval/fake.png: not a PNG file" in html and "onload" not in html
    assert "pirl (pretext jigsaw" in html and "npid" in html and "resnet18" in html
    # two runs' curves, the comparison, retrieval.png and one chart per probe (knn, linear, lowshot)
    assert html.count("data:image/png;base64,") == 7
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"""(src|href)\s*=\s*(?!["']?(data:|#))""", html)  # only data: URIs and in-page anchors


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: run directory not found: {tmp_path / 'missing'}"]
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 2
    assert "is it a run directory?" in capsys.readouterr().err
    with pytest.raises(PirlError, match="is a folder"):
        write_report([_fake_run(tmp_path / "run", "pirl", 0.5, [0.4])], tmp_path)
