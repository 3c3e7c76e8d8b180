"""Tests for pirl.data.archive: once-only, safe extraction."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

import pirl.data.archive as archive_mod
from pirl.data.archive import MARKER, archive_stem, default_cache_dir, extract_archive
from pirl.errors import PirlError

FILES = {"top/a.txt": b"alpha", "top/sub/b.txt": b"beta"}


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"x", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if info.size else None)


def _make_tar(path: Path, entries: list[tuple[str, dict]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, attrs in entries:
            _add(tar, name, **attrs)
    return path


def _make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _listing(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


@pytest.mark.parametrize("kind", ["tar.gz", "tgz", "tar", "zip"])
def test_extracts_once(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / f"data.{kind}"
    if kind == "zip":
        _make_zip(src, FILES)
    else:
        _make_tar(src, [(n, {"data": d}) for n, d in FILES.items()], "w:gz" if "gz" in kind else "w")
    cache = tmp_path / "cache"
    out = extract_archive(src, cache)
    assert out.parent == cache and out.name.startswith("data-")
    assert (out / "top/a.txt").read_bytes() == b"alpha"
    assert (out / "top/sub/b.txt").read_bytes() == b"beta"
    assert (out / MARKER).is_file()
    assert [p.name for p in cache.iterdir()] == [out.name]  # no temp folder left behind

    def boom(*args: object) -> None:
        raise AssertionError("extracted twice")

    monkeypatch.setattr(archive_mod, "_extract_into", boom)
    assert extract_archive(src, cache) == out


def test_changed_archive_gets_new_folder(tmp_path: Path) -> None:
    src = _make_zip(tmp_path / "d.zip", FILES)
    cache = tmp_path / "cache"
    first = extract_archive(src, cache)
    _make_zip(src, {"other.txt": b"new content"})
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    second = extract_archive(src, cache)
    assert second != first and (second / "other.txt").exists()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PIRL_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PIRL_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "pirl"


def test_archive_stem() -> None:
    assert archive_stem("/x/cifar10-jpeg.tar.gz") == "cifar10-jpeg"
    assert archive_stem("a.TGZ") == "a" and archive_stem("b.zip") == "b" and archive_stem("c.tar") == "c"


@pytest.mark.parametrize(
    "entries, culprit",
    [
        ([("ok.txt", {}), ("../evil", {})], "../evil"),
        ([("a/../../evil", {})], "a/../../evil"),
        ([("link", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"})], "link"),
        ([("link", {"type": tarfile.SYMTYPE, "linkname": "../outside"})], "link"),
        ([("hard", {"type": tarfile.LNKTYPE, "linkname": "../outside"})], "hard"),
        ([("fifo", {"type": tarfile.FIFOTYPE})], "fifo"),
        ([("dev", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})], "dev"),
        # symlink inside the target, then a member written through it
        ([("d/up", {"type": tarfile.SYMTYPE, "linkname": ".."}), ("d/up/x", {})], "d/up/x"),
        # chain: each link looks inside lexically but together they leave the target
        (
            [
                ("d/up", {"type": tarfile.SYMTYPE, "linkname": ".."}),
                ("esc", {"type": tarfile.SYMTYPE, "linkname": "d/up/.."}),
            ],
            "esc",
        ),
    ],
)
@pytest.mark.parametrize("tar_filter", [True, False], ids=["with-data-filter", "own-checks-only"])
def test_malicious_tar_refused(
    tmp_path: Path, entries: list, culprit: str, tar_filter: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive_mod, "_HAS_TAR_FILTERS", tar_filter and archive_mod._HAS_TAR_FILTERS)
    src = _make_tar(tmp_path / "bad.tar.gz", entries)
    cache = tmp_path / "box" / "cache"
    with pytest.raises(PirlError) as info:
        extract_archive(src, cache)
    assert repr(culprit) in str(info.value)
    assert _listing(cache) == []  # nothing extracted, temp folder removed
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["cache"]
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()


def test_absolute_member_refused(tmp_path: Path) -> None:
    target = tmp_path / "abs_evil"
    src = _make_tar(tmp_path / "abs.tar", [(str(target), {})], "w")
    with tarfile.open(src) as tar:
        assert tar.getnames() == [str(target)]
    with pytest.raises(PirlError, match="absolute path"):
        extract_archive(src, tmp_path / "cache")
    assert not target.exists()


def test_benign_links_allowed(tmp_path: Path) -> None:
    src = _make_tar(
        tmp_path / "ok.tar",
        [
            ("img/a.txt", {"data": b"A"}),
            ("alias.txt", {"type": tarfile.SYMTYPE, "linkname": "img/a.txt"}),
            ("img/up.txt", {"type": tarfile.SYMTYPE, "linkname": "../alias.txt"}),
            ("hard.txt", {"type": tarfile.LNKTYPE, "linkname": "img/a.txt"}),
        ],
        "w",
    )
    out = extract_archive(src, tmp_path / "cache")
    assert (out / "alias.txt").read_bytes() == b"A"
    assert (out / "img/up.txt").read_bytes() == b"A"
    assert (out / "hard.txt").read_bytes() == b"A"


def test_zip_traversal_refused(tmp_path: Path) -> None:
    src = _make_zip(tmp_path / "bad.zip", {"fine.txt": b"ok", "../evil.txt": b"pwned"})
    cache = tmp_path / "box" / "cache"
    with pytest.raises(PirlError, match=r"'\.\./evil\.txt'"):
        extract_archive(src, cache)
    assert not (tmp_path / "box" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert _listing(cache) == []


def test_zip_absolute_and_symlink_refused(tmp_path: Path) -> None:
    src = _make_zip(tmp_path / "abs.zip", {"/etc/evil": b"x"})
    with pytest.raises(PirlError, match="absolute path"):
        extract_archive(src, tmp_path / "cache")
    link = zipfile.ZipInfo("link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    src = tmp_path / "link.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(PirlError, match="'link': symlink"):
        extract_archive(src, tmp_path / "cache")


def test_corrupt_archives(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"definitely not an archive" * 50)
    with pytest.raises(PirlError, match=r"junk\.tar\.gz: not a readable tar/zip archive"):
        extract_archive(junk, tmp_path / "cache")
    good = _make_tar(tmp_path / "g.tar.gz", [(f"f{i}", {"data": os.urandom(4000)}) for i in range(20)])
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(PirlError, match="not a readable tar/zip archive"):
        extract_archive(cut, tmp_path / "cache")
    assert _listing(tmp_path / "cache") == []


def test_missing_archive(tmp_path: Path) -> None:
    with pytest.raises(PirlError, match="archive not found"):
        extract_archive(tmp_path / "nope.zip", tmp_path / "cache")
