"""Export: the whole trunk, every tensor bit for bit, into a plain torchvision ResNet loaded as the README says.

For both stems, a short run is exported; the torchvision model built as in the README loads model.safetensors
strictly, its state dict equals the checkpoint's trunk key for key and value for value (BatchNorm running
statistics and counters included, all moved by training), and in eval mode it computes what the trained trunk
computes. A re-export of the export writes the same tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file

import pirl
from helpers import random_source, tiny_config
from pirl.checkpoint import export, latest_checkpoint, load_checkpoint
from pirl.methods import build_method
from pirl.models.trunk import build_trunk
from pirl.train import train


@pytest.fixture(autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _readme_model(stem: str) -> torch.nn.Module:
    """The torchvision model of the README: resnet18, fc = Identity; the CIFAR stem's conv1 and max-pool first."""
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    if stem == "cifar":
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_export_is_the_full_trunk_bit_for_bit_and_computes_what_it_computes(tmp_path, stem):
    cfg = tiny_config(f"model.stem={stem}", "optim.epochs=1", "train.knn_every=0", "bank.init=random")
    train(cfg, random_source(16), tmp_path / "run", progress=False)
    out = export(tmp_path / "run", tmp_path / "exp")
    meta = json.loads((out / "config.json").read_text())
    assert meta["stem"] == stem and meta["arch"] == "resnet18" and meta["feature_dim"] == 512

    model = _readme_model(stem)
    model.load_state_dict(load_file(out / "model.safetensors"))  # the README's one line; strict
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))["method"]
    trunk = {k.removeprefix("encoder.trunk."): v for k, v in ckpt.items() if k.startswith("encoder.trunk.")}
    state = model.state_dict()
    assert state.keys() == trunk.keys()
    assert set(state) == {k for k in _readme_model(stem).state_dict()}  # every tensor the model has, no fc
    for key, value in trunk.items():
        assert state[key].dtype == value.dtype and state[key].shape == value.shape, key
        assert torch.equal(state[key], value), key
    # training moved the weights and the BatchNorm statistics that the export carries
    torch.manual_seed(cfg.train.seed)
    fresh = build_trunk("resnet18", stem).state_dict()
    for key in ("conv1.weight", "layer4.1.conv2.weight", "bn1.running_mean", "layer3.0.bn2.running_var"):
        assert not torch.equal(state[key], fresh[key]), key
    assert int(state["bn1.num_batches_tracked"]) > 0

    # eval-mode features of the trained trunk (rebuilt from the checkpoint), of the README model, of load_model
    method = build_method(cfg, 16, random_source(16))
    method.load_state_dict(ckpt)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = method.encoder.trunk.eval()(x)
        got = model.eval()(x)
        loaded = pirl.load_model(out).trunk(x)
    assert want.shape == (4, 512) and want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(loaded, want, rtol=0, atol=0)
    # the eval features use the running statistics, not the batch's: a single image gives the same feature
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), want[:1], rtol=1e-4, atol=1e-5)

    again = load_file(export(out, tmp_path / "again") / "model.safetensors")  # an export re-exported
    assert again.keys() == trunk.keys() and all(torch.equal(again[k], trunk[k]) for k in trunk)


def test_export_records_its_origin_and_writes_into_new_or_existing_folders(tmp_path):
    """config.json names the method and epoch it came from; model.safetensors carries the ``format: pt`` metadata
    that Hugging Face loaders check; the output folder may be nested and new, or an earlier export to overwrite."""
    from safetensors import safe_open

    cfg = tiny_config("optim.epochs=1", "train.knn_every=0", "bank.init=random", "method.name=npid")
    train(cfg, random_source(16), tmp_path / "run", progress=False)
    out = export(tmp_path / "run", tmp_path / "a" / "b" / "exp")  # parents that do not exist yet
    meta = json.loads((out / "config.json").read_text())
    assert meta["method"] == "npid" and meta["epoch"] == 1
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    first = load_file(out / "model.safetensors")
    assert export(tmp_path / "run", out) == out  # an existing export is replaced, not refused
    again = load_file(out / "model.safetensors")
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
