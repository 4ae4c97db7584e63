"""CUB-200-2011 (Wah et al. 2011) from the official folder, for classification and few-shot.

Reads ``images.txt``, ``image_class_labels.txt``, ``classes.txt``, ``train_test_split.txt``,
``images/`` and (with ``crop_bbox=True``) ``bounding_boxes.txt`` from ``CUB_200_2011/`` under the
root (``root`` or ``$LOWSHOT_DATA/cub``; the root may also be that folder itself).

Splits:
  * ``train`` / ``test``: the official image split, all 200 classes (Virtual Softmax experiments).
  * ``base`` / ``val`` / ``novel``: the class split of Chen et al. (ICLR 2019, "A Closer Look at
    Few-shot Classification"), also used by Negative Margin: with ``i`` the 0-based class index in
    ``classes.txt`` order, base = ``i % 2 == 0`` (100), val = ``i % 4 == 1`` (50), novel =
    ``i % 4 == 3`` (50); every image of a class is used, labels remapped to 0..k-1.
  * ``base_train`` / ``base_test``: seeded 10% per-class hold-out of base images.
Class names are the ``classes.txt`` names (``001.Black_footed_Albatross``). ``image_size`` default 224.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from .base import FileImageDataset, ImageDataset
from .common import FEW_SHOT_SPLITS, check_split, dataset_root, fetch, split_base
from .info import download_target, register_downloader
from .registry import register_dataset

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
FOLDER = "CUB_200_2011"
SPLITS = ("train", "test") + FEW_SHOT_SPLITS


def few_shot_classes(num_classes: int, part: str) -> list[int]:
    """Class indices of the CloserLook ``base``/``val``/``novel`` split."""
    rule = {"base": lambda i: i % 2 == 0, "val": lambda i: i % 4 == 1, "novel": lambda i: i % 4 == 3}[part]
    return [i for i in range(num_classes) if rule(i)]


def _table(path: Path, width: int) -> dict[int, list[str]]:
    """``id field...`` lines keyed by the integer id; malformed lines raise naming file:line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"CUB file {path} not found") from None
    out: dict[int, list[str]] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=width - 1) if width == 2 else line.split()
        if len(parts) != width or not parts[0].isdigit():
            raise DataError(f"{path}:{lineno}: expected {width} fields starting with an integer id, got {line!r}")
        out[int(parts[0])] = parts[1:]
    return out


class BoxCropLoader:
    """Loads an image, crops it to its bounding box and resizes: a picklable loader for workers."""

    def __init__(self, boxes: dict[str, tuple[float, float, float, float]], image_size: int | None) -> None:
        self.boxes, self.image_size = boxes, image_size

    def __call__(self, path: str) -> torch.Tensor:
        from PIL import Image

        from .io import load_image, pil_to_tensor

        full = load_image(path, None, 3)  # decoding errors name the file
        x, y, w, h = self.boxes[path]
        img = Image.fromarray(full.permute(1, 2, 0).numpy())
        W, H = img.size
        left, top = max(0, round(x)), max(0, round(y))
        right, bottom = min(W, max(left + 1, round(x + w))), min(H, max(top + 1, round(y + h)))
        return pil_to_tensor(img.crop((left, top, right, bottom)), self.image_size, 3)


def _folder(root: Path, download: bool) -> Path:
    for cand in (root, root / FOLDER):
        if (cand / "images.txt").is_file():
            return cand
    if download:
        return fetch(CUB_URL, CUB_MD5, root, FOLDER)
    raise DataError(f"CUB-200-2011 not found: expected {root / FOLDER / 'images.txt'}. Download {CUB_URL} "
                    f"(md5 {CUB_MD5}) and extract it into {root}, or pass download=True")


@register_downloader("cub")
def download_cub(root: str | os.PathLike[str] | None = None) -> Path:
    """Fetch and unpack CUB_200_2011.tgz (MD5-checked) into root or $LOWSHOT_DATA/cub."""
    return _folder(download_target(root, "cub", "CUB-200-2011"), True)


@register_dataset("cub", "cub200", "cub_200_2011")
def cub(split: str, root: str | None = None, image_size: int | None = None, download: bool = False, *,
        crop_bbox: bool = False, holdout: int | float = 0.1, holdout_seed: int = 0) -> ImageDataset:
    """CUB-200-2011; ``crop_bbox`` crops to the bird's box, ``holdout`` / ``holdout_seed`` as ``mini_imagenet``."""
    check_split("cub", split, SPLITS)
    crop, seed = crop_bbox, holdout_seed
    size = 224 if image_size is None else int(image_size)
    folder = _folder(dataset_root("cub", root), download)

    classes = _table(folder / "classes.txt", 2)
    class_ids = sorted(classes)
    class_names = [classes[c][0] for c in class_ids]
    class_index = {c: i for i, c in enumerate(class_ids)}
    images = _table(folder / "images.txt", 2)
    labels_tab = _table(folder / "image_class_labels.txt", 2)
    is_train = _table(folder / "train_test_split.txt", 2) if split in ("train", "test") else None
    boxes_tab = _table(folder / "bounding_boxes.txt", 5) if crop else None

    paths, labels = [], []
    boxes: dict[str, tuple[float, float, float, float]] = {}
    for img_id in sorted(images):
        rel = images[img_id][0]
        for what, tab in (("image_class_labels.txt", labels_tab), ("train_test_split.txt", is_train),
                          ("bounding_boxes.txt", boxes_tab)):
            if tab is not None and img_id not in tab:
                raise DataError(f"{folder / what} has no entry for image {img_id} ({rel})")
        cls = int(labels_tab[img_id][0])
        if cls not in class_index:
            raise DataError(f"{folder / 'image_class_labels.txt'}: image {img_id} has unknown class {cls}")
        if is_train is not None and (is_train[img_id][0] == "1") != (split == "train"):
            continue
        path = str(folder / "images" / rel)
        if not os.path.isfile(path):
            raise DataError(f"CUB image {path} (listed in {folder / 'images.txt'}) not found")
        paths.append(path)
        labels.append(class_index[cls])
        if boxes_tab is not None:
            try:
                x, y, w, h = (float(v) for v in boxes_tab[img_id])
            except ValueError:
                raise DataError(f"{folder / 'bounding_boxes.txt'}: bad box for image {img_id}") from None
            boxes[path] = (x, y, w, h)

    if crop:
        loader: Any = BoxCropLoader(boxes, size)
    else:
        from .io import load_image  # lazy: decoding helpers live with the other data I/O

        loader = functools.partial(load_image, image_size=size, channels=3)
    ds: ImageDataset = FileImageDataset(paths, labels, class_names, loader, channels=3, image_size=size)
    ds.location = str(folder)
    if split in ("train", "test"):
        return ds
    part = "base" if split.startswith("base") else split
    return split_base(ds.select_classes(few_shot_classes(len(class_names), part)), split, holdout, seed)
