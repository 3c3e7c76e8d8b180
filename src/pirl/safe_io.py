"""Link-safe file writes and capped reads for run folders and caches that other people may have prepared.

A symlink planted in a run folder (``RUN/config.json -> ~/.bashrc``) must not redirect pirl's writes, and a
FIFO or a link to ``/dev/zero`` must not hang or exhaust a reader. Writes here either replace the path
atomically (a temporary file renamed over it: the rename replaces a link, it never follows one) or open it
with ``O_NOFOLLOW``; reads open with ``O_NOFOLLOW | O_NONBLOCK``, accept regular files only and stop at a cap.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from pirl.errors import PirlError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_with",
    "open_append",
    "read_regular",
    "inside",
    "save_figure",
    "printable",
]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def atomic_write_with(
    path: str | os.PathLike, write: Callable[[IO[bytes]], object], *, mode: int = 0o644, fsync: bool = False
) -> None:
    """Write through ``write(file)`` into a temporary file beside ``path`` and rename it over ``path``.

    A symlink at ``path`` is replaced, not followed; readers never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically (never through a link)."""
    atomic_write_with(path, lambda fh: fh.write(data), mode=mode)


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` (UTF-8; undecodable file-name bytes kept as they were)."""
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"), mode=mode)


def open_append(path: str | os.PathLike) -> IO[str]:
    """Open ``path`` for appending text, refusing a symlink or anything but a regular file there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _NONBLOCK, 0o644)
    except OSError:
        if os.path.islink(path):
            raise PirlError(f"{path} is a symbolic link; refusing to write through it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PirlError(f"{path} is not a regular file; refusing to write to it")
    return os.fdopen(fd, "a", encoding="utf-8")


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when ``path``, with every link resolved, lies inside ``root`` (also resolved)."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(os.path.join(base, ""))


def read_regular(path: str | os.PathLike, max_bytes: int, *, root: str | os.PathLike | None = None) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; raises :class:`PirlError` otherwise.

    With ``root``, the file's resolved path must lie inside ``root``. FIFOs, devices and sockets are refused
    without blocking; a file that grows past the cap while read is refused too.
    """
    if root is not None and not inside(path, root):
        raise PirlError(f"{path}: links outside {root}, not read")
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK)
    except OSError as exc:
        raise PirlError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PirlError(f"{path}: not a regular file, not read")
        if st.st_size > max_bytes:
            raise PirlError(f"{path}: larger than the {max_bytes:,}-byte limit, not read")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise PirlError(f"{path}: larger than the {max_bytes:,}-byte limit, not read")
        return b"".join(chunks)
    except OSError as exc:
        raise PirlError(f"{path}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def save_figure(fig: object, path: str | os.PathLike, **kwargs: object) -> None:
    """``fig.savefig`` into memory, then an atomic write of the PNG (a link at ``path`` is replaced)."""
    import io

    buf = io.BytesIO()
    kwargs.setdefault("format", "png")
    fig.savefig(buf, **kwargs)  # type: ignore[attr-defined]
    atomic_write_bytes(path, buf.getvalue())


def printable(text: str) -> str:
    """``text`` safe to print on any terminal: undecodable file-name bytes shown as ``\\xNN`` escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
