"""Housekeeping of the caches under ``$PIRL_CACHE_DIR`` (default ``~/.cache/pirl``).

Entries are the extracted archives (``<stem>-<hash>/``) and the feature caches (``features/<hash>/``).
``PIRL_CACHE_MAX_GB`` bounds their total size: after an entry is used, the least recently used others are
removed until the total fits (the entry just used always stays). Temporary folders of an extraction are
named ``.tmp-<name>-<host>-<pid>-...``; one whose process is gone is removed the next time an extraction
starts. ``datasets/`` (torchvision downloads) is never touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from pirl.errors import PirlError

TEMP_PREFIX = ".tmp-"
FEATURES = "features"
KEPT = ("datasets",)
STALE_UNKNOWN_S = 24 * 3600  # a temporary folder without a readable owner is removed after a day


def cache_root() -> Path:
    from pirl.data.archive import default_cache_dir

    return default_cache_dir()


def max_bytes() -> int | None:
    """``PIRL_CACHE_MAX_GB`` in bytes, or None (no bound)."""
    value = os.environ.get("PIRL_CACHE_MAX_GB", "").strip()
    if not value:
        return None
    try:
        gb = float(value)
    except ValueError:
        raise PirlError(f"PIRL_CACHE_MAX_GB={value!r} is not a number of gigabytes") from None
    if gb < 0:
        raise PirlError(f"PIRL_CACHE_MAX_GB={value!r} must not be negative")
    return int(gb * 1e9)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def entries(root: Path) -> list[Path]:
    """The cache entries under ``root``, least recently used first."""
    found: list[Path] = []
    if not root.is_dir():
        return found
    for child in root.iterdir():
        if child.name.startswith((TEMP_PREFIX, ".")) or child.name in KEPT or not child.is_dir():
            continue
        if child.name == FEATURES:
            found.extend(c for c in child.iterdir() if c.is_dir() and not c.name.startswith("."))
        else:
            found.append(child)
    return sorted(found, key=lambda p: p.stat().st_mtime)


def used(entry: Path, root: Path | None = None) -> Path:
    """Mark ``entry`` as just used and bound the cache it belongs to; returns ``entry`` (a one-line hook)."""
    entry = Path(entry)
    try:
        os.utime(entry)
    except OSError:
        pass
    limit = max_bytes()
    if limit is None:
        return entry
    if root is None:
        default = cache_root()
        root = default if entry.resolve().is_relative_to(default.resolve()) else entry.parent
        if root.name == FEATURES and root.parent != root:
            root = root.parent
    items = [(p, _size(p)) for p in entries(root)]
    total = sum(size for _, size in items)
    for path, size in items:
        if total <= limit:
            break
        if path.resolve() == entry.resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        total -= size
    return entry


def _owner_gone(name: str) -> bool:
    """For ``.tmp-<name>-<host>-<pid>-<random>``: is ``pid`` on this host gone?"""
    parts = name.rsplit("-", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return False
    host, pid = parts[1], int(parts[2])
    if host != socket.gethostname().replace("-", "_"):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temps(root: Path) -> list[Path]:
    """Remove the temporary folders that killed extractions left in ``root``; returns them."""
    removed = []
    if not root.is_dir():
        return removed
    now = time.time()
    for child in root.iterdir():
        if not child.name.startswith(TEMP_PREFIX) or not child.is_dir():
            continue
        owned = child.name.rsplit("-", 3)
        unknown = len(owned) != 4 or not owned[2].isdigit()
        if _owner_gone(child.name) or (unknown and now - child.stat().st_mtime > STALE_UNKNOWN_S):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def make_temp_dir(root: Path, name: str) -> Path:
    """A temporary folder in ``root`` named after its owner (host, process id); stale ones are removed first."""
    root = Path(root)
    remove_stale_temps(root)
    host = socket.gethostname().replace("-", "_")
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}-{host}-{os.getpid()}-", dir=root))


def cache_info(root: Path | None = None) -> dict:
    root = Path(root) if root is not None else cache_root()
    items = entries(root)
    return {"root": str(root), "entries": len(items), "bytes": sum(_size(p) for p in items), "max_bytes": max_bytes()}


def clear_cache(root: Path | None = None) -> dict:
    """Remove every cache entry and temporary folder under ``root`` (not ``datasets/``)."""
    root = Path(root) if root is not None else cache_root()
    items = entries(root)
    if root.is_dir():
        items += [c for c in root.iterdir() if c.name.startswith(TEMP_PREFIX) and c.is_dir()]
    freed = 0
    for path in items:
        freed += _size(path)
        shutil.rmtree(path, ignore_errors=True)
    return {"root": str(root), "entries": len(items), "bytes": freed}
