"""Image sources: the raw images (and labels) of a dataset, one per index, without transforms."""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image

from pirl.data.archive import ARCHIVE_SUFFIXES, default_cache_dir, extract_archive, is_archive_path
from pirl.data.images import IMAGE_EXTENSIONS, BadImageError, is_image_file, load_rgb, to_rgb
from pirl.errors import PirlError

__all__ = [
    "ImageSource",
    "FolderSource",
    "TorchvisionSource",
    "ArraySource",
    "BadImageError",
    "DATASET_NAMES",
    "default_data_root",
    "open_source",
    "scan_folder",
]

#: Dataset names accepted by :func:`open_source` besides paths.
DATASET_NAMES: tuple[str, ...] = ("cifar10", "cifar100", "stl10", "stl10-unlabeled", "imagenet")

_SPLIT_DIRS = ("train", "test", "val")
_SKIP_DIRS = frozenset({"__MACOSX"})  # resource-fork junk in zips made on macOS


class ImageSource(torch.utils.data.Dataset):
    """Raw images of a dataset, one per index; no transforms.

    ``labels`` holds one class index per image (``-1`` for an unlabeled image inside a partly
    labeled source) or is None when the source has no labels; ``classes`` names the indices.
    """

    labels: list[int] | None = None
    classes: list[str] | None = None
    name: str = "images"

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        """The RGB image at ``index``; raises :class:`BadImageError` when it cannot be decoded."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = self._check_index(index)
        label = self.labels[index] if self.labels is not None else -1
        return self.load(index), label

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for an unlabeled source)."""
        return len(self.classes) if self.classes is not None else 0

    def _check_index(self, index: int) -> int:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} images")
        return i

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} images, {self.num_classes} classes)"


class FolderSource(ImageSource):
    """Image files on disk, decoded with :func:`~pirl.data.images.load_rgb`.

    Paths are packed into one bytes blob plus an offsets array, so that DataLoader workers
    forked from the parent do not copy-on-write millions of small string objects.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        *,
        name: str | None = None,
    ) -> None:
        encoded = [os.fsencode(p) for p in paths]
        if labels is not None and len(labels) != len(encoded):
            raise PirlError(f"{len(labels)} labels given for {len(encoded)} image paths")
        self._blob = b"".join(encoded)
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self.labels = [int(v) for v in labels] if labels is not None else None
        self.classes = list(classes) if classes is not None else None
        self.name = name or f"{len(encoded)} image files"

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def path(self, index: int) -> str:
        """File path of the image at ``index``."""
        i = self._check_index(index)
        return os.fsdecode(self._blob[self._offsets[i] : self._offsets[i + 1]])

    @property
    def paths(self) -> list[str]:
        """All file paths (builds a new list on each access)."""
        return [self.path(i) for i in range(len(self))]

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.path(index))


class TorchvisionSource(ImageSource):
    """A torchvision dataset returning ``(PIL image, target)``; its transforms should be None."""

    def __init__(self, dataset: Any, *, name: str | None = None) -> None:
        self.dataset = dataset
        self.labels = _dataset_labels(dataset)
        self.classes = _dataset_classes(dataset) if self.labels is not None else None
        self.name = name or type(dataset).__name__

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> Image.Image:
        i = self._check_index(index)
        samples = getattr(self.dataset, "samples", None)
        if samples is not None:  # file-backed (ImageFolder, ImageNet): use the robust decoder
            return load_rgb(samples[i][0])
        img = self.dataset[i][0]
        if not isinstance(img, Image.Image):
            raise PirlError(f"{self.name}: item {i} is a {type(img).__name__}, not a PIL image")
        return to_rgb(img)


def _dataset_labels(dataset: Any) -> list[int] | None:
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None:
            labels = [int(v) for v in np.asarray(values).reshape(-1)]
            return None if all(v < 0 for v in labels) else labels
    return None


def _dataset_classes(dataset: Any) -> list[str] | None:
    classes = getattr(dataset, "classes", None)
    if classes is None:
        return None
    names = [c[0] if isinstance(c, (tuple, list)) else str(c) for c in classes]
    wnids = getattr(dataset, "wnids", None)
    if wnids is not None and len(set(names)) < len(names):  # ImageNet has two "crane"s, ...
        counts = {n: names.count(n) for n in names}
        names = [f"{n} ({w})" if counts[n] > 1 else n for n, w in zip(names, wnids)]
    return names


class ArraySource(ImageSource):
    """In-memory uint8 images: ``N×H×W`` (gray), ``N×H×W×1``, ``N×H×W×3`` or ``N×H×W×4``."""

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray | None = None,
        classes: Sequence[str] | None = None,
        *,
        name: str | None = None,
    ) -> None:
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            raise PirlError(f"image array must be uint8, got {arr.dtype}")
        if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] not in (1, 3, 4)):
            raise PirlError(f"image array must be N×H×W or N×H×W×C with C in 1, 3, 4; got shape {arr.shape}")
        self.images = arr
        if labels is not None:
            labels = [int(v) for v in np.asarray(labels).reshape(-1)]
            if len(labels) != len(arr):
                raise PirlError(f"{len(labels)} labels given for {len(arr)} images")
        self.labels = labels
        if classes is None and labels is not None:
            classes = [str(c) for c in range(max(labels, default=-1) + 1)]
        self.classes = list(classes) if classes is not None and labels is not None else None
        self.name = name or f"array of {len(arr)} images"

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        a = self.images[self._check_index(index)]
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        return to_rgb(Image.fromarray(np.ascontiguousarray(a)))


# --------------------------------------------------------------------------- folders


def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in _SKIP_DIRS


def _list_dir(path: str) -> tuple[list[str], list[str]]:
    """Sorted visible (image files, subfolders) names of one folder."""
    images, dirs = [], []
    try:
        with os.scandir(path) as it:
            for entry in it:
                if not _visible(entry.name):
                    continue
                try:
                    if entry.is_dir():
                        dirs.append(entry.name)
                    elif is_image_file(entry.name) and entry.is_file():
                        images.append(entry.name)
                except OSError:
                    continue
    except OSError as exc:
        raise PirlError(f"cannot read folder {path}: {exc.strerror or exc}") from None
    return sorted(images), sorted(dirs)


def scan_folder(root: str | os.PathLike) -> list[str]:
    """All visible image files below ``root``, recursively, in sorted (deterministic) order.

    Hidden files and folders (leading ``.``) and ``__MACOSX`` are skipped; symlinked folders are
    followed once (cycles ignored); unreadable subfolders are skipped with a warning.
    """
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    top = os.fspath(root)
    stack = [top]  # an explicit stack: folders nested thousands deep must not hit Python's recursion limit
    while stack:
        path = stack.pop()
        try:
            st = os.stat(path)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        try:
            images, dirs = _list_dir(path)
        except PirlError as exc:
            if path == top:
                raise
            warnings.warn(f"skipping unreadable folder: {exc}", stacklevel=2)
            continue
        out.extend(os.path.join(path, name) for name in images)
        stack.extend(os.path.join(path, name) for name in reversed(dirs))  # popped in sorted order
    return out


def _select_folder(root: Path, split: str) -> tuple[Path, str | None]:
    """Apply the wrapper-folder and split rules; returns (image folder, split used or None)."""
    folder = root
    while True:
        images, dirs = _list_dir(str(folder))
        if images or not dirs:
            return folder, None
        if set(dirs) <= set(_SPLIT_DIRS):
            wanted = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}[split]
            for d in wanted:
                if d in dirs:
                    return folder / d, d
            raise PirlError(
                f"{folder} has no {' or '.join(d + '/' for d in wanted)} folder for split {split!r} "
                f"(found: {', '.join(d + '/' for d in dirs)})"
            )
        if len(dirs) == 1:
            folder = folder / dirs[0]
            continue
        if "train" in dirs:
            warnings.warn(
                f"{folder} has train/ beside other folders ({', '.join(dirs)}); "
                "treating every subfolder as a class, not as a split",
                stacklevel=3,
            )
        return folder, None


def _folder_source(root: Path, split: str, shown: str) -> FolderSource:
    if split not in _SPLIT_DIRS:
        raise PirlError(f"split must be one of train, test, val for a folder or archive, got {split!r}")
    folder, used = _select_folder(root, split)
    files = scan_folder(folder)
    if not files:
        raise PirlError(f"no images found under {shown} (looked for {' '.join(sorted(IMAGE_EXTENSIONS))})")
    prefix = os.path.join(os.fspath(folder), "")
    rel_parts = [f[len(prefix) :].split(os.sep) for f in files]
    where = shown if folder == root else f"{shown} ({folder.relative_to(root).as_posix() or '.'})"
    if all(len(parts) >= 2 for parts in rel_parts):
        classes = sorted({parts[0] for parts in rel_parts})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[parts[0]] for parts in rel_parts]
        name = f"{where}: {len(files)} images in {len(classes)} classes"
        return FolderSource(files, labels, classes, name=name)
    return FolderSource(files, None, None, name=f"{where}: {len(files)} unlabeled images")


# --------------------------------------------------------------------------- torchvision names


def default_data_root() -> Path:
    """``$PIRL_DATA_ROOT`` if set, else ``<cache dir>/datasets`` (``~/.cache/pirl/datasets``)."""
    env = os.environ.get("PIRL_DATA_ROOT")
    return Path(env).expanduser() if env else default_cache_dir() / "datasets"


def _torchvision_source(key: str, root: Path, split: str, download: bool) -> TorchvisionSource:
    import torchvision.datasets as tvd

    def bad_split(allowed: str) -> PirlError:
        return PirlError(f"split {split!r} is not available for {key}; use one of {allowed}")

    if key in ("cifar10", "cifar100"):
        if split not in ("train", "test", "val"):
            raise bad_split("train, test (val means test)")
        cls = tvd.CIFAR10 if key == "cifar10" else tvd.CIFAR100
        make = lambda: cls(str(root), train=split == "train", download=download)  # noqa: E731
        split_used = "train" if split == "train" else "test"
    elif key in ("stl10", "stl10-unlabeled"):
        if key == "stl10-unlabeled":
            if split not in ("train", "unlabeled"):
                raise bad_split("unlabeled (for the test split use stl10)")
            split_used = "unlabeled"
        else:
            if split not in ("train", "test", "val", "unlabeled", "train+unlabeled"):
                raise bad_split("train, test, unlabeled, train+unlabeled")
            split_used = "test" if split == "val" else split
        make = lambda: tvd.STL10(str(root), split=split_used, download=download)  # noqa: E731
    else:  # imagenet
        if split not in ("train", "test", "val"):
            raise bad_split("train, val (test means val)")
        split_used = "train" if split == "train" else "val"
        if download:
            raise PirlError(
                "imagenet cannot be downloaded automatically; put ILSVRC2012_img_train.tar, "
                "ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz under a folder and pass --data-root DIR"
            )
        make = lambda: tvd.ImageNet(str(root), split=split_used)  # noqa: E731

    try:
        dataset = make()
    except (RuntimeError, FileNotFoundError) as exc:
        if download and key != "imagenet":
            raise PirlError(f"{key} under {root} is missing or corrupt even after --download ({exc})") from None
        hint = "--data-root DIR for an existing copy" + ("" if key == "imagenet" else " or --download")
        raise PirlError(f"{key} not found under {root}; pass {hint}") from None
    except OSError as exc:  # network failures while downloading, unwritable root
        raise PirlError(f"could not get {key} into {root}: {exc}") from None
    return TorchvisionSource(dataset, name=f"{key} ({split_used} split, {root})")


# --------------------------------------------------------------------------- entry point


def open_source(
    spec: str | os.PathLike,
    *,
    root: str | None = None,
    download: bool = False,
    split: str = "train",
    cache_dir: str | None = None,
) -> ImageSource:
    """Open a dataset given as a folder, an archive or a torchvision dataset name.

    * **Folder**: wrapper folders holding a single subfolder (and no images) are descended
      into. Then, if the folder's visible subfolders are all named ``train``, ``test`` or ``val``
      (and no images sit beside them), ``split`` picks one: ``"train"`` -> ``train/``;
      ``"test"`` -> ``test/``, else ``val/``; ``"val"`` -> ``val/``, else ``test/``; a missing
      one is an error. Otherwise ``split`` is ignored, so a path straight to ``.../train`` or
      ``.../test`` works too. In the chosen folder, when every image sits below a first-level
      subfolder, those subfolders are the classes (sorted names -> 0, 1, ...); otherwise (images
      directly in the folder, or mixed) all images are taken recursively, unlabeled. Order is
      sorted by path; hidden entries and ``__MACOSX`` are skipped.
    * **Archive** (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``, ``.zip``): extracted
      once into ``cache_dir`` (default ``$PIRL_CACHE_DIR`` or ``~/.cache/pirl``), then as a folder.
    * **Name** (when no such path exists): ``cifar10``, ``cifar100``, ``stl10`` (splits train,
      test, unlabeled, train+unlabeled), ``stl10-unlabeled``, ``imagenet`` (local copy only), read
      from ``root`` (default ``$PIRL_DATA_ROOT`` or ``~/.cache/pirl/datasets``). ``val`` means
      ``test`` for CIFAR/STL and ``test`` means ``val`` for ImageNet.
    """
    spec = os.fspath(spec)
    path = Path(os.path.abspath(os.path.expanduser(spec)))
    key = spec.strip().lower()
    if not path.exists() and key in DATASET_NAMES:
        data_root = Path(os.path.expanduser(root)) if root else default_data_root()
        return _torchvision_source(key, data_root, split, download)
    if not path.exists():
        if os.sep in spec or "/" in spec or is_archive_path(spec) or is_image_file(spec):
            raise PirlError(f"data path not found: {spec}")
        raise PirlError(
            f"unknown dataset {spec!r} (no such path either); expected a folder of images, a "
            f"{'/'.join(ARCHIVE_SUFFIXES)} archive, or one of: {', '.join(DATASET_NAMES)}"
        )
    if path.is_dir():
        return _folder_source(path, split, spec)
    if is_archive_path(path):
        if split not in _SPLIT_DIRS:
            raise PirlError(f"split must be one of train, test, val for a folder or archive, got {split!r}")
        return _folder_source(extract_archive(path, cache_dir), split, spec)
    raise PirlError(f"{spec}: not a folder or a {'/'.join(ARCHIVE_SUFFIXES)} archive")
