import json
import shutil

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from helpers import random_source, tiny_config
from pirl.checkpoint import export, latest_checkpoint, list_checkpoints, load_checkpoint
from pirl.train import train


def _final_state(run_dir):
    state = load_checkpoint(latest_checkpoint(run_dir))
    return state["method"], state["optimizer"]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:  # bit-identical; NaN == NaN for the unused NCE constant of InfoNCE runs
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_resume_from_epoch_k_equals_uninterrupted_run(tmp_path):
    source = random_source(32)
    cfg = tiny_config("optim.epochs=3", "train.keep_checkpoints=10")
    train(cfg, source, tmp_path / "full", progress=False)
    # a second run that only has the end-of-epoch-1 checkpoint of the same recipe, as if it had stopped there
    (tmp_path / "split").mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint-e0001-s0000000.pt", tmp_path / "split")
    train(cfg, source, tmp_path / "split", resume=True, progress=False)
    full, split = _final_state(tmp_path / "full"), _final_state(tmp_path / "split")
    _assert_same(full[0], split[0])  # trunk, heads, bank, Z: bit-identical
    assert "bank.memory" in full[0]
    losses = [
        json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"train"' in x
    ]
    resumed = [
        json.loads(x)["loss"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines() if '"train"' in x
    ]
    assert resumed == losses[-len(resumed) :] and len(resumed) == 2 * len(losses) // 3


def test_resuming_a_complete_run_reports_its_last_loss_and_trains_no_more(tmp_path):
    source = random_source(32)
    cfg = tiny_config("optim.epochs=1")
    first = train(cfg, source, tmp_path / "run", progress=False)
    records = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = train(tiny_config("optim.epochs=1"), source, tmp_path / "run", resume=True, progress=False)
    last_train = [json.loads(x) for x in records.splitlines() if '"train"' in x][-1]
    assert again["complete"] and again["loss"] == first["loss"] == last_train["loss"]
    assert again["checkpoint"] == first["checkpoint"]
    kept = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert kept.startswith(records) and '"train"' not in kept[len(records) :]  # only a resume record is added


@pytest.mark.parametrize("bank_dtype", ["float32", "float16"])
def test_resume_from_a_mid_epoch_checkpoint(tmp_path, bank_dtype):
    source = random_source(48)
    train(tiny_config("optim.epochs=2", f"loss.bank_dtype={bank_dtype}"), source, tmp_path / "full", progress=False)
    cfg = tiny_config(
        "optim.epochs=2", "train.checkpoint_every_steps=2", "train.keep_checkpoints=10", f"loss.bank_dtype={bank_dtype}"
    )
    train(cfg, source, tmp_path / "mid", progress=False)
    # keep only a checkpoint from the middle of epoch 1, as if the run had died there
    for path in list_checkpoints(tmp_path / "mid"):
        if path.name != "checkpoint-e0000-s0000004.pt":
            path.unlink()
    train(cfg, source, tmp_path / "mid", resume=True, progress=False)
    final = _final_state(tmp_path / "full")[0]
    _assert_same(final, _final_state(tmp_path / "mid")[0])
    assert final["bank.memory"].dtype == getattr(torch, bank_dtype)  # checkpoints keep the bank's storage


def test_same_seed_same_run_and_other_seed_differs(tmp_path):
    source = random_source(32)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(tiny_config("optim.epochs=1", f"train.seed={seed}"), source, tmp_path / name, progress=False)
    a, b, c = (_final_state(tmp_path / n)[0] for n in "abc")
    _assert_same(a, b)
    assert not torch.equal(a["bank.memory"], c["bank.memory"])


def test_export_loads_into_plain_torchvision(tmp_path):
    source = random_source(32)
    train(tiny_config("optim.epochs=1"), source, tmp_path / "run", progress=False)
    out = export(tmp_path / "run", tmp_path / "exp")
    meta = json.loads((out / "config.json").read_text())
    assert meta["arch"] == "resnet18" and meta["stem"] == "imagenet" and meta["feature_dim"] == 512
    assert meta["input_size"] == 16 and len(meta["mean"]) == 3 and "training_config" in meta
    weights = load_file(out / "model.safetensors")
    assert not any(k.startswith(("fc.", "encoder.", "module.")) for k in weights)
    # a torchvision user rebuilds the trunk from config.json alone
    model = getattr(torchvision.models, meta["arch"])()
    model.fc = torch.nn.Identity()
    model.load_state_dict(weights)  # strict
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert torch.equal(weights["conv1.weight"], ckpt["method"]["encoder.trunk.conv1.weight"])
    model.eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 512)


def test_cifar_stem_export_round_trip(tmp_path):
    source = random_source(32)
    train(tiny_config("optim.epochs=1", "model.stem=cifar"), source, tmp_path / "run", progress=False)
    out = export(tmp_path / "run", tmp_path / "exp")
    meta = json.loads((out / "config.json").read_text())
    assert meta["stem"] == "cifar"
    model = torchvision.models.resnet18()
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool, model.fc = torch.nn.Identity(), torch.nn.Identity()
    model.load_state_dict(load_file(out / "model.safetensors"))


def test_metrics_jsonl_and_tensorboard_are_written(tmp_path):
    train(tiny_config("optim.epochs=1"), random_source(32), tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "epoch"} <= {r["kind"] for r in rows}
    assert all({"loss", "lr", "images_per_s"} <= set(r) for r in rows if r["kind"] == "train")
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_small_dataset_adapts_negatives_and_batch(tmp_path, recwarn):
    summary = train(
        tiny_config("optim.epochs=1", "optim.batch_size=64", "loss.negatives=1000"),
        random_source(20),
        tmp_path / "run",
        progress=False,
    )
    messages = " ".join(str(w.message) for w in recwarn)
    assert "loss.negatives" in messages and "optim.batch_size" in messages
    assert summary["num_samples"] == 20
