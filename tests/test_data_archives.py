"""Checked downloads (urllib monkeypatched, no network) and safe extraction of crafted archives."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from lowshot.data.archives import download_url, md5sum, safe_extract
from lowshot.errors import DataError

PAYLOAD = b"lowshot test payload\n" * 1000
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Response(io.BytesIO):
    def __init__(self, data: bytes, length: int | None = None) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data) if length is None else length)}


def _serve(monkeypatch: pytest.MonkeyPatch, data: bytes = PAYLOAD, length: int | None = None) -> list[str]:
    calls: list[str] = []

    def fake_urlopen(url: str, timeout: float = 0) -> _Response:
        calls.append(url)
        return _Response(data, length)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return calls


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_md5sum_known_value(tmp_path: Path) -> None:
    (tmp_path / "abc").write_bytes(b"abc")
    assert md5sum(tmp_path / "abc") == "900150983cd24fb0d6963f7d28e17f72"  # RFC 1321 test vector


def test_download_ok_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _serve(monkeypatch)
    dest = tmp_path / "sub" / "file.bin"
    assert download_url("http://example.invalid/file.bin", dest, md5=PAYLOAD_MD5) == dest
    assert dest.read_bytes() == PAYLOAD and calls == ["http://example.invalid/file.bin"]
    download_url("http://example.invalid/file.bin", dest, md5=PAYLOAD_MD5.upper())
    assert len(calls) == 1  # matching file is kept, not fetched again
    assert _leftovers(dest.parent) == []


def test_download_checksum_mismatch_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(monkeypatch)
    dest = tmp_path / "file.bin"
    with pytest.raises(DataError, match=r"checksum mismatch for http://example.invalid/x.*file\.bin"):
        download_url("http://example.invalid/x", dest, md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_download_wrong_existing_file_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _serve(monkeypatch)
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"stale")
    download_url("http://example.invalid/x", dest, md5=PAYLOAD_MD5)
    assert dest.read_bytes() == PAYLOAD and len(calls) == 1


def test_download_truncated_and_network_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(monkeypatch, PAYLOAD[:100], length=len(PAYLOAD))
    with pytest.raises(DataError, match="truncated"):
        download_url("http://example.invalid/x", tmp_path / "a.bin")

    def broken(url: str, timeout: float = 0) -> None:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", broken)
    with pytest.raises(DataError, match=r"http://example.invalid/y.*no route to host"):
        download_url("http://example.invalid/y", tmp_path / "b.bin")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- extraction

def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def _tar(path: Path, members: list[tuple[str, str, str | bytes]]) -> Path:
    """members: (name, kind in file/dir/sym/hard/chr, data-or-linkname)."""
    with tarfile.open(path, "w:gz") as tf:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                         "chr": tarfile.CHRTYPE}[kind]
            if kind in ("sym", "hard"):
                info.linkname = str(payload)
            tf.addfile(info)
    return path


def test_good_zip(tmp_path: Path) -> None:
    arc = _zip(tmp_path / "good.zip", {"top/": b"", "top/a.txt": b"A", "top/sub/b.txt": b"BB"})
    dest = safe_extract(arc, tmp_path / "out")
    assert (dest / "top" / "a.txt").read_bytes() == b"A"
    assert (dest / "top" / "sub" / "b.txt").read_bytes() == b"BB"
    assert _leftovers(tmp_path) == []


def test_good_tar_with_internal_links_into_empty_dest(tmp_path: Path) -> None:
    arc = _tar(tmp_path / "good.tar.gz", [("d", "dir", ""), ("d/x.txt", "file", "X"),
                                          ("d/link", "sym", "x.txt"), ("d/hard", "hard", "d/x.txt")])
    (tmp_path / "out").mkdir()  # an empty destination is allowed
    dest = safe_extract(arc, tmp_path / "out")
    assert (dest / "d" / "link").is_symlink() and (dest / "d" / "link").read_text() == "X"
    assert (dest / "d" / "hard").read_text() == "X" and not (dest / "d" / "hard").is_symlink()


MALICIOUS_ZIPS = {
    "dotdot": ({"ok.txt": b"fine", "../evil.txt": b"pwned"}, "'..' path component"),
    "absolute": ({"ok.txt": b"fine", "/tmp/evil_abs.txt": b"pwned"}, "absolute path"),
    "backslash-dotdot": ({"..\\evil.txt": b"pwned"}, "'..' path component"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS_ZIPS))
def test_malicious_zip_rejected_without_trace(tmp_path: Path, case: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    entries, reason = MALICIOUS_ZIPS[case]
    arc = _zip(tmp_path / "bad.zip", entries)
    with pytest.raises(DataError, match=r"bad\.zip: " + reason):
        safe_extract(arc, work / "out")
    assert list(work.iterdir()) == []  # neither dest nor temp dir left
    assert not (tmp_path / "evil.txt").exists()


MALICIOUS_TARS = {
    "symlink-escape": ([("ok.txt", "file", "fine"), ("esc", "sym", "../../outside")], "points outside"),
    "symlink-absolute": ([("esc", "sym", "/etc")], "absolute target"),
    "hardlink-escape": ([("h", "hard", "../outside.txt")], "points outside"),
    "hardlink-absolute": ([("h", "hard", "/etc/passwd")], "points outside"),
    "through-symlink": ([("d", "dir", ""), ("d/l", "sym", "."), ("d/l/x.txt", "file", "x")],
                        "path goes through a link"),
    "symlink-chain": ([("a", "sym", "."), ("b", "sym", "a/..")], "resolves outside"),
    "device": ([("dev", "chr", "")], "device"),
    "dotdot": ([("../evil.txt", "file", "pwned")], "'..' path component"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS_TARS))
def test_malicious_tar_rejected_without_trace(tmp_path: Path, case: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    members, reason = MALICIOUS_TARS[case]
    arc = _tar(tmp_path / "bad.tar.gz", members)
    with pytest.raises(DataError, match=r"bad\.tar\.gz: " + reason):
        safe_extract(arc, work / "out")
    assert list(work.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_escape_rejected(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr(info, "../../etc")
    with pytest.raises(DataError, match=r"bad\.zip: points outside"):
        safe_extract(tmp_path / "bad.zip", tmp_path / "out")
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_extract_refuses_nonempty_dest_and_garbage(tmp_path: Path) -> None:
    arc = _zip(tmp_path / "good.zip", {"a.txt": b"A"})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        safe_extract(arc, tmp_path / "full")
    assert (tmp_path / "full" / "keep").read_text() == "mine"
    (tmp_path / "junk.zip").write_bytes(os.urandom(64))
    with pytest.raises(DataError, match="neither a zip nor a tar"):
        safe_extract(tmp_path / "junk.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_tar_leaves_nothing(tmp_path: Path) -> None:
    arc = _tar(tmp_path / "t.tar.gz", [("a.bin", "file", os.urandom(200_000))])
    data = arc.read_bytes()
    arc.write_bytes(data[: len(data) // 2])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(DataError, match="t.tar.gz"):
        safe_extract(arc, work / "out")
    assert list(work.iterdir()) == []
