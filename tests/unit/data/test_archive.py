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


# --------------------------------------------------------------------------- crafted inputs from a review


def test_dotdot_link_name_cannot_bypass_the_link_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A link stored as ``p/q/a/../s`` used to escape the check done on ``p/q/s``; with tarfile's own
    filter switched off, pirl's check alone must refuse it and write nothing outside the cache."""
    monkeypatch.setattr(archive_mod, "_HAS_TAR_FILTERS", False)
    src = _make_tar(
        tmp_path / "bypass.tar",
        [
            ("p/q/a", {"type": tarfile.DIRTYPE}),
            ("p/q/a/../s", {"type": tarfile.SYMTYPE, "linkname": "../.."}),
            ("p/q/s/../../X", {"data": b"pwned"}),
        ],
        "w",
    )
    cache = tmp_path / "box" / "cache"
    with pytest.raises(PirlError, match=r"'p/q/a/\.\./s'.*'\.\.' in the member name"):
        extract_archive(src, cache)
    assert _listing(cache) == []
    assert not any(p.name == "X" for p in tmp_path.rglob("*"))


def test_link_escaping_on_disk_is_caught_after_extraction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``a\\b`` reads as ``a/b`` to the lexical check (inside) but is one name on disk, where ``..`` leaves the
    folder: the real-path check after each member refuses it, with tarfile's filter off."""
    monkeypatch.setattr(archive_mod, "_HAS_TAR_FILTERS", False)
    src = _make_tar(
        tmp_path / "slash.tar",
        [("a\\b", {"type": tarfile.SYMTYPE, "linkname": ".."}), ("ok.txt", {"data": b"fine"})],
        "w",
    )
    cache = tmp_path / "box" / "cache"
    with pytest.raises(PirlError, match="resolves outside the target folder"):
        extract_archive(src, cache)
    assert _listing(cache) == []


def _sparse_tar(path: Path, real_size: int) -> Path:
    """A GNU sparse member storing 512 bytes but claiming ``real_size`` (tarfile cannot write these)."""
    info = tarfile.TarInfo("hole.bin")
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 512
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:398] = b"%012o" % (real_size - 512)  # one data block at the very end
    header[398:410] = b"%011o\0" % 512
    header[483:495] = b"%012o" % real_size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    path.write_bytes(bytes(header) + b"z" * 512 + b"\0" * 1024)
    with tarfile.open(path) as tar:  # tarfile reads it as a sparse member of the claimed size
        (member,) = tar.getmembers()
        assert member.issparse() and member.size == real_size
    return path


def test_sparse_member_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive_mod, "_HAS_TAR_FILTERS", False)
    src = _sparse_tar(tmp_path / "sparse.tar", 32 << 30)
    assert src.stat().st_size < 4096
    with pytest.raises(PirlError, match="'hole.bin': sparse file"):
        extract_archive(src, tmp_path / "cache")
    assert _listing(tmp_path / "cache") == []


def test_zip_bomb_refused_by_ratio(tmp_path: Path) -> None:
    src = tmp_path / "bomb.zip"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.png", b"\0" * (8 << 20))
    assert src.stat().st_size < 64 << 10
    with pytest.raises(PirlError, match=r"unpacks to [\d,]+ times its size .* PIRL_ARCHIVE_MAX_RATIO"):
        extract_archive(src, tmp_path / "cache")
    assert _listing(tmp_path / "cache") == []
    # a trusted archive passes once the limit is raised
    out = extract_archive(src, tmp_path / "cache", limits=archive_mod.ArchiveLimits(max_ratio=1e6))
    assert (out / "zeros.png").stat().st_size == 8 << 20


def test_member_count_and_total_bytes_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _make_tar(tmp_path / "many.tar", [(f"d/{i}.txt", {"data": b"12345678"}) for i in range(20)], "w")
    monkeypatch.setenv("PIRL_ARCHIVE_MAX_MEMBERS", "10")
    with pytest.raises(PirlError, match="20 members, more than the limit of 10; .*PIRL_ARCHIVE_MAX_MEMBERS"):
        extract_archive(src, tmp_path / "cache")
    monkeypatch.delenv("PIRL_ARCHIVE_MAX_MEMBERS")
    monkeypatch.setenv("PIRL_ARCHIVE_MAX_BYTES", "100")
    with pytest.raises(PirlError, match="unpacks to 160 bytes, more than the limit of 100"):
        extract_archive(src, tmp_path / "cache")
    monkeypatch.setenv("PIRL_ARCHIVE_MAX_BYTES", "lots")
    with pytest.raises(PirlError, match="PIRL_ARCHIVE_MAX_BYTES must be a number"):
        extract_archive(src, tmp_path / "cache")
    monkeypatch.delenv("PIRL_ARCHIVE_MAX_BYTES")
    assert len(list((extract_archive(src, tmp_path / "cache") / "d").iterdir())) == 20


def test_same_size_same_mtime_replacement_gets_new_folder(tmp_path: Path) -> None:
    src = _make_tar(tmp_path / "data.tar", [("top/a.txt", {"data": b"old!"})], "w")
    st = src.stat()
    first = extract_archive(src, tmp_path / "cache")
    replacement = _make_tar(tmp_path / "new.tar", [("top/a.txt", {"data": b"new!"})], "w")
    assert replacement.stat().st_size == st.st_size
    os.replace(replacement, src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime as the old archive
    second = extract_archive(src, tmp_path / "cache")
    assert second != first and (second / "top/a.txt").read_bytes() == b"new!"
