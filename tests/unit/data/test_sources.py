"""Tests for pirl.data.sources: folders, archives, arrays and torchvision names."""

from __future__ import annotations

import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pirl.data.images import BadImageError
from pirl.data.sources import (
    ArraySource,
    FolderSource,
    ImageSource,
    TorchvisionSource,
    default_data_root,
    open_source,
)
from pirl.errors import PirlError


def _img(path: Path, value: int = 0, size: tuple[int, int] = (4, 3)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def _tree(root: Path, files: list[str]) -> Path:
    for i, rel in enumerate(files):
        _img(root / rel, value=i)
    return root


def _rel(src: FolderSource, root: Path) -> list[str]:
    return [Path(p).relative_to(root).as_posix() for p in src.paths]


def test_image_folder_layout(tmp_path: Path) -> None:
    root = _tree(tmp_path / "d", ["dog/b.png", "cat/z.jpg", "dog/sub/deeper/c.png", "cat/a.png"])
    _img(root / "cat/.hidden.png")
    _img(root / ".cache/x.png")
    (root / "README.txt").write_text("not an image")
    src = open_source(str(root))
    assert isinstance(src, FolderSource) and isinstance(src, ImageSource)
    assert src.classes == ["cat", "dog"] and src.num_classes == 2
    assert _rel(src, root) == ["cat/a.png", "cat/z.jpg", "dog/b.png", "dog/sub/deeper/c.png"]
    assert src.labels == [0, 0, 1, 1]
    img, label = src[3]
    assert img.mode == "RGB" and img.size == (4, 3) and label == 1
    assert src[-1][1] == 1
    with pytest.raises(IndexError):
        src[4]


def test_flat_and_mixed_folders_are_unlabeled(tmp_path: Path) -> None:
    flat = open_source(str(_tree(tmp_path / "flat", ["b.png", "a.png", "C.JPG"])))
    assert flat.labels is None and flat.classes is None and len(flat) == 3
    assert flat[0][1] == -1
    assert _rel(flat, tmp_path / "flat") == ["C.JPG", "a.png", "b.png"]  # code-point order
    mixed = open_source(str(_tree(tmp_path / "mixed", ["top.png", "x/one.png", "y/z/two.png"])))
    assert mixed.labels is None
    assert _rel(mixed, tmp_path / "mixed") == ["top.png", "x/one.png", "y/z/two.png"]


def test_order_independent_of_creation_order(tmp_path: Path) -> None:
    names = [f"c{i % 3}/{i:03d}.png" for i in range(12)]
    a = open_source(str(_tree(tmp_path / "a", names)))
    b = open_source(str(_tree(tmp_path / "b", names[::-1])))
    assert _rel(a, tmp_path / "a") == _rel(b, tmp_path / "b") and a.labels == b.labels


def test_single_wrapper_folder_is_descended(tmp_path: Path) -> None:
    root = _tree(tmp_path / "w", ["dataset/cat/a.png", "dataset/dog/b.png"])
    src = open_source(str(root))
    assert src.classes == ["cat", "dog"]


def test_split_rule(tmp_path: Path) -> None:
    root = _tree(
        tmp_path / "c", ["train/cat/1.png", "train/cat/2.png", "train/dog/3.png", "test/cat/4.png", "test/dog/5.png"]
    )
    train = open_source(str(root))
    assert len(train) == 3 and train.classes == ["cat", "dog"] and train.labels == [0, 0, 1]
    test = open_source(str(root), split="test")
    assert len(test) == 2 and test.labels == [0, 1]
    assert len(open_source(str(root), split="val")) == 2  # val falls back to test/
    assert len(open_source(str(root / "train"), split="test")) == 3  # direct path: split ignored
    with pytest.raises(PirlError, match="split must be one of"):
        open_source(str(root), split="unlabeled")


def test_split_with_val_folder(tmp_path: Path) -> None:
    root = _tree(tmp_path / "v", ["train/a/1.png", "val/a/2.png", "val/b/3.png"])
    assert len(open_source(str(root), split="val")) == 2
    assert len(open_source(str(root), split="test")) == 2  # test falls back to val/
    only_train = _tree(tmp_path / "t", ["train/a/1.png"])
    with pytest.raises(PirlError, match="no test/ or val/ folder"):
        open_source(str(only_train), split="test")


def test_train_beside_other_folders_warns(tmp_path: Path) -> None:
    root = _tree(tmp_path / "m", ["train/1.png", "test/2.png", "extra/3.png"])
    with pytest.warns(UserWarning, match="train/ beside other folders"):
        src = open_source(str(root))
    assert src.classes == ["extra", "test", "train"]


def test_empty_and_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(PirlError, match=f"no images found under {empty}"):
        open_source(str(empty))
    with pytest.raises(PirlError, match="data path not found: "):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(PirlError, match="cifar10, cifar100, stl10, stl10-unlabeled, imagenet"):
        open_source("mnist-typo")
    other = tmp_path / "x.csv"
    other.write_text("a,b")
    with pytest.raises(PirlError, match="not a folder or a"):
        open_source(str(other))


def test_bad_image_surfaces_as_bad_image_error(tmp_path: Path) -> None:
    root = _tree(tmp_path / "b", ["a.png"])
    (root / "b.jpg").write_bytes(b"")
    src = open_source(str(root))
    src.load(0)
    with pytest.raises(BadImageError, match="b.jpg: empty file"):
        src.load(1)


def test_folder_source_is_picklable(tmp_path: Path) -> None:
    root = _tree(tmp_path / "p", ["x/a.png", "y/b.png"])
    src = open_source(str(root))
    clone = pickle.loads(pickle.dumps(src))
    assert clone.paths == src.paths and clone.labels == src.labels and clone.classes == src.classes
    assert clone.load(1).size == (4, 3)


def test_archives(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree", ["cifar/train/cat/1.png", "cifar/train/dog/2.png", "cifar/test/cat/3.png"])
    tgz = tmp_path / "cifar.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root / "cifar", arcname="cifar")  # single top-level folder
    cache = tmp_path / "cache"
    train = open_source(str(tgz), cache_dir=str(cache))
    assert len(train) == 2 and train.classes == ["cat", "dog"]
    assert len(open_source(str(tgz), split="test", cache_dir=str(cache))) == 1
    assert len(list(cache.iterdir())) == 1  # extracted once

    zpath = tmp_path / "flat.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for rel in ["cifar/train/cat/1.png", "cifar/test/cat/3.png"]:
            zf.write(root / rel, arcname=rel.split("/", 1)[1])
        zf.writestr("__MACOSX/train/._junk.png", b"")
    test = open_source(str(zpath), split="test", cache_dir=str(cache))
    assert len(test) == 1 and test.classes == ["cat"]


def test_array_source() -> None:
    gray = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    src = ArraySource(gray, labels=[1, 0])
    img, label = src[0]
    assert img.mode == "RGB" and img.size == (4, 3) and label == 1
    assert src.classes == ["0", "1"]
    assert np.asarray(img)[2, 3].tolist() == [11, 11, 11]
    assert ArraySource(gray[..., None]).labels is None
    rgba = np.zeros((1, 2, 2, 4), dtype=np.uint8)
    assert np.asarray(ArraySource(rgba)[0][0])[0, 0].tolist() == [255, 255, 255]
    rgb = np.full((1, 2, 2, 3), 7, dtype=np.uint8)
    assert np.asarray(pickle.loads(pickle.dumps(ArraySource(rgb))).load(0))[1, 1].tolist() == [7, 7, 7]
    with pytest.raises(PirlError, match="uint8"):
        ArraySource(gray.astype(np.float32))
    with pytest.raises(PirlError, match="shape"):
        ArraySource(np.zeros((2, 3, 4, 2), dtype=np.uint8))
    with pytest.raises(PirlError, match="labels"):
        ArraySource(gray, labels=[0])


class _FakeTV:
    classes = ["a", "b"]

    def __init__(self) -> None:
        self.targets = [1, 0, 1]

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.new("L", (5, 5), i), self.targets[i]


def test_torchvision_source_wraps_dataset() -> None:
    src = TorchvisionSource(_FakeTV(), name="fake")
    assert len(src) == 3 and src.labels == [1, 0, 1] and src.classes == ["a", "b"]
    img, label = src[2]
    assert img.mode == "RGB" and label == 1
    unlabeled = _FakeTV()
    unlabeled.targets = [-1, -1, -1]
    assert TorchvisionSource(unlabeled).labels is None


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10", "stl10-unlabeled"])
def test_missing_torchvision_data(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"
    with pytest.raises(PirlError) as info:
        open_source(name, root=str(root))
    assert str(info.value) == (
        f"{name} not found under {root}; pass --data-root DIR for an existing copy or --download"
    )
    assert not root.exists() or not any(root.iterdir())


def test_missing_imagenet_and_bad_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PirlError, match="imagenet not found under"):
        open_source("imagenet", root=str(tmp_path), split="val")
    with pytest.raises(PirlError, match="cannot be downloaded"):
        open_source("imagenet", root=str(tmp_path), download=True)
    with pytest.raises(PirlError, match="not available for cifar10"):
        open_source("cifar10", root=str(tmp_path), split="unlabeled")
    with pytest.raises(PirlError, match="not available for stl10-unlabeled"):
        open_source("stl10-unlabeled", root=str(tmp_path), split="test")


def test_default_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PIRL_DATA_ROOT", str(tmp_path / "r"))
    assert default_data_root() == tmp_path / "r"
    monkeypatch.delenv("PIRL_DATA_ROOT")
    monkeypatch.delenv("PIRL_CACHE_DIR", raising=False)
    assert default_data_root() == Path.home() / ".cache" / "pirl" / "datasets"


@pytest.mark.skipif(not os.environ.get("PIRL_TEST_CIFAR"), reason="set PIRL_TEST_CIFAR to the cifar10-jpeg.tar.gz path")
def test_real_cifar10_jpeg_archive(tmp_path: Path) -> None:
    spec = os.environ["PIRL_TEST_CIFAR"]
    train = open_source(spec, cache_dir=str(tmp_path))
    test = open_source(spec, split="test", cache_dir=str(tmp_path))
    assert len(train) == 50_000 and len(test) == 10_000
    assert train.classes == test.classes and len(train.classes) == 10
    assert train.classes[0] == "airplane" and train.classes[-1] == "truck"
    assert np.bincount(test.labels).tolist() == [1000] * 10
    img, label = train[0]
    assert img.size == (32, 32) and img.mode == "RGB" and label == 0
