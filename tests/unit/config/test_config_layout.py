"""The config layout by owner (``method.*``, ``bank.*`` beside ``loss.*``) and the keys of the earlier layout, where
the method's and the bank's keys lived in ``loss``: old YAML files, saved configs, overrides and run folders load
as the same :class:`Config`."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import random_source, tiny_config
from pirl.checkpoint import CHECKPOINT_FORMAT, export, list_checkpoints, load_checkpoint, open_checkpoint
from pirl.config import config_to_dict, load_config
from pirl.config.legacy import RENAMED, translate_override, translate_tree
from pirl.errors import PirlError
from pirl.run_dir import resume_changes
from pirl.training import train

# every old key with a value other than its default
OLD_VALUES = {
    "loss.method": "npid",
    "loss.pretext": "rotation",
    "loss.lam": "0.25",
    "loss.transformed_bn_stats": "false",
    "loss.permutations": "30",
    "loss.bank": "sharded",
    "loss.negatives": "64",
    "loss.bank_momentum": "0.7",
    "loss.bank_dtype": "float16",
    "loss.bank_init": "random",
    "loss.exclude_positive": "true",
    "loss.share_negatives": "true",
}

# the cpu-quick preset as it was written in the earlier layout
OLD_CPU_QUICK = """
data:
  subset: 5000
  min_size: 64
  image_size: 64
  image_scale: [0.2, 1.0]
  jigsaw_crop: 63
  jigsaw_scale: [0.6, 1.0]
  patch_size: 20
  augment: light
  workers: 1
  batched_views: true
model:
  arch: resnet18
  stem: imagenet
  head: linear
  head_bn: true
loss:
  method: pirl
  pretext: jigsaw
  lam: 0.5
  temperature: 0.1
  negatives: 5000
  bank_init: features
optim:
  epochs: 10
  batch_size: 64
  base_lr: 0.12
  warmup_epochs: 0.5
  weight_decay: 0.0001
train:
  log_every: 10
  knn_every: 5
  knn_max_images: 2000
"""


def old_layout(tree: dict) -> dict:
    """A config dict of the current layout written back in the earlier one (as an older run saved it)."""
    out = {k: dict(v) for k, v in tree.items() if k not in ("method", "bank")}
    for old, new in RENAMED.items():
        section, key = new.split(".")
        out["loss"][old.split(".")[1]] = tree[section][key]
    return out


def test_the_table_covers_every_moved_key_and_nothing_else():
    assert set(OLD_VALUES) == set(RENAMED)
    fields = {f"{section}.{key}" for section, keys in config_to_dict(load_config()).items() for key in keys}
    assert set(RENAMED.values()) <= fields and not set(RENAMED) & fields
    assert {"loss.form", "loss.temperature"} <= fields


def test_old_overrides_give_the_same_config_as_the_new_keys():
    old = load_config("cpu-quick", [f"{k}={v}" for k, v in OLD_VALUES.items()])
    new = load_config("cpu-quick", [f"{RENAMED[k]}={v}" for k, v in OLD_VALUES.items()])
    assert old == new
    assert (old.method.name, old.method.lam, old.method.transformed_bn_stats, old.method.permutations) == (
        "npid",
        0.25,
        False,
        30,
    )
    assert (old.bank.kind, old.bank.negatives, old.bank.momentum, old.bank.dtype, old.bank.init) == (
        "sharded",
        64,
        0.7,
        "float16",
        "random",
    )
    assert old.bank.exclude_positive and old.bank.share_negatives and old.method.pretext == "rotation"
    assert translate_override("optim.epochs=3") == "optim.epochs=3"


def test_an_old_yaml_file_loads_as_the_shipped_preset(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(OLD_CPU_QUICK)
    cfg = load_config(str(path))
    assert cfg == load_config("cpu-quick")
    assert (cfg.method.name, cfg.bank.negatives, cfg.bank.init, cfg.loss.temperature) == ("pirl", 5000, "features", 0.1)
    # old keys in a file, new ones on the command line, and the other way round
    assert load_config(str(path), ["bank.negatives=100"]).bank.negatives == 100
    path.write_text("method:\n  lam: 0.75\n")
    assert load_config(str(path), ["loss.lam=0.25"]).method.lam == 0.25


def test_a_saved_config_of_the_old_layout_loads_as_the_same_config():
    cfg = tiny_config(*(f"{k}={v}" for k, v in OLD_VALUES.items() if k != "loss.method"))
    saved = old_layout(config_to_dict(cfg))
    assert "method" not in saved and saved["loss"]["bank"] == "sharded"
    assert load_config(None, [], base=saved) == cfg
    assert translate_tree(saved) == config_to_dict(cfg)
    assert "method" not in saved  # the caller's dict is left as it was


def test_errors_name_the_key_as_given_and_its_new_name(tmp_path):
    with pytest.raises(
        PirlError,
        match=r"^bad config value loss\.lam=2\.0: must be in \[0, 1\] \(loss\.lam is now "
        r"method\.lam\)$",
    ):
        load_config(None, ["loss.lam=2"])
    with pytest.raises(PirlError, match=r"^bad config value method\.lam=2\.0: must be in \[0, 1\]$"):
        load_config(None, ["method.lam=2"])
    with pytest.raises(PirlError, match=r"loss\.negatives.*bank\.negatives"):
        load_config(None, ["loss.negatives=lots"])
    with pytest.raises(PirlError, match="method.name"):
        load_config(None, ["method.name=colorization"])
    path = tmp_path / "both.yaml"
    path.write_text("loss:\n  lam: 0.25\nmethod:\n  lam: 0.75\n")
    with pytest.raises(PirlError, match=r"both loss\.lam=0\.25 and method\.lam=0\.75"):
        load_config(str(path))
    path.write_text("loss:\n  lam: 0.75\nmethod:\n  lam: 0.75\n")  # the same value twice is no conflict
    assert load_config(str(path)).method.lam == 0.75


def test_interpolations_of_old_keys_follow_them():
    assert load_config(None, ["loss.lam=0.25", "optim.base_lr=${loss.lam}"]).optim.base_lr == 0.25


def test_resume_compares_an_old_layout_checkpoint_config_in_the_new_layout():
    cfg = config_to_dict(tiny_config())
    assert resume_changes(old_layout(cfg), cfg) == {}
    moved = old_layout(cfg)
    moved["loss"]["bank"] = "sharded"  # an allowed change under its old name
    assert resume_changes(moved, cfg) == {"bank.kind": ["sharded", "replicated"]}
    moved["loss"]["method"] = "npid"
    with pytest.raises(PirlError, match=r"method\.name \(npid -> pirl; loss\.method in older configs\)"):
        resume_changes(moved, cfg)


def test_a_run_folder_of_the_old_layout_resumes_and_exports(tmp_path):
    run = tmp_path / "run"
    train(tiny_config("optim.epochs=1"), random_source(32), run, progress=False)
    (path,) = list_checkpoints(run)
    state = load_checkpoint(path)
    state["config"] = old_layout(state["config"])  # as written before the method and bank sections
    torch.save(state, path)
    meta = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**meta, "config": old_layout(meta["config"])}))
    assert load_checkpoint(path)["format"] == CHECKPOINT_FORMAT and "method" not in load_checkpoint(path)["config"]

    open_checkpoint(run)  # the checkpoint check reads either layout
    meta_out = json.loads((export(run, tmp_path / "exp") / "config.json").read_text())
    assert meta_out["method"] == "pirl" and meta_out["training_config"]["bank"]["negatives"] == 16

    summary = train(
        tiny_config("optim.epochs=2", "loss.bank=sharded"), random_source(32), run, resume=True, progress=False
    )
    assert summary["complete"] and summary["epochs"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r["kind"] == "resume"]
    assert len(resumed) == 1
    assert resumed[0]["changes"] == {"bank.kind": ["replicated", "sharded"], "optim.epochs": [1, 2]}
    assert load_checkpoint(list_checkpoints(run)[-1])["config"]["bank"]["kind"] == "sharded"
