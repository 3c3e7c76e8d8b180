import subprocess
import sys

import pytest
import yaml

from pirl.cli import main
from pirl.config import PRESETS, load_config
from pirl.errors import PirlError


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.method.name == "pirl" and cfg.optim.epochs >= 1


def test_paper_recipe_preset():
    cfg = load_config("imagenet-r50")
    assert (cfg.model.arch, cfg.data.image_size, cfg.data.jigsaw_crop, cfg.data.patch_size) == (
        "resnet50",
        224,
        255,
        64,
    )
    assert (cfg.bank.negatives, cfg.loss.temperature, cfg.method.lam, cfg.bank.momentum) == (32000, 0.07, 0.5, 0.5)
    assert cfg.optim.batch_size * cfg.optim.base_lr / 256 == pytest.approx(0.12)
    assert cfg.optim.epochs == 800 and cfg.loss.form == "npid_nce"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("loss.lam=1.5", "loss.lam"),
        ("loss.temperature=0", "loss.temperature"),
        ("loss.bogus=1", "bogus"),
        ("bogus=1", "bogus"),
        ("optim.epochs=abc", "optim.epochs"),
        ("model.arch=vgg16", "model.arch"),
        ("data.patch_size=100", "data.patch_size"),
        ("loss.form=xyz", "loss.form"),
        ("noequals", "noequals"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(PirlError, match=needle):
        load_config("cpu-quick", [override])


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pirl", *args], capture_output=True, text=True, timeout=120)


def test_print_config_applies_shortcuts_and_overrides(capsys):
    assert (
        main(
            [
                "train",
                "--preset",
                "cifar10-r18",
                "--epochs",
                "7",
                "--batch-size",
                "32",
                "--print-config",
                "loss.lam=0.25",
            ]
        )
        == 0
    )
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["optim"]["epochs"] == 7 and cfg["optim"]["batch_size"] == 32 and cfg["method"]["lam"] == 0.25
    assert cfg["model"]["stem"] == "cifar"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--data", "/no/such/dir", "--out", "x"], "data path not found"),
        (["train", "--data", ".", "--out", "x", "loss.lam=2"], "loss.lam"),
        (["train", "--data", ".", "--out", "x", "loss.bank_dtype=bfloat16"], "loss.bank_dtype"),
        (["train", "--data", ".", "--out", "x", "--preset", "nope"], "unknown preset"),
        (["export", "/no/such/run", "--out", "x"], "no such run"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(args, needle):
    result = _run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and needle in result.stderr
    assert "Traceback" not in result.stderr


def test_help_for_each_command():
    for cmd in ("train", "export", "demo", "eval"):
        result = _run_cli(cmd, "--help")
        assert result.returncode == 0 and "usage" in result.stdout
