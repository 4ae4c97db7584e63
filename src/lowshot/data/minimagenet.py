"""mini-ImageNet with the Ravi & Larochelle (ICLR 2017) class split: 64 / 16 / 20 classes x 600 images.

Layout under the root (``root`` or ``$LOWSHOT_DATA/mini_imagenet``)::

    train.csv  val.csv  test.csv     # header "filename,label", e.g. n0153282900000005.jpg,n01532829
    images/                          # any of the layouts below

Each CSV row is resolved, in order, as
  1. ``images/<filename>`` (the pre-resized release: ``images/n0153282900000005.jpg``),
  2. ``images/<label>/<filename>`` (the same files in class folders, or CSVs listing real ImageNet
     names such as ``n01532829_1234.JPEG``),
  3. an ImageNet train tree (``images/<label>/`` or ``imagenet_root/<label>/`` holding
     ``<label>_<k>.JPEG``): the 8-digit number in ``n01532829|00000005.jpg`` is the 1-based position
     of the file among the class's files sorted by ``k`` -- the mapping of the widely used
     ``create_miniImagenet.py`` generator (Ravi & Larochelle never published the original mapping).
Without CSVs, the ``mini-imagenet-cache-{train,val,test}.pkl`` pickles (``image_data`` uint8
[N,84,84,3] + ``class_dict`` {wnid: indices}) are read instead, through the restricted unpickler.

Splits: ``base`` (train.csv), ``val`` (val.csv), ``novel`` (test.csv), ``base_train``/``base_test``
(seeded 10% per-class hold-out of base images, kw ``holdout``, ``holdout_seed``), and ``all`` (the
three files together, 100 classes: the cross-domain mini-ImageNet -> CUB protocol of Chen et al.
2019 and Liu et al. 2020 trains on every mini-ImageNet class). Class names are
WordNet ids, labels follow their sorted order. Images are RGB, ``image_size`` default 84.
"""
from __future__ import annotations

import csv
import functools
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import FileImageDataset, ImageDataset, TensorImageDataset
from .common import FEW_SHOT_SPLITS, check_split, dataset_root, resize_uint8, safe_pickle_load, split_base
from .registry import register_dataset

SPLIT_FILES = {"base": "train", "val": "val", "novel": "test"}
SPLITS = (*FEW_SHOT_SPLITS, "all")
SPLITS_URL = "https://github.com/twitter-research/meta-learning-lstm/tree/master/data/miniImagenet"
_RAVI_NAME = re.compile(r"(n\d{8})(\d{8})\.[A-Za-z]+")
_IMAGENET_NAME = re.compile(r"n\d{8}_(\d+)\.[A-Za-z]+")


def read_split_csv(path: Path) -> list[tuple[str, str]]:
    """Rows ``(filename, label)`` of a Ravi & Larochelle split file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"mini-ImageNet split file {path} not found") from None
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        got = ",".join(rows[0]) if rows else "nothing"
        raise DataError(f"{path}: expected the header 'filename,label', got {got!r}")
    out = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}:{lineno}: expected 'filename,label', got {','.join(row)!r}")
        out.append((row[0].strip(), row[1].strip()))
    if not out:
        raise DataError(f"{path} lists no images")
    return out


class _Resolver:
    """Maps CSV rows to files, listing each directory once (60k stat calls are slow on network disks)."""

    def __init__(self, images: Path, imagenet_root: Path | None) -> None:
        self.images, self.imagenet_root = images, imagenet_root
        self._dirs: dict[Path, set[str]] = {}
        self._trees: dict[str, list[str] | None] = {}

    def _listing(self, d: Path) -> set[str]:
        if d not in self._dirs:
            try:
                self._dirs[d] = set(os.listdir(d))
            except OSError:
                self._dirs[d] = set()
        return self._dirs[d]

    def _tree(self, wnid: str) -> tuple[Path, list[str]] | None:
        """ImageNet-named files of class ``wnid`` sorted by their numeric suffix."""
        for base in (self.imagenet_root, self.images):
            if base is None:
                continue
            files = [(int(m.group(1)), n) for n in self._listing(base / wnid)
                     if (m := _IMAGENET_NAME.fullmatch(n)) and n.startswith(wnid)]
            if files:
                return base / wnid, [n for _, n in sorted(files)]
        return None

    def resolve(self, filename: str, wnid: str) -> Path | None:
        if filename in self._listing(self.images):
            return self.images / filename
        if filename in self._listing(self.images / wnid):
            return self.images / wnid / filename
        m = _RAVI_NAME.fullmatch(filename)
        if m and m.group(1) == wnid:
            if wnid not in self._trees:
                self._trees[wnid] = None
                tree = self._tree(wnid)
                if tree is not None:
                    self._trees[wnid] = [str(tree[0] / n) for n in tree[1]]
            files, k = self._trees[wnid], int(m.group(2))
            if files and 1 <= k <= len(files):
                return Path(files[k - 1])
        return None


def _missing_message(root: Path, what: str) -> str:
    return (f"mini-ImageNet {what} not found. Put Ravi & Larochelle's train.csv, val.csv and test.csv "
            f"({SPLITS_URL}) in {root} and the images in {root / 'images'} (pre-resized "
            "n0153282900000005.jpg files, or ImageNet class folders images/<wnid>/<wnid>_<k>.JPEG, or pass "
            "imagenet_root=<ILSVRC2012 train dir>), or put mini-imagenet-cache-{train,val,test}.pkl in "
            f"{root}. ImageNet's licence allows no public download, so download=True is not available.")


def _from_csv(root: Path, csv_paths: list[Path], image_size: int, imagenet_root: Path | None) -> ImageDataset:
    from .io import load_image  # lazy: decoding helpers live with the other data I/O

    rows = [row for path in csv_paths for row in read_split_csv(path)]
    csv_path = csv_paths[0] if len(csv_paths) == 1 else root / "{train,val,test}.csv"
    resolver = _Resolver(root / "images", imagenet_root)
    wnids = sorted({label for _, label in rows})
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels, missing = [], [], []
    for filename, label in rows:
        p = resolver.resolve(filename, label)
        if p is None:
            missing.append(f"{filename} (label {label})")
            continue
        paths.append(str(p))
        labels.append(index[label])
    if missing:
        raise DataError(f"{len(missing)} of the {len(rows)} images listed in {csv_path} were not found under "
                        f"{root / 'images'}" + (f" or {imagenet_root}" if imagenet_root else "")
                        + f"; first: {missing[0]}")
    loader = functools.partial(load_image, image_size=image_size, channels=3)
    return FileImageDataset(paths, labels, wnids, loader, channels=3, image_size=image_size)


def _from_cache(path: Path, image_size: int) -> ImageDataset:
    obj = safe_pickle_load(path)
    if not isinstance(obj, dict) or "image_data" not in obj or "class_dict" not in obj:
        raise DataError(f"{path} is not a mini-ImageNet cache (expected a dict with image_data and class_dict)")
    data, class_dict = np.asarray(obj["image_data"]), obj["class_dict"]
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] != 3:
        raise DataError(f"{path}: image_data must be uint8 [N,H,W,3], got {data.dtype} {data.shape}")
    if not isinstance(class_dict, dict):
        raise DataError(f"{path}: class_dict must map class ids to image indices")
    wnids = sorted(str(k) for k in class_dict)
    labels = np.full(data.shape[0], -1, dtype=np.int64)
    for i, w in enumerate(wnids):
        idx = np.asarray(class_dict[w], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= data.shape[0]):
            raise DataError(f"{path}: class {w} lists image indices outside 0..{data.shape[0] - 1}")
        labels[idx] = i
    keep = np.nonzero(labels >= 0)[0]
    images = torch.from_numpy(np.ascontiguousarray(data[keep].transpose(0, 3, 1, 2)))
    return TensorImageDataset(resize_uint8(images, image_size), torch.from_numpy(labels[keep]), wnids)


def _concat_tensor_sets(parts: list[TensorImageDataset]) -> TensorImageDataset:
    """One in-memory dataset from several; classes are re-indexed by sorted name."""
    names = sorted({n for ds in parts for n in ds.class_names})
    index = {n: i for i, n in enumerate(names)}
    labels = torch.cat([torch.tensor([index[n] for n in ds.class_names], dtype=torch.long)[ds.labels]
                        for ds in parts])
    return TensorImageDataset(torch.cat([ds.images for ds in parts]), labels, names)


@register_dataset("mini_imagenet", "miniimagenet", "mini-imagenet")
def mini_imagenet(split: str, root: str | None = None, image_size: int | None = None, download: bool = False, *,
                  imagenet_root: str | None = None, holdout: int | float = 0.1, holdout_seed: int = 0) -> ImageDataset:
    """mini-ImageNet (Ravi & Larochelle split); ``imagenet_root``: build it from an ImageNet train folder;
    ``holdout`` / ``holdout_seed``: the per-class share of base images kept for ``base_test``."""
    check_split("mini_imagenet", split, SPLITS)
    seed = holdout_seed
    size = 84 if image_size is None else int(image_size)
    base = dataset_root("mini_imagenet", root)
    parts = list(SPLIT_FILES.values()) if split == "all" else \
        [SPLIT_FILES["base" if split.startswith("base") else split]]
    csvs, caches = [base / f"{p}.csv" for p in parts], [base / f"mini-imagenet-cache-{p}.pkl" for p in parts]
    if all(c.is_file() for c in csvs):
        if not (base / "images").is_dir() and imagenet_root is None:
            raise DataError(_missing_message(base, f"image folder {base / 'images'}"))
        ds = _from_csv(base, csvs, size, Path(imagenet_root).expanduser() if imagenet_root else None)
    elif all(c.is_file() for c in caches):
        loaded = [_from_cache(c, size) for c in caches]
        ds = loaded[0] if len(loaded) == 1 else _concat_tensor_sets(loaded)  # type: ignore[arg-type]
    else:
        missing = next(c for c in csvs if not c.is_file())
        raise DataError(_missing_message(base, f"split file {missing}"))
    ds.location = str(base)
    return split_base(ds, split, holdout, seed)
