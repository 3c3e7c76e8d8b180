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
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from pirl.cache import make_temp_dir, used
from pirl.errors import PirlError

__all__ = [
    "ARCHIVE_SUFFIXES",
    "ArchiveLimits",
    "default_cache_dir",
    "is_archive_path",
    "archive_stem",
    "extract_archive",
]

#: Suffixes recognised as archives (lower case); content decides tar vs zip when extracting.
ARCHIVE_SUFFIXES: tuple[str, ...] = (
    ".tar.gz",
    ".tgz",
    ".tar.bz2",
    ".tbz2",
    ".tar.xz",
    ".txz",
    ".tar",
    ".zip",
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


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what one archive may unpack to; a breach is refused with :class:`PirlError` before writing.

    Defaults come from ``$PIRL_ARCHIVE_MAX_BYTES``, ``$PIRL_ARCHIVE_MAX_MEMBERS`` and
    ``$PIRL_ARCHIVE_MAX_RATIO`` when set. ``max_ratio`` bounds total unpacked bytes over the archive's size
    (JPEG datasets unpack at about 1:1). Sparse tar members are always refused.
    """

    max_bytes: int = 256 << 30  # an ImageNet-1k train tar is about 140 GiB
    max_members: int = 5_000_000
    max_ratio: float = 200.0

    @classmethod
    def from_env(cls) -> ArchiveLimits:
        """The defaults, overridden by the ``$PIRL_ARCHIVE_MAX_*`` variables."""
        values: dict[str, float] = {}
        for name, cast in (("max_bytes", int), ("max_members", int), ("max_ratio", float)):
            raw = os.environ.get(f"PIRL_ARCHIVE_{name.upper()}")
            if raw is None:
                continue
            try:
                value = cast(raw)
            except ValueError:
                raise PirlError(f"PIRL_ARCHIVE_{name.upper()} must be a number, got {raw!r}") from None
            if not value > 0:
                raise PirlError(f"PIRL_ARCHIVE_{name.upper()} must be positive, got {raw!r}")
            values[name] = value
        return cls(**values)  # type: ignore[arg-type]


def _check_totals(archive: Path, count: int, total: int, limits: ArchiveLimits, dest: Path) -> None:
    hint = "raise it with PIRL_ARCHIVE_{} if the archive is trusted"
    if count > limits.max_members:
        raise PirlError(
            f"{archive}: {count:,} members, more than the limit of {limits.max_members:,}; "
            + hint.format("MAX_MEMBERS")
        )
    if total > limits.max_bytes:
        raise PirlError(
            f"{archive}: unpacks to {total:,} bytes, more than the limit of {limits.max_bytes:,}; "
            + hint.format("MAX_BYTES")
        )
    size = max(archive.stat().st_size, 1)
    if total > 1 << 20 and total / size > limits.max_ratio:
        raise PirlError(
            f"{archive}: unpacks to {total / size:,.0f} times its size ({total:,} bytes), more than "
            f"the ratio limit of {limits.max_ratio:g}; " + hint.format("MAX_RATIO")
        )
    try:
        free = shutil.disk_usage(dest).free
    except OSError:
        return
    if total > free:
        raise PirlError(
            f"{archive}: unpacks to {total:,} bytes but only {free:,} are free under {dest.parent} "
            "(set PIRL_CACHE_DIR to a bigger disk)"
        )


_SAMPLE = 1 << 20


def _cache_key(path: Path) -> str:
    """Path, size, mtime, inode, ctime and a digest of the first and last MiB.

    A replacement with the same size and mtime still changes the inode (a new file renamed in) or the ctime
    (rewritten in place, which no user-level tool can set back) and usually the sampled bytes.
    """
    st = path.stat()
    digest = hashlib.sha256()
    digest.update(
        f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_dev}\0{st.st_ino}\0{st.st_ctime_ns}\0".encode(
            "utf-8", "surrogateescape"
        )
    )
    try:
        with open(path, "rb") as fh:
            digest.update(fh.read(_SAMPLE))
            if st.st_size > 2 * _SAMPLE:
                fh.seek(-_SAMPLE, os.SEEK_END)
                digest.update(fh.read(_SAMPLE))
    except OSError as exc:
        raise PirlError(f"cannot read archive {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()[:16]


class _Unsafe(Exception):
    """A member that must not be extracted (message: the reason)."""


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or bool(PureWindowsPath(name).drive)


def _components(name: str, *, allow_up: bool = False) -> list[str]:
    """Split a member name into path components, refusing absolute names (and ``..`` unless allowed)."""
    if _is_absolute(name):
        raise _Unsafe("absolute path")
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]
    if not allow_up and ".." in parts:
        raise _Unsafe("'..' in the member name")
    return parts


def _resolve(parts: list[str], links: set[str]) -> list[str]:
    """Lexically resolve ``parts`` against the target root; refuse escapes and walks through links.

    ``links`` holds the normalised names of link members (member names never hold ``..``), so the
    comparison is between normalised paths on both sides. Refusing any path that passes *through* a link
    member keeps the lexical result equal to what the filesystem would resolve.
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


def _check_tar_members(members: list[tarfile.TarInfo]) -> int:
    """Refuse unsafe members; returns the total bytes the regular members unpack to."""
    links = set()
    total = 0
    for m in members:
        try:
            if m.issym() or m.islnk():
                links.add("/".join(_components(m.name)))
        except _Unsafe as exc:
            raise PirlError(f"refusing to extract archive member {m.name!r}: {exc}") from None
    for m in members:
        try:
            parts = _resolve(_components(m.name), links)
            if not parts and not m.isdir():
                raise _Unsafe("empty name")
            if m.issym():
                if _is_absolute(m.linkname):
                    raise _Unsafe(f"symlink to absolute path {m.linkname!r}")
                _resolve(parts[:-1] + _components(m.linkname, allow_up=True), links)
            elif m.islnk():
                if _is_absolute(m.linkname):
                    raise _Unsafe(f"hard link to absolute path {m.linkname!r}")
                _resolve(_components(m.linkname), links)
            elif m.issparse():
                raise _Unsafe("sparse file (it can unpack to far more than it stores)")
            elif not (m.isreg() or m.isdir()):
                raise _Unsafe("device file, fifo or other special member")
            if m.isreg():
                total += m.size
        except _Unsafe as exc:
            raise PirlError(f"refusing to extract archive member {m.name!r}: {exc}") from None
    return total


def _check_zip_members(infos: list[zipfile.ZipInfo]) -> int:
    total = 0
    for info in infos:
        try:
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _Unsafe("symlink")
            if mode and stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise _Unsafe("device file, fifo or other special member")
            if not _resolve(_components(info.filename), set()) and not info.is_dir():
                raise _Unsafe("empty name")
            total += info.file_size  # zipfile stops reading a member at its declared size
        except _Unsafe as exc:
            raise PirlError(f"refusing to extract archive member {info.filename!r}: {exc}") from None
    return total


def _check_landed(dest: Path, name: str) -> None:
    """After each member: its real path (a link's target, resolved) and its folder's must lie inside ``dest``."""
    base = os.path.realpath(dest)
    target = dest / name
    for where in (os.path.realpath(target.parent), os.path.realpath(target)):
        if where != base and not where.startswith(os.path.join(base, "")):
            raise PirlError(f"refusing to extract archive member {name!r}: it resolves outside the target folder")


def _extract_tar(tar: tarfile.TarFile, dest: Path, archive: Path, limits: ArchiveLimits) -> None:
    members = tar.getmembers()
    total = _check_tar_members(members)
    _check_totals(archive, len(members), total, limits, dest)
    base = os.path.realpath(dest)
    for m in members:
        # Own, sane permissions on every Python; the "data" filter does the same where available.
        m.mode = 0o755 if m.isdir() else (m.mode | 0o600) & 0o755
        m.uid = m.gid = os.getuid() if hasattr(os, "getuid") else 0
        m.uname = m.gname = ""
    kwargs = {"filter": "data"} if _HAS_TAR_FILTERS else {}
    for m in members:
        # Where it will be written must already resolve inside: checked before each write, not only after.
        parent = os.path.realpath((dest / m.name).parent)
        if parent != base and not parent.startswith(os.path.join(base, "")):
            raise PirlError(f"refusing to extract archive member {m.name!r}: it resolves outside the target folder")
        try:
            tar.extract(m, dest, **kwargs)  # type: ignore[arg-type]
        except _TAR_FILTER_ERROR as exc:
            raise PirlError(f"refusing to extract archive member {m.name!r}: {exc}") from None
        _check_landed(dest, m.name)


def _extract_zip(zf: zipfile.ZipFile, dest: Path, archive: Path, limits: ArchiveLimits) -> None:
    infos = zf.infolist()
    total = _check_zip_members(infos)
    _check_totals(archive, len(infos), total, limits, dest)
    for info in infos:
        zf.extract(info, dest)
        _check_landed(dest, info.filename)


_READ_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    zipfile.BadZipFile,
    gzip.BadGzipFile,
    zlib.error,
    EOFError,
    NotImplementedError,
    RuntimeError,  # zip: unsupported compression, encrypted member
)


def _extract_into(archive: Path, dest: Path, limits: ArchiveLimits) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            _extract_zip(zf, dest, archive, limits)
        return
    with tarfile.open(archive, mode="r:*") as tar:
        _extract_tar(tar, dest, archive, limits)


def extract_archive(
    archive_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *, limits: ArchiveLimits | None = None
) -> Path:
    """Extract a tar(.gz/.bz2/.xz) or zip archive once and return the extracted folder.

    The folder is ``cache_dir/<stem>-<hash of (absolute path, size, mtime, inode, ctime, first and last
    MiB)>``; extraction goes to
    a temporary folder renamed into place, so concurrent or interrupted runs never see a partial
    tree, and later calls return at once. Members with absolute paths, ``..`` escapes, links out of
    the folder, ``..`` in member names, sparse files, device files or fifos (and zip symlinks) are refused
    with :class:`PirlError`, and so is an archive beyond ``limits`` (default :meth:`ArchiveLimits.from_env`).
    After each member is written its real path is checked to lie inside the folder.
    ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    limits = limits if limits is not None else ArchiveLimits.from_env()
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
            _extract_into(archive, tmp, limits)
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
