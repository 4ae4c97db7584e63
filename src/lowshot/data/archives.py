"""Checked downloads and safe archive extraction.

Datasets come from the internet as archives; a truncated download or a malicious archive
(``../`` entries, absolute paths, links escaping the target, device files) must never leave
a half-written dataset or write outside the destination. So downloads stream into a temp file
that is renamed only after the checksum matches, and extraction validates every member before
writing anything into a temp dir that is renamed onto the destination only when complete.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..errors import DataError
from ..fileio import default_mode

_CHUNK = 1 << 20


def md5sum(path: str | os.PathLike, chunk_size: int = _CHUNK) -> str:
    """Hex MD5 of a file (streamed; the published checksums of datasets are MD5)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


FETCHED: list[Path] = []  # files download_url actually transferred (``lowshot data download`` reports them)


def download_url(url: str, dest_path: str | os.PathLike, md5: str | None = None, *,
                 timeout: float = 60.0, progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Download ``url`` to ``dest_path`` atomically; verify ``md5`` when given.

    An existing file whose checksum matches (or any existing file when ``md5`` is None) is kept.
    ``progress(bytes_done, total_or_None)`` is called after every chunk.
    """
    dest = Path(dest_path)
    if dest.is_file() and (md5 is None or md5sum(dest) == md5.lower()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        os.fchmod(fd, default_mode())  # mkstemp's 0600 would hide a shared dataset from colleagues
        digest = hashlib.md5(usedforsecurity=False)
        done = 0
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    length = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
                    total = int(length) if length and str(length).isdigit() else None
                    while True:
                        block = resp.read(_CHUNK)
                        if not block:
                            break
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                raise DataError(f"download of {url} to {dest} failed: {exc}") from exc
            if total is not None and done != total:
                raise DataError(f"download of {url} to {dest} is truncated ({done} of {total} bytes)")
        got = digest.hexdigest()
        if md5 is not None and got != md5.lower():
            raise DataError(f"checksum mismatch for {url} (file {dest}): expected md5 {md5}, got {got}; "
                            "the download is corrupt or the file changed upstream")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    FETCHED.append(dest)
    return dest


# ----------------------------------------------------------------------------- extraction

def _clean_name(name: str, archive: Path) -> str:
    """Validated relative POSIX path of a member; rejects absolute paths and ``..``."""
    if "\x00" in name:
        raise DataError(f"unsafe member {name!r} in {archive}: NUL in name")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (parts and len(parts[0]) == 2 and parts[0][1] == ":"):
        raise DataError(f"unsafe member {name!r} in {archive}: absolute path")
    if ".." in parts:
        raise DataError(f"unsafe member {name!r} in {archive}: '..' path component")
    clean = posixpath.normpath("/".join(p for p in parts if p not in ("", ".")) or ".")
    return clean


def _inside(path: str) -> bool:
    """Whether a normalised relative path stays inside the extraction root."""
    return not (path == ".." or path.startswith("../") or posixpath.isabs(path))


def _check_not_through_link(name: str, links: set[str], archive: Path) -> None:
    """Reject members whose parent directories are links: ``a -> .`` then ``a/b -> ..`` escapes."""
    parts = name.split("/")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            raise DataError(f"unsafe member {name!r} in {archive}: path goes through a link")


class _Member:
    __slots__ = ("kind", "mode", "name", "src", "target")

    def __init__(self, name: str, kind: str, target: str | None, mode: int, src: object) -> None:
        self.name, self.kind, self.target, self.mode, self.src = name, kind, target, mode, src


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> list[_Member]:
    out = []
    for info in zf.infolist():
        name = _clean_name(info.filename, archive)
        mode = (info.external_attr >> 16) & 0xFFFF
        ftype = stat.S_IFMT(mode)  # 0 when the zip was not made on Unix: a plain file
        if info.is_dir():
            kind = "dir"
        elif ftype == stat.S_IFLNK:
            kind = "symlink"
        elif ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise DataError(f"unsafe member {info.filename!r} in {archive}: special file")
        else:
            kind = "file"
        target = zf.read(info).decode("utf-8", "replace") if kind == "symlink" else None
        out.append(_Member(name, kind, target, mode & 0o777, info))
    return out


def _tar_members(tf: tarfile.TarFile, archive: Path) -> list[_Member]:
    out = []
    for info in tf.getmembers():
        name = _clean_name(info.name, archive)
        if info.isdir():
            kind = "dir"
        elif info.issym():
            kind = "symlink"
        elif info.islnk():
            kind = "hardlink"
        elif info.isreg():
            kind = "file"
        else:
            raise DataError(f"unsafe member {info.name!r} in {archive}: device, fifo or special file")
        out.append(_Member(name, kind, info.linkname if kind in ("symlink", "hardlink") else None,
                           info.mode & 0o777, info))
    return out


def _validate(members: list[_Member], archive: Path) -> None:
    links = {m.name for m in members if m.kind in ("symlink", "hardlink")}
    for m in members:
        if m.name == "." and m.kind != "dir":
            raise DataError(f"unsafe member {m.name!r} in {archive}: empty name")
        _check_not_through_link(m.name, links, archive)
        if m.kind == "symlink":
            tgt = m.target or ""
            if posixpath.isabs(tgt) or tgt.startswith("\\"):
                raise DataError(f"unsafe link {m.name!r} -> {tgt!r} in {archive}: absolute target")
            if not _inside(posixpath.normpath(posixpath.join(posixpath.dirname(m.name), tgt))):
                raise DataError(f"unsafe link {m.name!r} -> {tgt!r} in {archive}: points outside")
        elif m.kind == "hardlink":
            tgt = posixpath.normpath(m.target or "")
            if posixpath.isabs(tgt) or not _inside(tgt) or ".." in tgt.split("/"):
                raise DataError(f"unsafe hard link {m.name!r} -> {m.target!r} in {archive}: points outside")


def _write(m: _Member, root: str, opener: Callable[[object], object]) -> None:
    path = os.path.join(root, *m.name.split("/"))
    real_root = os.path.realpath(root)
    if m.kind == "dir":
        os.makedirs(path, exist_ok=True)
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.commonpath([real_root, os.path.realpath(parent)]) != real_root:
        raise DataError(f"unsafe member {m.name!r}: resolves outside the destination")
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if m.kind == "symlink":
        os.symlink(m.target or "", path)
    elif m.kind == "hardlink":
        src = os.path.join(root, *posixpath.normpath(m.target or "").split("/"))
        if not os.path.isfile(src) or os.path.islink(src):
            raise DataError(f"hard link {m.name!r} -> {m.target!r}: target is not an extracted file")
        shutil.copyfile(src, path)  # a copy: no shared inode with anything outside our control
    else:
        with opener(m.src) as fin, open(path, "wb") as fout:  # type: ignore[attr-defined]
            shutil.copyfileobj(fin, fout, _CHUNK)
        os.chmod(path, default_mode(directory=bool(m.mode & 0o111)))  # rw (rwx if executable) minus the umask


def _verify_links(members: list[_Member], root: str, archive: Path) -> None:
    """Resolve every extracted link for real: lexical checks miss chains such as
    ``a -> .`` plus ``b -> a/..``."""
    real_root = os.path.realpath(root)
    for m in members:
        if m.kind == "symlink":
            real = os.path.realpath(os.path.join(root, *m.name.split("/")))
            if os.path.commonpath([real_root, real]) != real_root:
                raise DataError(f"unsafe link {m.name!r} -> {m.target!r} in {archive}: resolves outside")


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a zip or (compressed) tar into ``dest`` (absent or empty) all-or-nothing.

    Every member is checked before anything is written; on any error the temp dir is removed
    and ``dest`` is untouched. Returns ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DataError(f"archive {archive} not found")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"cannot extract {archive}: destination {dest} exists and is not empty")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.extract-")
    try:
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp's 0700 would become dest's mode
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = _zip_members(zf, archive)
                _validate(members, archive)
                for m in members:
                    _write(m, tmp, zf.open)  # type: ignore[arg-type]
                _verify_links(members, tmp, archive)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                members = _tar_members(tf, archive)
                _validate(members, archive)
                for m in members:
                    _write(m, tmp, lambda info: tf.extractfile(info))  # type: ignore[arg-type, return-value]
                _verify_links(members, tmp, archive)
        else:
            raise DataError(f"{archive} is neither a zip nor a tar archive")
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot extract {archive}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
