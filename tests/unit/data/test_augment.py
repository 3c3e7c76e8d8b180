"""One table of augmentation recipes (pirl.data.augment) that the per-sample and the batched views both read."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pirl.config import load_config
from pirl.data import augment
from pirl.data.batched import _Draws, photometric_batch
from pirl.data.views import photometric
from pirl.errors import PirlError


def _images(n: int = 4, size: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _per_sample(kind: str, images: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    view = photometric(kind, images.shape[-1])
    return torch.stack([view(x) for x in images]).float() / 255


def _batched(kind: str, images: torch.Tensor) -> torch.Tensor:
    draws = _Draws(torch.Generator().manual_seed(0), len(images), len(images), 0, torch.device("cpu"))
    return photometric_batch(images.float() / 255, kind, draws)


def test_the_config_accepts_exactly_the_table_names():
    assert augment.AUGMENTATIONS == ("vissl", "simclr_blur", "light", "none")
    for name in augment.AUGMENTATIONS:
        assert load_config("cpu-quick", [f"data.augment={name}"]).data.augment == name
    with pytest.raises(PirlError, match="data.augment.*vissl, simclr_blur, light, none"):
        load_config("cpu-quick", ["data.augment=strong"])


def test_the_table_module_does_not_import_torch():
    code = "import sys, pirl.data.augment; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize(
    "steps, expect",
    [
        ((augment.Grayscale(1.0),), "gray"),
        ((augment.Flip(1.0),), "flipped"),
        ((augment.Grayscale(0.0), augment.Flip(0.0), augment.Jitter(0.5, 0.5, 0.5, 0.1, p=0.0)), "unchanged"),
    ],
)
def test_a_changed_table_entry_changes_both_pipelines(monkeypatch, steps, expect):
    images = _images()
    before = {"per-sample": _per_sample("light", images), "batched": _batched("light", images)}
    monkeypatch.setitem(augment.RECIPES, "light", steps)
    after = {"per-sample": _per_sample("light", images), "batched": _batched("light", images)}
    x = images.float() / 255
    for name, y in after.items():
        if expect == "gray":
            assert (y.std(1) < 1e-6).all() and not (x.std(1) < 1e-6).all(), name
        elif expect == "flipped":
            torch.testing.assert_close(y, x.flip(-1), rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(y, x, rtol=0, atol=0, msg=name)
        assert not torch.equal(y, before[name]), name  # the stock recipe jitters: the new entry is what ran


def test_a_changed_parameter_reaches_both_pipelines(monkeypatch):
    """The blur's sigma and the photometric group's probability come from the table, in both pipelines."""
    images = _images(8, 20)
    monkeypatch.setitem(augment.RECIPES, "light", (augment.Blur(1.0, sigma=(1.5, 1.5)),))
    strong = {"per-sample": _per_sample("light", images), "batched": _batched("light", images)}
    monkeypatch.setitem(augment.RECIPES, "light", (augment.Blur(1.0, sigma=(0.1, 0.1)),))
    faint = {"per-sample": _per_sample("light", images), "batched": _batched("light", images)}
    x = images.float() / 255
    for name in strong:
        assert (strong[name] - x).abs().mean() > 4 * (faint[name] - x).abs().mean(), name
    monkeypatch.setitem(augment.RECIPES, "light", (augment.Photometric(0.0),))
    for name, y in {"per-sample": _per_sample("light", images), "batched": _batched("light", images)}.items():
        torch.testing.assert_close(y, x, rtol=0, atol=0, msg=name)


def test_unknown_recipe_is_a_value_error_in_both_pipelines():
    with pytest.raises(ValueError, match="unknown augmentation 'bogus'"):
        photometric("bogus", 8)
    with pytest.raises(ValueError, match="unknown augmentation 'bogus'"):
        _batched("bogus", _images())


def test_the_views_and_the_evaluators_keep_to_their_layers():
    """The data pipeline loads without the memory bank, and no evaluation loads the trainer."""
    code = (
        "import sys, pirl.data.views, pirl.data.batched, pirl.data.indexed, pirl.data.sources, pirl.data.keys, "
        "pirl.data.dataset; "
        "bank = 'pirl.bank' in sys.modules; "
        "import pirl.eval.commands, pirl.eval.features, pirl.eval.invariance, pirl.eval.finetune; "
        "sys.exit(2 * bank + ('pirl.training' in sys.modules or 'pirl.train' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_blur_kernel_is_the_odd_side_nearest_a_tenth_of_the_element_and_at_least_3():
    blur = augment.Blur(0.5)
    assert [augment.blur_kernel(blur, size) for size in (224, 100, 64, 32, 20, 8)] == [23, 11, 7, 3, 3, 3]
    assert augment.blur_kernel(augment.Blur(0.5, divisor=5), 40) == 9  # the divisor is the step's own
