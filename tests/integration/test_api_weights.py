"""The Python API, weights in (model.init, torchvision references), VISSL checkpoints in, Detectron2/timm out."""

from __future__ import annotations

import importlib.util
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import pirl
from helpers import REPO_ROOT, TINY, random_source, tiny_config
from pirl.cli import main
from pirl.methods import build_method
from pirl.models.trunk import build_trunk


def _same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _outputs(trunk: torch.nn.Module, size: int = 32) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return trunk.eval()(x)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny PIRL run through pirl.pretrain, and its export."""
    tmp = tmp_path_factory.mktemp("api")
    run = pirl.pretrain(
        "cpu-quick", random_source(24), tmp / "run", overrides=TINY, progress=False, optim_epochs=1, loss_lam=0.25
    )
    return run, run.export(tmp / "export")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A labelled image folder: 3 classes x 8 images of 16 pixels, each class its own colour plus noise."""
    root = tmp_path_factory.mktemp("folder") / "images"
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(8):
            img = np.clip(np.array(colour) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIRL_CACHE_DIR", str(tmp_path / "cache"))


# --- 1. the Python API ----------------------------------------------------------------------------------------


def test_public_names_resolve_and_import_is_lazy():
    for name in pirl.__all__:
        assert getattr(pirl, name) is not None, name
    assert callable(pirl.evaluate.knn) and callable(pirl.evaluate.linear)
    with pytest.raises(AttributeError):
        pirl.no_such_thing  # noqa: B018
    import subprocess

    code = "import sys, pirl; print('torch' in sys.modules)"
    env = {"PYTHONPATH": str(REPO_ROOT / "src"), "PATH": "/usr/bin:/bin"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "False\n"


def test_pretrain_validates_like_the_cli(tmp_path):
    with pytest.raises(pirl.PirlError, match="loss.lam"):
        pirl.pretrain("cpu-quick", random_source(8), tmp_path / "a", overrides={"loss.lam": 2.0})
    cfg = tiny_config()
    cfg.optim.batch_size = 0  # edited by hand after loading: still checked
    with pytest.raises(pirl.PirlError, match="optim.batch_size"):
        pirl.pretrain(cfg, random_source(8), tmp_path / "b")
    with pytest.raises(pirl.PirlError, match="optim.epochs"):  # keywords: section_key
        pirl.pretrain("cpu-quick", random_source(8), tmp_path / "c", optim_epochs=0)
    with pytest.raises(pirl.PirlError, match="section_key"):
        pirl.pretrain("cpu-quick", random_source(8), tmp_path / "d", epochs=3)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_pretrain_result_export_and_load_model_round_trip(trained):
    run, export_dir = trained
    assert isinstance(run, pirl.PretrainResult) and run.epochs == 1 and run.checkpoint.is_file()
    assert np.isfinite(run.loss) and run.num_samples == 24
    assert json.loads((run.run_dir / "config.json").read_text())["config"]["method"]["lam"] == 0.25
    ckpt = torch.load(run.checkpoint, weights_only=True)
    trunk = {k[len("encoder.trunk.") :]: v for k, v in ckpt["method"].items() if k.startswith("encoder.trunk.")}
    _same_weights(pirl.load_model(export_dir).trunk.state_dict(), trunk)


def test_examples_run_on_tiny_data(folder, tmp_path, monkeypatch):
    def load(name):
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    result = load("pretrain_from_python").main(
        [
            "--data",
            str(folder),
            "--val-data",
            str(folder),
            "--out",
            str(tmp_path / "py"),
            *TINY,
            "optim.epochs=1",
            "train.knn_every=0",
        ]
    )
    assert 0 <= result["knn_top1"] <= 1 and (tmp_path / "py" / "export" / "model.safetensors").is_file()
    losses = load("pirl_in_your_loop").main([str(folder), "--epochs", "1", "--size", "32"])
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert (REPO_ROOT / "examples" / "pirl_in_your_loop.py").read_text().count("\n") < 100


# --- 2. weights in ---------------------------------------------------------------------------------------------


def test_init_from_an_export_and_from_a_checkpoint(trained, tmp_path):
    run, export_dir = trained
    want = pirl.load_model(export_dir).trunk.state_dict()
    for spec in (export_dir, run.checkpoint, run.run_dir):
        method = build_method(tiny_config(f"model.init={spec}"), 8)
        _same_weights(method.encoder.trunk.state_dict(), want)
    with pytest.raises(pirl.PirlError, match="model.init"):
        tiny_config(f"model.init={tmp_path / 'missing'}")
    with pytest.raises(pirl.PirlError, match="mis-shaped"):  # a ResNet-18 export into a CIFAR-stem trunk
        build_method(tiny_config(f"model.init={export_dir}", "model.stem=cifar"), 8)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """torch.hub's cache holding a file under the name of torchvision's ResNet-18 weights (random values)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(3)
    model = torchvision.models.resnet18()
    name = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(model.state_dict(), tmp_path / "torch" / "hub" / "checkpoints" / name)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def test_init_and_eval_from_torchvision_weights_in_the_hub_cache(hub_cache, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    method = build_method(tiny_config("model.init=torchvision:ResNet18_Weights.IMAGENET1K_V1"), 8)
    _same_weights(method.encoder.trunk.state_dict(), hub_cache)
    ref = pirl.load_model("torchvision:ResNet18_Weights.IMAGENET1K_V1")
    _same_weights(ref.trunk.state_dict(), hub_cache)
    assert (ref.arch, ref.input_size) == ("resnet18", 224)
    with pytest.raises(pirl.PirlError, match="ResNet18_Weights.IMAGENET1K_V1"):  # lists the valid members
        pirl.load_model("torchvision:ResNet18_Weights.NOPE")
    with pytest.raises(pirl.PirlError, match="IMAGENET1K_V1"):  # a bad name stops at config time
        tiny_config("model.init=torchvision:ResNet18_Weights.V9")
    with pytest.raises(pirl.PirlError, match="mis-shaped"):  # ResNet-18 weights, ResNet-34 trunk
        build_method(tiny_config("model.init=torchvision:ResNet18_Weights.IMAGENET1K_V1", "model.arch=resnet34"), 8)


def test_init_from_timm_weights(monkeypatch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(5)
    made = timm.create_model("resnet18", pretrained=False, num_classes=0)
    calls = []

    def fake_create(name, pretrained=False, **kwargs):  # stands in for the download of pretrained weights
        calls.append((name, pretrained, kwargs.get("num_classes")))
        return made

    monkeypatch.setattr(timm, "create_model", fake_create)
    method = build_method(tiny_config("model.init=timm:resnet18.a1_in1k"), 8)
    assert calls == [("resnet18.a1_in1k", True, 0)]
    _same_weights(method.encoder.trunk.state_dict(), made.state_dict())


def test_cli_eval_knn_on_torchvision_weights(hub_cache, folder, capsys):
    assert (
        main(
            [
                "eval",
                "knn",
                "--model",
                "torchvision:ResNet18_Weights.IMAGENET1K_V1",
                "--data",
                str(folder),
                "--val-data",
                str(folder),
                "--workers",
                "0",
                "--batch-size",
                "32",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["arch"] == "resnet18" and summary["model"].startswith("torchvision:")
    assert summary["test_images"] == 24 and 0 <= summary["top1"] <= 1


def test_a_timm_backbone_beyond_resnets_trains_exports_and_loads_in_timm(folder, tmp_path):
    timm = pytest.importorskip("timm")
    name = "mobilenetv3_small_050"  # pooled features through a pre-logits layer: 1024 wide, not num_features
    run = pirl.pretrain(
        tiny_config("optim.epochs=1", f"model.arch=timm:{name}"), random_source(16), tmp_path / "run", progress=False
    )
    assert np.isfinite(run.loss)
    out = pirl.export(run.run_dir, tmp_path / "exp", format="timm")
    ours = pirl.load_model(out)
    assert ours.arch == f"timm:{name}" and json.loads((out / "config.json").read_text())["architecture"] == name
    theirs = timm.create_model(
        name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))
    )
    assert _outputs(ours.trunk).shape == (2, 1024)
    assert torch.allclose(_outputs(theirs), _outputs(ours.trunk), atol=1e-5)
    assert 0 <= pirl.evaluate.knn(out, str(folder), str(folder), workers=0, batch_size=32)["top1"] <= 1
    with pytest.raises(pirl.PirlError, match="torchvision ResNet"):
        pirl.evaluate.linear(out, str(folder), str(folder), workers=0, stage="res4")
    with pytest.raises(pirl.PirlError, match="detectron2"):
        pirl.export(out, tmp_path / "d2", format="detectron2")
    with pytest.raises(pirl.PirlError, match="model.stem"):
        tiny_config(f"model.arch=timm:{name}", "model.stem=cifar")


# --- 3. weights from the paper: VISSL checkpoints ---------------------------------------------------------------


def _vissl_checkpoint(path: Path, arch: str = "resnet18") -> dict:
    """A checkpoint in VISSL's layout: trunk under classy_state_dict.base_model.model.trunk._feature_blocks.*"""
    torch.manual_seed(7)
    trunk = build_trunk(arch)
    state = {
        "phase_idx": 199,
        "iteration": 1000,
        "type": "checkpoint",
        "loss": {"memory_bank": torch.randn(10, 128)},
        "classy_state_dict": {
            "train_phase_idx": 199,
            "base_model": {
                "model": {
                    "trunk": {f"_feature_blocks.{k}": v for k, v in trunk.state_dict().items()},
                    "heads": {"0.clf.0.weight": torch.randn(128, 512), "1.fc.weight": torch.randn(128, 4608)},
                }
            },
        },
    }
    torch.save(state, path)
    return trunk.state_dict()


def test_import_vissl_checkpoint_then_eval(tmp_path, folder, capsys):
    want = _vissl_checkpoint(tmp_path / "model_final_checkpoint_phase199.torch")
    rc = main(
        [
            "import",
            "vissl",
            str(tmp_path / "model_final_checkpoint_phase199.torch"),
            "--out",
            str(tmp_path / "exp"),
            "--arch",
            "resnet18",
        ]
    )
    assert rc == 0
    model = pirl.load_model(tmp_path / "exp")
    _same_weights(model.trunk.state_dict(), want)
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["method"] == "vissl"
    knn = pirl.evaluate.knn(tmp_path / "exp", str(folder), str(folder), workers=0, batch_size=32)
    assert 0 <= knn["top1"] <= 1 and knn["arch"] == "resnet18"
    # a ResNet-18 trunk read as the default ResNet-50, and a file that is no checkpoint: one line, exit 2
    capsys.readouterr()
    assert (
        main(["import", "vissl", str(tmp_path / "model_final_checkpoint_phase199.torch"), "--out", str(tmp_path / "x")])
        == 2
    )
    assert "does not match resnet50" in capsys.readouterr().err
    (tmp_path / "junk.torch").write_bytes(b"not a pickle")
    assert main(["import", "vissl", str(tmp_path / "junk.torch"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "y").exists()


def test_import_vissl_bare_trunk_with_prefixes(tmp_path):
    """A trunk saved alone, keys as VISSL's weight-init prefix writes them (trunk.base_model._feature_blocks.)."""
    torch.manual_seed(9)
    trunk = build_trunk("resnet18")
    torch.save(
        {f"module.trunk.base_model._feature_blocks.{k}": v for k, v in trunk.state_dict().items()},
        tmp_path / "trunk.torch",
    )
    out = pirl.import_vissl(tmp_path / "trunk.torch", tmp_path / "exp", arch="resnet18")
    assert torch.allclose(_outputs(pirl.load_model(out).trunk), _outputs(trunk))


# --- 4. weights out: Detectron2 and timm ------------------------------------------------------------------------


def test_export_detectron2_pkl_keys_shapes_values(trained, tmp_path, capsys):
    run, export_dir = trained
    assert main(["export", str(run.run_dir), "--out", str(tmp_path / "d2"), "--format", "detectron2"]) == 0
    with open(tmp_path / "d2" / "model.pkl", "rb") as fh:
        blob = pickle.load(fh)
    assert blob["matching_heuristics"] is True and set(blob) == {"model", "__author__", "matching_heuristics"}
    trunk = pirl.load_model(export_dir).trunk.state_dict()
    d2 = blob["model"]
    pairs = {
        "conv1.weight": "stem.conv1.weight",
        "bn1.running_var": "stem.conv1.norm.running_var",
        "layer1.0.conv2.weight": "res2.0.conv2.weight",
        "layer1.1.bn2.bias": "res2.1.conv2.norm.bias",
        "layer2.0.downsample.0.weight": "res3.0.shortcut.weight",
        "layer4.0.downsample.1.running_mean": "res5.0.shortcut.norm.running_mean",
    }
    for ours, theirs in pairs.items():
        assert isinstance(d2[theirs], np.ndarray) and np.array_equal(d2[theirs], trunk[ours].numpy())
    assert len(d2) == len([k for k in trunk if not k.endswith("num_batches_tracked")])
    assert not any("layer" in k or "bn" in k or "downsample" in k for k in d2)


def test_export_detectron2_refuses_the_cifar_stem(tmp_path, capsys):
    pirl.pretrain(
        tiny_config("optim.epochs=1", "model.stem=cifar"), random_source(16), tmp_path / "run", progress=False
    )
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "d2"), "--format", "detectron2"]) == 2
    assert "ImageNet stem" in capsys.readouterr().err and not (tmp_path / "d2").exists()


def test_export_timm_loads_in_timm_with_the_same_outputs(trained, tmp_path):
    timm = pytest.importorskip("timm")
    run, export_dir = trained
    out = pirl.export(export_dir, tmp_path / "timm", format="timm")
    meta = json.loads((out / "config.json").read_text())
    assert meta["architecture"] == "resnet18" and meta["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    model = timm.create_model(
        "resnet18", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))
    )
    ours = pirl.load_model(out).trunk  # the timm export is also a pirl export
    assert torch.allclose(_outputs(model), _outputs(ours), atol=1e-5)
    cifar = tmp_path / "cifar"
    pirl.pretrain(tiny_config("optim.epochs=1", "model.stem=cifar"), random_source(16), cifar, progress=False)
    with pytest.raises(pirl.PirlError, match="ImageNet stem"):
        pirl.export(cifar, tmp_path / "timm-cifar", format="timm")
    assert not (tmp_path / "timm-cifar").exists()
