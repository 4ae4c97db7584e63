"""Generic file datasets: a class-per-folder tree (``image_folder``) and a CSV list (``csv_list``).

Images are decoded lazily per item (FileImageDataset). Batching needs one fixed size, so
``image_size`` defaults to 84 (the miniImageNet convention) rather than the native size;
``channels`` defaults to 3 (grey files are replicated to RGB by Pillow's convert).
``max_per_class`` (with ``seed``) keeps a seeded subset per class, as for the in-memory readers.
"""
from __future__ import annotations

import csv
import functools
import os
import warnings
from pathlib import Path

import torch

from ..errors import DataError
from .base import FileImageDataset, ImageDataset
from .io import is_image_file, list_images, load_image
from .registry import register_dataset
from .splits import sample_per_class

DEFAULT_FILE_IMAGE_SIZE = 84
_HEADER_PATH = {"path", "file", "filename", "image", "img"}
_HEADER_LABEL = {"label", "class", "target", "class_name", "category"}


def _size(image_size: int | None) -> int:
    size = DEFAULT_FILE_IMAGE_SIZE if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"image_size must be a positive int, got {image_size!r}")
    return size


def _loader(size: int, channels: int) -> functools.partial:
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    return functools.partial(_load_or_hint, image_size=size, channels=channels)


SKIP_HINT = "set data.options.skip_corrupt=true (skip_corrupt=True) to drop unreadable files"


def _load_or_hint(path: str, image_size: int, channels: int) -> "torch.Tensor":
    """``load_image``; a corrupt file's error says how to skip such files (module level: picklable)."""
    try:
        return load_image(path, image_size=image_size, channels=channels)
    except DataError as e:
        raise DataError(f"{e} ({SKIP_HINT})") from e


@register_dataset("image_folder", "folder")
def image_folder(split: str = "train", root: str | os.PathLike | None = None, image_size: int | None = None,
                 download: bool = False, *, channels: int = 3, max_per_class: int | None = None,
                 seed: int = 0, skip_corrupt: bool = False) -> ImageDataset:
    """``root/<class>/**/*.png|jpg|...``, classes sorted by folder name.

    A corrupt file fails the batch that reads it with an error naming the file; ``skip_corrupt=True``
    instead decodes every file once up front and drops (and counts, in ``ds.skipped``) the bad ones.

    The folder is the split: ``split`` only matters when ``root/<split>`` exists (e.g. a
    ``train/ val/ test/`` layout), in which case that sub-folder is used.
    """
    if root is None:
        raise DataError("image_folder needs root=DIR (a folder with one sub-folder per class)")
    if download:
        raise DataError("image_folder cannot download anything; point root at your folder")
    base = Path(root).expanduser()
    if split and (base / split).is_dir():
        base = base / split
    if not base.is_dir():
        raise DataError(f"image folder {base} does not exist")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels, names = [], [], []
    for name in classes:
        files = list_images(base / name)
        if not files:
            continue  # an empty folder is not a class (would break per-class sampling)
        labels += [len(names)] * len(files)
        names.append(name)
        paths += files
    if not names:
        stray = any(is_image_file(p) for p in os.listdir(base))
        hint = " (images found directly in it: put them in one sub-folder per class)" if stray else ""
        raise DataError(f"no class folders with images in {base}{hint}")
    size = _size(image_size)
    paths, labels, bad = _without_corrupt(paths, labels, skip_corrupt)
    ds = FileImageDataset(paths, labels, names, _loader(size, channels), channels, size)
    ds.location, ds.skipped = str(base), bad
    return _limit(ds, max_per_class, seed)


def _without_corrupt(paths: list[str], labels: list[int], skip: bool) -> tuple[list[str], list[int], list[str]]:
    """With ``skip``, decode every file once and drop the ones that fail (returned for counting)."""
    if not skip:
        return paths, labels, []
    keep_p, keep_l, bad = [], [], []
    for p, y in zip(paths, labels):
        try:
            load_image(p, None, 1)
        except DataError:
            bad.append(p)
            continue
        keep_p.append(p)
        keep_l.append(y)
    if bad:
        warnings.warn(f"skipped {len(bad)} corrupt image file(s), e.g. {bad[0]}", stacklevel=3)
    return keep_p, keep_l, bad


def _limit(ds: FileImageDataset, max_per_class: int | None, seed: int) -> ImageDataset:
    """A seeded subset of at most ``max_per_class`` images per class (quick runs)."""
    if max_per_class is None:
        return ds
    return ds.subset(sample_per_class(ds.labels, max_per_class, seed))


def _is_header(row: list[str]) -> bool:
    return len(row) >= 2 and row[0].strip().lower() in _HEADER_PATH and row[1].strip().lower() in _HEADER_LABEL


@register_dataset("csv_list", "csv")
def csv_list(split: str = "train", root: str | os.PathLike | None = None, image_size: int | None = None,
             download: bool = False, *, image_root: str | os.PathLike | None = None, channels: int = 3,
             check_files: bool = True, max_per_class: int | None = None, seed: int = 0,
             skip_corrupt: bool = False, num_classes: int | None = None) -> ImageDataset:
    """``path,label`` rows (optional header, ``#`` comments); ``root`` is the CSV file.

    Paths are relative to ``image_root`` (default: the CSV's folder). Labels are either all
    integers (class ids kept as given; names "0".."C-1") or class names (sorted -> ids).
    Integer ids that leave classes without rows (e.g. labels 0, 1, 999) need ``num_classes``
    (``data.options.num_classes``): a typo must not silently make a 1000-class dataset.
    ``split`` is ignored: one CSV is one split.
    """
    if root is None:
        raise DataError("csv_list needs root=FILE.csv (rows: path,label)")
    if download:
        raise DataError("csv_list cannot download anything; point root at your CSV file")
    csv_path = Path(root).expanduser()
    if not csv_path.is_file():
        raise DataError(f"CSV list {csv_path} not found")
    img_root = Path(image_root).expanduser() if image_root is not None else csv_path.parent
    rows: list[tuple[int, str, str]] = []
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            for lineno, row in enumerate(csv.reader(fh), start=1):
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                if not rows and _is_header(row):
                    continue
                if len(row) != 2:
                    raise DataError(f"{csv_path}:{lineno}: expected 2 columns (path,label), got {len(row)}")
                path, label = row[0].strip(), row[1].strip()
                if not path or not label:
                    raise DataError(f"{csv_path}:{lineno}: empty path or label")
                rows.append((lineno, path, label))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot parse CSV list {csv_path}: {exc}") from exc
    if not rows:
        raise DataError(f"CSV list {csv_path} has no rows")
    if all(_is_int(lbl) for _, _, lbl in rows):
        ids = [int(lbl) for _, _, lbl in rows]
        bad = next(((n, i) for (n, _, _), i in zip(rows, ids) if i < 0), None)
        if bad is not None:
            raise DataError(f"{csv_path}:{bad[0]}: negative label {bad[1]}")
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
                raise DataError(f"csv_list num_classes must be a positive int, got {num_classes!r}")
            over = next(((n, i) for (n, _, _), i in zip(rows, ids) if i >= num_classes), None)
            if over is not None:
                raise DataError(f"{csv_path}:{over[0]}: label {over[1]} >= num_classes {num_classes}")
            count = num_classes
        else:
            count = max(ids) + 1
            missing = sorted(set(range(count)) - set(ids))
            if missing:
                line = next(n for (n, _, _), i in zip(rows, ids) if i == count - 1)
                raise DataError(
                    f"{csv_path}:{line}: label {count - 1} makes {count} classes but only {count - len(missing)} "
                    f"have rows (no rows for {', '.join(map(str, missing[:5]))}{', ...' if len(missing) > 5 else ''}); "
                    f"set num_classes (data.options.num_classes={count}) if that is intended")
        names = [str(i) for i in range(count)]
    else:
        names = sorted({lbl for _, _, lbl in rows})
        index = {n: i for i, n in enumerate(names)}
        ids = [index[lbl] for _, _, lbl in rows]
    paths = []
    for lineno, rel, _ in rows:
        full = Path(rel).expanduser()
        full = full if full.is_absolute() else img_root / full
        if check_files and not full.is_file():
            raise DataError(f"{csv_path}:{lineno}: image file {full} not found")
        paths.append(str(full))
    size = _size(image_size)
    paths, ids, bad = _without_corrupt(paths, ids, skip_corrupt)
    ds = FileImageDataset(paths, ids, names, _loader(size, channels), channels, size)
    ds.location, ds.skipped = str(csv_path), bad
    return _limit(ds, max_per_class, seed)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
