"""What ``export`` and ``load_export`` refuse, and the one-line message each refusal gives.

The messages are the whole user interface of a bad export or checkpoint, so they are stated exactly: the path,
the problem, and the first line of the underlying error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import tiny_config
from pirl.checkpoint import export, load_export, save_checkpoint
from pirl.config import config_to_dict
from pirl.errors import PirlError
from pirl.methods import build_method

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _checkpoint(run: Path, edit=None) -> Path:
    """A checkpoint of an untrained tiny run; ``edit`` changes its method state first."""
    cfg = tiny_config()
    state = build_method(cfg, 8).state_dict()
    if edit:
        edit(state)
    run.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(run, {"config": config_to_dict(cfg), "method": state, "epoch": 1, "step": 0}, 1, 0, keep=1)


@pytest.fixture
def exported(tmp_path) -> Path:
    return export(_checkpoint(tmp_path / "run"), tmp_path / "export")


def test_an_export_records_its_format_and_the_trunk_it_holds(exported):
    meta = json.loads((exported / "config.json").read_text())
    cfg = tiny_config()
    assert meta["format"] == "pirl-export-1"
    assert (meta["arch"], meta["stem"], meta["input_size"]) == (cfg.model.arch, cfg.model.stem, cfg.data.image_size)
    trunk, loaded = load_export(exported)
    assert loaded == meta and not isinstance(trunk.fc, torch.nn.Linear)


def test_an_unknown_format_is_refused_with_the_choices(tmp_path):
    with pytest.raises(PirlError) as err:
        export(tmp_path / "nowhere", tmp_path / "out", format="onnx")
    assert str(err.value) == "unknown export format 'onnx'; choose one of torchvision, detectron2, timm"


@pytest.mark.parametrize(
    ("edit", "counts"),
    [
        (lambda s: s.pop("encoder.trunk.conv1.weight"), "1 missing, 0 unexpected keys"),
        (lambda s: s.update({"encoder.trunk.extra.weight": torch.zeros(1)}), "0 missing, 1 unexpected keys"),
    ],
)
def test_a_checkpoint_trunk_of_another_shape_is_refused_with_counts(tmp_path, edit, counts):
    with pytest.raises(PirlError) as err:
        export(_checkpoint(tmp_path / "run", edit), tmp_path / "out")
    assert str(err.value) == f"checkpoint trunk does not match {tiny_config().model.arch}: {counts}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_a_folder_without_either_file_is_not_an_export(exported, missing):
    (exported / missing).unlink()
    with pytest.raises(PirlError) as err:
        load_export(exported)
    assert str(err.value) == f"{exported} is not a pirl export (needs config.json and model.safetensors)"


def test_unreadable_json_names_the_file_and_the_parse_error(exported):
    (exported / "config.json").write_text("{not json\nsecond line")
    with pytest.raises(PirlError) as err:
        load_export(exported)
    assert str(err.value) == (
        f"{exported / 'config.json'}: not readable JSON "
        "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
    )


@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        ([1, 2], "config.json is not a JSON object"),
        ({"arch": "resnet18", "stem": "imagenet", "mean": MEAN, "std": STD}, "no input_size"),
        (
            {"arch": "resnet18", "stem": "imagenet", "input_size": "64", "mean": MEAN, "std": STD},
            "input_size is not a int",
        ),
    ],
)
def test_a_malformed_config_names_its_problem(exported, meta, problem):
    (exported / "config.json").write_text(json.dumps(meta))
    with pytest.raises(PirlError) as err:
        load_export(exported)
    assert str(err.value) == f"{exported / 'config.json'}: malformed pirl export ({problem})"


def test_weights_that_do_not_load_name_the_file_and_the_first_line_of_the_error(exported):
    weights = exported / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # a header that claims 8 bytes and holds 2
    with pytest.raises(PirlError) as err:
        load_export(exported)
    message = str(err.value)
    assert message.startswith(f"{weights}: cannot load (") and message.endswith(")")
    reason = message[len(f"{weights}: cannot load (") : -1]
    assert reason and reason != "None" and "\n" not in reason and len(reason) <= 200


def test_a_long_error_line_is_cut_to_200_characters(exported, monkeypatch):
    import safetensors.torch

    def fail(*args, **kwargs):
        raise ValueError("x" * 300 + "\nsecond line")

    monkeypatch.setattr(safetensors.torch, "load_file", fail)
    with pytest.raises(PirlError) as err:
        load_export(exported)
    assert str(err.value) == f"{exported / 'model.safetensors'}: cannot load ({'x' * 200})"
    monkeypatch.setattr(json, "loads", fail)
    with pytest.raises(PirlError) as err:
        load_export(exported)
    assert str(err.value) == f"{exported / 'config.json'}: not readable JSON ({'x' * 200})"
