"""Undecodable images: the run stops when too many are known, and lists them in ``bad_images.txt``."""

from __future__ import annotations

from pathlib import Path

from pirl.config import Config
from pirl.data.dataset import ViewDataset
from pirl.errors import PirlError
from pirl.safe_io import atomic_write_text


def check_bad_fraction(cfg: Config, bad: set[int], num_samples: int, run_dir: Path) -> None:
    """Stop as soon as more than ``data.max_bad_fraction`` of the whole dataset is known to be undecodable."""
    if len(bad) > cfg.data.max_bad_fraction * num_samples:
        raise PirlError(
            f"{len(bad)} of {num_samples} images could not be decoded, more than "
            f"data.max_bad_fraction={cfg.data.max_bad_fraction}; fix or remove them (listed in "
            f"{run_dir / 'bad_images.txt'}), or raise the limit"
        )


def write_bad_images(run_dir: Path, bad: set[int], dataset: ViewDataset) -> list[str]:
    """List undecodable files (paths, or indices for in-memory sources) in ``bad_images.txt``; returns them."""
    if not bad:
        return []
    source = dataset.source
    names = []
    for pos in sorted(bad):
        index = dataset.indices[pos] if dataset.indices is not None else pos
        names.append(str(source.path(index)) if hasattr(source, "path") else f"index {index}")
    atomic_write_text(run_dir / "bad_images.txt", "\n".join(names) + "\n")  # file names kept byte for byte
    return names
