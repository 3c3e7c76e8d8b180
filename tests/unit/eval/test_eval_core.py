"""Evaluation core: feature extraction (+cache), weighted kNN and the linear probe, on data with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from pirl.errors import PirlError
from pirl.eval.features import (
    cache_key,
    eval_transform,
    extract_features,
    extract_features_cached,
    pooled_size,
)
from pirl.eval.knn import knn_accuracies, knn_accuracy, knn_predict
from pirl.eval.linear import DEFAULT_WEIGHT_DECAYS, linear_probe, stratified_split
from pirl.models.trunk import build_trunk


def _clusters(n_per: int, n_cls: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.eye(n_cls, dim) * 10
    y = torch.arange(n_cls).repeat_interleave(n_per)
    return centers[y] + spread * torch.randn(len(y), dim, generator=gen), y


# ---------------------------------------------------------------- kNN


def test_knn_k1_on_own_training_set_is_perfect() -> None:
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 5, (50,), generator=torch.Generator().manual_seed(1))
    assert knn_accuracy(x, y, x, y, k=1) == 1.0


def test_knn_separated_clusters_all_ks_and_chunking() -> None:
    xtr, ytr = _clusters(20, 4, 6, 0.5, seed=0)
    xte, yte = _clusters(10, 4, 6, 0.5, seed=1)
    accs = knn_accuracies(xtr, ytr, xte, yte, ks=(1, 5, 200))
    assert accs == {1: 1.0, 5: 1.0, 200: 1.0}  # k=200 > 80 train points is clamped
    assert torch.equal(knn_predict(xtr, ytr, xte, k=5, chunk_size=3), knn_predict(xtr, ytr, xte, k=5))


def test_knn_weighted_vote_by_hand() -> None:
    # Query (1, 0). One class-1 neighbour at cosine 1.0, two class-0 neighbours at cosine 0.9, one class-2 far away.
    s = math.sqrt(1 - 0.9**2)
    train = torch.tensor([[1.0, 0.0], [0.9, s], [0.9, -s], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 2])
    query = torch.tensor([[2.0, 0.0]])  # unnormalised on purpose
    # T=0.07: exp(1/.07) = 1.6e6 beats 2*exp(.9/.07) = 7.7e5. T=1: e = 2.72 loses to 2*e^.9 = 4.92.
    assert knn_predict(train, labels, query, k=3, temperature=0.07).tolist() == [1]
    assert knn_predict(train, labels, query, k=3, temperature=1.0).tolist() == [0]
    # With k=1 only the nearest votes; with k=4 the far class-2 point adds a negligible weight.
    assert knn_predict(train, labels, query, k=1, temperature=1.0).tolist() == [1]
    assert knn_predict(train, labels, query, k=4, temperature=1.0, num_classes=5).tolist() == [0]


def test_knn_exclude_self_is_leave_one_out() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.05], [-1.0, 0.0], [-1.0, 0.05]])
    y = torch.tensor([0, 1, 0, 1])  # each point's nearest other point has the other label
    assert knn_accuracy(x, y, x, y, k=1) == 1.0
    assert knn_accuracy(x, y, x, y, k=1, exclude_self=True, chunk_size=3) == 0.0
    with pytest.raises(PirlError):
        knn_predict(x, y, x[:2], k=1, exclude_self=True)


# ---------------------------------------------------------------- linear probe


def test_linear_probe_separable_is_perfect() -> None:
    xtr, ytr = _clusters(40, 3, 10, 1.0, seed=0)
    xte, yte = _clusters(20, 3, 10, 1.0, seed=1)
    res = linear_probe(xtr, ytr, xte, yte, max_iter=50)
    assert res["top1"] == 1.0
    assert res["val_top1"] == 1.0
    assert res["weight_decay"] in res["val_top1_by_weight_decay"]


def test_linear_probe_random_labels_near_chance_and_deterministic() -> None:
    gen = torch.Generator().manual_seed(0)
    xtr, ytr = torch.randn(1000, 16, generator=gen), torch.randint(0, 4, (1000,), generator=gen)
    xte, yte = torch.randn(2000, 16, generator=gen), torch.randint(0, 4, (2000,), generator=gen)
    res = linear_probe(xtr, ytr, xte, yte, max_iter=50, weight_decays=(1e-3, 1e-2))
    assert abs(res["top1"] - 0.25) < 0.05
    again = linear_probe(xtr, ytr, xte, yte, max_iter=50, weight_decays=(1e-3, 1e-2))
    assert again["top1"] == res["top1"] and again["weight_decay"] == res["weight_decay"]


def test_stratified_split_keeps_class_proportions() -> None:
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    tr, va = stratified_split(y, 0.1, seed=0)
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(100))
    assert torch.bincount(y[va]).tolist() == [5, 3, 2]


# ---------------------------------------------------------------- features


@pytest.fixture(scope="module")
def tiny_trunk() -> nn.Module:
    torch.manual_seed(0)
    return build_trunk("resnet18", stem="cifar")


@pytest.fixture(scope="module")
def tiny_dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(5, 3, 32, 32, generator=gen), torch.tensor([4, 0, 3, 1, 2]))


def test_extract_features_pool_shapes_and_order(tiny_trunk: nn.Module, tiny_dataset: TensorDataset) -> None:
    tiny_trunk.train()
    feats, labels = extract_features(tiny_trunk, tiny_dataset, batch_size=2, device="cpu")
    assert feats.shape == (5, 512) and feats.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [4, 0, 3, 1, 2]
    assert tiny_trunk.training  # mode restored
    tiny_trunk.eval()
    with torch.no_grad():
        ref = tiny_trunk(tiny_dataset.tensors[0][3:4])
    torch.testing.assert_close(feats[3:4], ref, rtol=1e-4, atol=1e-4)


def test_extract_features_res3_pooled_dim(tiny_trunk: nn.Module, tiny_dataset: TensorDataset) -> None:
    feats, _ = extract_features(tiny_trunk, tiny_dataset, batch_size=5, device="cpu", stage="res3")
    assert abs(feats.shape[1] - 9000) / 9000 < 0.15  # 128 channels x 8 x 8 = 8192
    feats, _ = extract_features(tiny_trunk, tiny_dataset, device="cpu", stage="res3", pooled_dim=2048)
    assert feats.shape == (5, 2048)
    # Goyal'19 sizes for ResNet-50 widths: conv1 12x12, res2 6x6, res3 4x4, res4 3x3, res5 2x2.
    assert [pooled_size(c) for c in (64, 256, 512, 1024, 2048)] == [12, 6, 4, 3, 2]
    with pytest.raises(PirlError):
        extract_features(tiny_trunk, tiny_dataset, device="cpu", stage="res6")


class _CountingTrunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.flatten(1)[:, :4] * 2


def test_extract_features_cached_second_call_loads(tmp_path, tiny_dataset: TensorDataset) -> None:
    trunk = _CountingTrunk()
    key = {"ckpt": "abc123", "dataset": "toy", "split": "train"}
    f1, y1 = extract_features_cached(trunk, tiny_dataset, cache_dir=tmp_path, key_parts=key, device="cpu")
    n_calls = trunk.calls
    assert n_calls > 0 and len(list(tmp_path.glob("*/features.pt"))) == 1
    (path,) = tmp_path.glob("*/features.pt")
    f2, y2 = extract_features_cached(trunk, tiny_dataset, cache_dir=tmp_path, key_parts=dict(key), device="cpu")
    assert trunk.calls == n_calls
    assert torch.equal(f1, f2) and torch.equal(y1, y2)
    extract_features_cached(trunk, tiny_dataset, cache_dir=tmp_path, key_parts={**key, "split": "val"}, device="cpu")
    assert trunk.calls > n_calls
    # A truncated cache file is recomputed and rewritten rather than crashing.
    path.write_bytes(b"garbage")
    n_calls = trunk.calls
    f3, _ = extract_features_cached(trunk, tiny_dataset, cache_dir=tmp_path, key_parts=key, device="cpu")
    assert trunk.calls > n_calls and torch.equal(f1, f3)
    assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1}) != cache_key({"a": 1, "b": 3})


def test_eval_transform_sizes() -> None:
    big = eval_transform(224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    out = big(Image.new("RGB", (400, 300), (128, 64, 255)))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([128 / 255, 64 / 255, 1.0]).sub(0.5).div(0.25))
    small = eval_transform(32, (0.0,) * 3, (1.0,) * 3)
    assert small(Image.new("RGB", (32, 32))).shape == (3, 32, 32)


def _probe_with_val_curve(monkeypatch, peak: float, grid: tuple[float, ...]) -> dict:
    """Run linear_probe with a held-out accuracy that is a known function of the penalty, peaking at ``peak``."""
    import math

    import pirl.eval.linear as linear

    real_fit, real_top1, penalty_of = linear._fit, linear._top1, {}

    def fit(x, y, n_cls, wd, max_iter, init=None):
        params = real_fit(x, y, n_cls, wd, max_iter, init)
        penalty_of[id(params)] = wd
        return params

    def top1(x, y, params):
        if x.shape[0] == 30:  # the held-out split of the 300 training rows
            return 1.0 - abs(math.log10(penalty_of[id(params)]) - math.log10(peak)) / 10
        return real_top1(x, y, params)

    monkeypatch.setattr(linear, "_fit", fit)
    monkeypatch.setattr(linear, "_top1", top1)
    xtr, ytr = _clusters(100, 3, 4, 1.0, seed=0)
    return linear.linear_probe(xtr, ytr, xtr[:10], ytr[:10], max_iter=5, weight_decays=grid, val_fraction=0.1)


def test_linear_probe_grid_grows_until_the_best_penalty_is_inside(monkeypatch) -> None:
    res = _probe_with_val_curve(monkeypatch, peak=1.0, grid=(1e-4, 1e-3, 1e-2))
    assert res["weight_decay"] == 1.0
    assert res["grid_extensions"] == 3 and not res["weight_decay_at_edge"]
    assert sorted(res["val_top1_by_weight_decay"]) == [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0]


def test_linear_probe_grid_grows_downwards_too(monkeypatch) -> None:
    res = _probe_with_val_curve(monkeypatch, peak=1e-6, grid=(1e-4, 1e-3))
    assert res["weight_decay"] == 1e-6 and res["grid_extensions"] == 3 and not res["weight_decay_at_edge"]


def test_linear_probe_grid_growth_is_bounded_and_reported(monkeypatch) -> None:
    import pirl.eval.linear as linear

    res = _probe_with_val_curve(monkeypatch, peak=1e6, grid=(1e-4, 1e-3))
    assert res["grid_extensions"] == linear.MAX_GRID_EXTENSIONS
    assert res["weight_decay"] == 1.0 and res["weight_decay_at_edge"]


def test_linear_probe_default_grid_holds_an_interior_peak(monkeypatch) -> None:
    res = _probe_with_val_curve(monkeypatch, peak=1e-2, grid=DEFAULT_WEIGHT_DECAYS)
    assert res["weight_decay"] == 1e-2 and res["grid_extensions"] == 0 and not res["weight_decay_at_edge"]


def test_linear_probe_single_penalty_is_not_extended() -> None:
    xtr, ytr = _clusters(40, 3, 10, 1.0, seed=0)
    xte, yte = _clusters(20, 3, 10, 1.0, seed=1)
    res = linear_probe(xtr, ytr, xte, yte, max_iter=50, weight_decays=(1e-2,))
    assert res["grid_extensions"] == 0 and res["weight_decay"] == 1e-2


# ---------------------------------------------------------------- images at indices, the frozen-batch loop


def test_source_images_at_indices_and_plain_images_blank_for_undecodable() -> None:
    from helpers import random_source
    from pirl.data.images import BadImageError
    from pirl.data.indexed import PlainImages, SourceImages
    from pirl.data.views import eval_transform as home

    assert eval_transform is home  # the view lives in pirl.data; pirl.eval.features re-exports it
    source = random_source(8, size=6)
    to_tensor = eval_transform(6, (0.0,) * 3, (1.0,) * 3)
    every, some = SourceImages(source, to_tensor), SourceImages(source, to_tensor, [5, 2])
    assert len(every) == 8 and len(some) == 2
    image, label = some[0]
    assert torch.equal(image, every[5][0]) and label == source.labels[5] == every[5][1]
    assert some[1][1] == source.labels[2]

    class Broken(type(source)):
        def load(self, index: int):
            if index == 3:
                raise BadImageError("image 3: cannot decode")
            return super().load(index)

    broken = Broken(source.images, source.labels)
    plain = PlainImages(broken, [3, 5], to_tensor, 6)
    (blank, ok_blank), (fine, ok_fine) = plain[0], plain[1]
    assert not ok_blank and torch.equal(blank, torch.zeros(3, 6, 6))
    assert ok_fine and torch.equal(fine, every[5][0])
    with pytest.raises(BadImageError):
        SourceImages(broken, to_tensor, [3])[0]


def test_frozen_batches_runs_in_order_without_gradients_and_moves_only_the_inputs() -> None:
    from pirl.eval.features import frozen_batches

    x, y = torch.arange(10.0).view(10, 1), torch.arange(10) % 3
    seen = []

    def fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append((torch.is_inference_mode_enabled(), images.device, labels.dtype))
        return images.squeeze(1) * 2

    out = frozen_batches(fn, TensorDataset(x, y), device=torch.device("cpu"), batch_size=4)
    assert [len(o) for o in out] == [4, 4, 2] and torch.equal(torch.cat(out), torch.arange(10.0) * 2)
    assert seen == [(True, torch.device("cpu"), torch.int64)] * 3
    # a pair of inputs per item, as the invariance measure feeds it: the nested batch arrives as a list
    items = [((x[i], -x[i]), int(y[i])) for i in range(10)]
    sums = frozen_batches(
        lambda pair, labels: (pair[0] - pair[1]).sum().item(), items, device=torch.device("cpu"), batch_size=5
    )
    assert sums == [2 * sum(range(5)), 2 * sum(range(5, 10))]
