"""CLI polish and the GPU path's configuration: --version, overrides anywhere, whole option names with a "did you
mean", YAML errors with file and line, the GPU presets' batched views, CUDA out-of-memory as one line."""

import re

import pytest
import torch
import yaml

import pirl
from helpers import REPO_ROOT, TINY
from pirl.cli import main, oom_hint
from pirl.config import load_config
from pirl.errors import PirlError


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"pirl {pirl.__version__}"


def test_overrides_are_accepted_before_between_and_after_flags(capsys):
    assert (
        main(
            [
                "train",
                "loss.lam=0.25",
                "--preset",
                "cifar10-r18",
                "loss.temperature=0.2",
                "--print-config",
                "--epochs",
                "7",
                "optim.batch_size=32",
            ]
        )
        == 0
    )
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["method"]["lam"], cfg["loss"]["temperature"]) == (0.25, 0.2)
    assert (cfg["optim"]["epochs"], cfg["optim"]["batch_size"], cfg["model"]["stem"]) == (7, 32, "cifar")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--epoch", "3"], "unrecognized arguments: --epoch; did you mean --epochs?"),
        (["train", "--epoch=3", "--print-config"], "did you mean --epochs?"),
        (["eval", "knn", "--model", "m", "--data", "d", "--val", "v"], "did you mean --val-data?"),
        (["trian"], "invalid choice: 'trian'"),
        (["train", "loss.lam=0.5", "--seed", "1", "stray"], "unrecognized arguments: stray"),
        (["eval", "knn", "--model", "m", "--data", "d", "loss.lam=1"], "unrecognized arguments: loss.lam=1"),
    ],
)
def test_usage_errors_are_one_line_and_abbreviations_are_refused(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and needle in err and err.count("\n") == 1 and err.startswith("error: ")
    if argv == ["trian"]:
        assert "did you mean train?" in err


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "mine.yaml"
    bad.write_text("data:\n  image_size: 32\n  image_scale: [0.2, 1.0\nmodel:\n  arch: resnet18\n")
    with pytest.raises(PirlError, match=r"YAML syntax error in .*mine\.yaml, line 4, column \d+"):
        load_config(str(bad))
    assert main(["train", "--preset", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mine.yaml, line 4" in err


@pytest.mark.parametrize("preset", ["imagenet-r50", "cifar10-r18"])
def test_gpu_presets_make_the_views_on_the_device(preset):
    assert load_config(preset).data.batched_views is True
    assert load_config(preset, ["data.batched_views=false"]).data.batched_views is False


def test_slurm_example_sets_only_keys_that_exist():
    text = (REPO_ROOT / "examples" / "slurm" / "pirl_multinode.sbatch").read_text()
    keys = set(re.findall(r"\b((?:data|model|loss|optim|train)\.\w+)=([\w.]+)", text))
    assert keys, "the example shows overrides"
    for key, value in keys:
        load_config("imagenet-r50", [f"{key}={value}"])  # raises on a key that does not exist


def _raise_oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_cuda_out_of_memory_in_training_is_one_line_naming_what_to_lower(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from pirl.methods.pirl import PIRL

    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(images / f"{i}.png")
    monkeypatch.setattr(PIRL, "training_step", _raise_oom)
    code = main(
        ["train", "--data", str(images), "--out", str(tmp_path / "run"), *TINY, "train.knn_every=0", "loss.negatives=4"]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and "Traceback" not in err and len(lines) == 1
    assert "CUDA out of memory during pirl train" in lines[0] and "optim.batch_size" in lines[0]
    assert "loss.negatives" in lines[0]


def test_cuda_out_of_memory_in_eval_names_the_batch_size(tmp_path, monkeypatch, capsys):
    import pirl.eval.commands as commands

    monkeypatch.setattr(commands, "evaluate", _raise_oom)
    assert main(["eval", "knn", "--model", "m", "--data", "d"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size" in err and oom_hint("eval") in err


def test_eval_runs_features_and_probes_on_the_chosen_device(tmp_path, monkeypatch):
    """--device reaches feature extraction, kNN and the linear probe (auto: the GPU when there is one)."""
    import numpy as np

    import pirl.eval.commands as commands
    from pirl.data.sources import ArraySource
    from pirl.eval.models import LoadedModel
    from pirl.models.trunk import build_trunk

    seen: dict[str, object] = {}
    real_extract, real_probe = commands.extract_features_cached, commands.linear_probe

    def extract(*args, **kwargs):
        seen["features"] = kwargs["device"]
        return real_extract(*args, **kwargs)

    def probe(*args, **kwargs):
        seen["probe"] = kwargs["device"]
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(commands, "extract_features_cached", extract)
    monkeypatch.setattr(commands, "linear_probe", probe)
    monkeypatch.setenv("PIRL_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    source = ArraySource(rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8), np.arange(16) % 2)
    monkeypatch.setattr(commands, "_open", lambda *a, **k: source)
    trunk = build_trunk("resnet18", "cifar")
    monkeypatch.setattr(
        commands,
        "load_model",
        lambda *a, **k: LoadedModel(trunk.eval(), "resnet18", "cifar", 16, [0.5] * 3, [0.25] * 3, "tiny-test-trunk"),
    )
    result = commands.evaluate("linear", "m", "d", device="cpu", batch_size=8, workers=0)
    assert seen == {"features": torch.device("cpu"), "probe": torch.device("cpu")} and 0 <= result["top1"] <= 1
    with pytest.raises(PirlError, match="device"):
        commands.evaluate("knn", "m", "d", device="tpu")
