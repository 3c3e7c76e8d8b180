"""Safe, once-only extraction of .tar / .tar.gz / .tgz / .zip archives into a cache folder."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PureWindowsPath

from pirl.cache import make_temp_dir, used
from pirl.errors import PirlError

__all__ = ["ARCHIVE_SUFFIXES", "default_cache_dir", "is_archive_path", "archive_stem", "extract_archive"]

#: Suffixes recognised as archives (lower case); content decides tar vs zip when extracting.
ARCHIVE_SUFFIXES: tuple[str, ...] = (
    ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip",
)

#: Written into the extraction folder last; its presence means the folder is complete.
MARKER = ".pirl-extracted"

_HAS_TAR_FILTERS = hasattr(tarfile, "data_filter")  # Python 3.12, 3.11.4+, 3.10.12+
_TAR_FILTER_ERROR: type[Exception] | tuple[()] = getattr(tarfile, "FilterError", ())


def default_cache_dir() -> Path:
    """``$PIRL_CACHE_DIR`` if set, else ``~/.cache/pirl``."""
    env = os.environ.get("PIRL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pirl"


def is_archive_path(path: str | os.PathLike) -> bool:
    """True when the file name ends with one of :data:`ARCHIVE_SUFFIXES` (any case)."""
    return os.fspath(path).lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(path: str | os.PathLike) -> str:
    """File name without its archive suffix: ``cifar10-jpeg.tar.gz`` -> ``cifar10-jpeg``."""
    name = os.path.basename(os.fspath(path))
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return os.path.splitext(name)[0] or name


def _cache_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:12]


class _Unsafe(Exception):
    """A member that must not be extracted (message: the reason)."""


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or bool(PureWindowsPath(name).drive)


def _components(name: str) -> list[str]:
    """Split a member name into path components, refusing absolute names."""
    if _is_absolute(name):
        raise _Unsafe("absolute path")
    return [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]


def _resolve(parts: list[str], links: set[str]) -> list[str]:
    """Lexically resolve ``parts`` against the target root; refuse escapes and walks through links.

    Refusing any path that passes *through* a symlink member keeps the lexical result equal to
    what the filesystem would resolve, so the inside-the-target check cannot be fooled by chains.
    """
    stack: list[str] = []
    for i, part in enumerate(parts):
        if part == "..":
            if not stack:
                raise _Unsafe("path escapes the target folder")
            stack.pop()
            continue
        stack.append(part)
        if i < len(parts) - 1 and "/".join(stack) in links:
            raise _Unsafe("path goes through a symlink inside the archive")
    return stack


def _check_tar_members(members: list[tarfile.TarInfo]) -> None:
    links = set()
    for m in members:
        if m.issym() or m.islnk():
            links.add("/".join(_components(m.name)))
    for m in members:
        try:
            parts = _resolve(_components(m.name), links)
            if not parts and not m.isdir():
                raise _Unsafe("empty name")
            if m.issym():
                if _is_absolute(m.linkname):
                    raise _Unsafe(f"symlink to absolute path {m.linkname!r}")
                _resolve(parts[:-1] + _components(m.linkname), links)
            elif m.islnk():
                if _is_absolute(m.linkname):
                    raise _Unsafe(f"hard link to absolute path {m.linkname!r}")
                _resolve(_components(m.linkname), links)
            elif not (m.isreg() or m.isdir()):
                raise _Unsafe("device file, fifo or other special member")
        except _Unsafe as exc:
            raise PirlError(f"refusing to extract archive member {m.name!r}: {exc}") from None


def _check_zip_members(infos: list[zipfile.ZipInfo]) -> None:
    for info in infos:
        try:
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _Unsafe("symlink")
            if mode and stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise _Unsafe("device file, fifo or other special member")
            if not _resolve(_components(info.filename), set()) and not info.is_dir():
                raise _Unsafe("empty name")
        except _Unsafe as exc:
            raise PirlError(f"refusing to extract archive member {info.filename!r}: {exc}") from None


def _extract_tar(tar: tarfile.TarFile, dest: Path) -> None:
    members = tar.getmembers()
    _check_tar_members(members)
    for m in members:
        # Own, sane permissions on every Python; the "data" filter does the same where available.
        m.mode = 0o755 if m.isdir() else (m.mode | 0o600) & 0o755
        m.uid = m.gid = os.getuid() if hasattr(os, "getuid") else 0
        m.uname = m.gname = ""
    kwargs = {"filter": "data"} if _HAS_TAR_FILTERS else {}
    try:
        tar.extractall(dest, members=members, **kwargs)  # type: ignore[arg-type]
    except _TAR_FILTER_ERROR as exc:
        member = getattr(exc, "tarinfo", None)
        name = member.name if member is not None else "?"
        raise PirlError(f"refusing to extract archive member {name!r}: {exc}") from None


def _extract_zip(zf: zipfile.ZipFile, dest: Path) -> None:
    infos = zf.infolist()
    _check_zip_members(infos)
    zf.extractall(dest, members=infos)


_READ_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, EOFError,
    NotImplementedError, RuntimeError,  # zip: unsupported compression, encrypted member
)


def _extract_into(archive: Path, dest: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            _extract_zip(zf, dest)
        return
    with tarfile.open(archive, mode="r:*") as tar:
        _extract_tar(tar, dest)


def extract_archive(archive_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Extract a tar(.gz/.bz2/.xz) or zip archive once and return the extracted folder.

    The folder is ``cache_dir/<stem>-<hash of (absolute path, size, mtime)>``; extraction goes to
    a temporary folder renamed into place, so concurrent or interrupted runs never see a partial
    tree, and later calls return at once. Members with absolute paths, ``..`` escapes, links out of
    the folder, device files or fifos (and zip symlinks) are refused with :class:`PirlError`.
    ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    archive = Path(os.path.expanduser(os.fspath(archive_path)))
    if not archive.is_file():
        raise PirlError(f"archive not found: {archive}")
    cache = Path(os.path.expanduser(os.fspath(cache_dir))) if cache_dir is not None else default_cache_dir()
    final = cache / f"{archive_stem(archive)}-{_cache_key(archive)}"
    if (final / MARKER).is_file():
        return used(final)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(cache, final.name)
    except OSError as exc:
        raise PirlError(f"cannot create cache folder {cache}: {exc.strerror or exc} (set PIRL_CACHE_DIR)") from None
    try:
        try:
            _extract_into(archive, tmp)
        except PirlError:
            raise
        except _READ_ERRORS as exc:
            raise PirlError(f"{archive}: not a readable tar/zip archive ({exc})") from None
        except OSError as exc:
            if exc.errno is None:  # bz2/lzma data errors; real I/O failures carry an errno
                raise PirlError(f"{archive}: not a readable tar/zip archive ({exc})") from None
            raise PirlError(f"{archive}: extraction into {cache} failed: {exc}") from None
        (tmp / MARKER).write_text(f"{archive.resolve()}\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / MARKER).is_file():  # another process finished first
                return final
            shutil.rmtree(final, ignore_errors=True)  # leftover without marker: not ours to keep
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return used(final)
