"""Published long-tail benchmarks from their list files: ImageNet-LT, Places-LT, iNaturalist 2018.

ImageNet-LT and Places-LT (Liu et al., CVPR 2019) ship ``<relative path> <label>`` lines
(``ImageNet_LT_train.txt``, ``Places_LT_val.txt``, ...), resolved against the image root you pass;
iNaturalist 2018 ships COCO-style JSON (``train2018.json`` / ``val2018.json``: ``images`` with
``id``/``file_name``, ``annotations`` with ``image_id``/``category_id``, ``categories``).

Nothing is downloaded (the images are tens to hundreds of GB and need accepting their licences);
``root`` (or ``$LOWSHOT_DATA/<name>``) must hold the images, and the list files either there or at
``list_file``. Images are decoded lazily; a missing image raises ``DataError`` naming the file
when read, or at construction with ``check_files=True``. Pass ``image_size`` (e.g. 224) so that
images can be batched; ``None`` keeps native sizes.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Sequence


from ..errors import ConfigError, DataError
from .base import FileImageDataset
from .common import dataset_root
from .io import load_image
from .registry import register_dataset

LIST_SPLITS = ("train", "val", "test")
# iNaturalist 2018 never released test labels; every long-tail paper reports val2018 as "test".
INAT_FILES = {"train": "train2018.json", "val": "val2018.json", "test": "val2018.json"}


def read_list_file(path: str | os.PathLike[str]) -> tuple[list[str], list[int]]:
    """Parse ``<relative path> <integer label>`` lines (blank lines skipped; paths may hold spaces)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"list file {path} not found")
    paths: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise DataError(f"{path}:{lineno}: expected '<relative path> <label >= 0>', got {text!r}")
            paths.append(parts[0].lstrip("/"))  # keep every image under root
            labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"list file {path} holds no images")
    return paths, labels


def read_names_file(path: str | os.PathLike[str], num_classes: int) -> list[str]:
    """One class name per line in label order (``<label> <name>`` lines also accepted)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class names file {path} not found")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    names = [ln.split(maxsplit=1)[1] if ln.split(maxsplit=1)[0] == str(i) and " " in ln else ln
             for i, ln in enumerate(lines)]
    if len(names) != num_classes:
        raise DataError(f"{path} lists {len(names)} class names but the list file has {num_classes} classes")
    return names


def _check_files(paths: Sequence[str]) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} of {len(paths)} images are missing, first: {missing[0]}")


def _file_dataset(paths: list[str], labels: list[int], class_names: list[str], image_size: int | None,
                  channels: int, check_files: bool) -> FileImageDataset:
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    if check_files:
        _check_files(paths)
    loader = functools.partial(load_image, image_size=image_size, channels=channels)
    return FileImageDataset(paths, labels, class_names, loader, channels, image_size)


def list_dataset(root: str | os.PathLike[str], list_file: str | os.PathLike[str], *,
                 image_size: int | None = None, channels: int = 3, num_classes: int | None = None,
                 names_file: str | os.PathLike[str] | None = None, check_files: bool = False) -> FileImageDataset:
    """A ``FileImageDataset`` from one ``<relative path> <label>`` list file and an image root.

    Class names are the label ids as strings unless ``names_file`` gives them; ``num_classes``
    (default: largest label + 1) fixes the class count when a split lacks the last classes.
    """
    rel, labels = read_list_file(list_file)
    C = max(labels) + 1 if num_classes is None else int(num_classes)
    if max(labels) >= C:
        raise DataError(f"{list_file}: label {max(labels)} out of range for num_classes={C}")
    names = read_names_file(names_file, C) if names_file is not None else [str(i) for i in range(C)]
    root = Path(root)
    return _file_dataset([str(root / p) for p in rel], labels, names, image_size, channels, check_files)


def _list_benchmark(name: str, prefix: str, split: str, root: str | None, image_size: int | None,
                    list_file: str | None, names_file: str | None, check_files: bool, channels: int,
                    num_classes: int | None) -> FileImageDataset:
    if list_file is None and split not in LIST_SPLITS:
        raise ConfigError(f"unknown split {split!r} for dataset {name!r} (choose from {', '.join(LIST_SPLITS)})")
    base = dataset_root(name, root)
    lf = Path(list_file) if list_file is not None else base / f"{prefix}_{split}.txt"
    return list_dataset(base, lf, image_size=image_size, channels=channels, num_classes=num_classes,
                        names_file=names_file, check_files=check_files)


@register_dataset("imagenet_lt", "ImageNet_LT")
def imagenet_lt(split: str, root: str | None = None, image_size: int | None = None, download: bool = False,
                *, list_file: str | None = None, names_file: str | None = None, check_files: bool = False,
                channels: int = 3, num_classes: int | None = 1000) -> FileImageDataset:
    """ImageNet-LT (1000 classes, 115.8k train images, 1280 to 5 per class; val 20 and test 50 per
    class). ``root`` is the ImageNet folder the list paths (``train/n01440764/...``) start from;
    the list defaults to ``<root>/ImageNet_LT_<split>.txt``."""
    if download:
        raise ConfigError("imagenet_lt cannot be downloaded automatically (licence); pass root=...")
    return _list_benchmark("imagenet_lt", "ImageNet_LT", split, root, image_size, list_file, names_file,
                           check_files, channels, num_classes)


@register_dataset("places_lt", "Places_LT")
def places_lt(split: str, root: str | None = None, image_size: int | None = None, download: bool = False,
              *, list_file: str | None = None, names_file: str | None = None, check_files: bool = False,
              channels: int = 3, num_classes: int | None = 365) -> FileImageDataset:
    """Places-LT (365 classes, 62.5k train images, 4980 to 5 per class; val 20 and test 100 per
    class); the list defaults to ``<root>/Places_LT_<split>.txt``."""
    if download:
        raise ConfigError("places_lt cannot be downloaded automatically (licence); pass root=...")
    return _list_benchmark("places_lt", "Places_LT", split, root, image_size, list_file, names_file,
                           check_files, channels, num_classes)


def _json_field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing key {key!r}")
    return obj[key]


def read_coco_json(path: str | os.PathLike[str]) -> tuple[list[str], list[int], list[str]]:
    """(file names, contiguous labels, class names) of an iNaturalist / COCO-style classification JSON.

    Category ids are mapped to 0..K-1 in increasing id order; names come from ``categories``.
    Each image must have exactly one annotation (test files without labels are rejected).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    images = _json_field(data, "images", str(path))
    annotations = _json_field(data, "annotations", str(path))
    if not annotations:
        raise DataError(f"{path} has no annotations (labels of this split were never released?)")
    cats = data.get("categories") or []
    cat_ids = sorted({int(_json_field(c, "id", f"{path}: categories")) for c in cats}
                     or {int(_json_field(a, "category_id", f"{path}: annotations")) for a in annotations})
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    cat_name = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
    label_of: dict[int, int] = {}
    for k, a in enumerate(annotations):
        img_id = int(_json_field(a, "image_id", f"{path}: annotations[{k}]"))
        cat = int(_json_field(a, "category_id", f"{path}: annotations[{k}]"))
        if cat not in cat_index:
            raise DataError(f"{path}: annotations[{k}] has category_id {cat} missing from 'categories'")
        if img_id in label_of:
            raise DataError(f"{path}: image id {img_id} has more than one annotation")
        label_of[img_id] = cat_index[cat]
    files: list[str] = []
    labels: list[int] = []
    for k, im in enumerate(images):
        img_id = int(_json_field(im, "id", f"{path}: images[{k}]"))
        if img_id not in label_of:
            raise DataError(f"{path}: image id {img_id} ({im.get('file_name')}) has no annotation")
        files.append(str(_json_field(im, "file_name", f"{path}: images[{k}]")).lstrip("/"))
        labels.append(label_of[img_id])
    return files, labels, [cat_name.get(c, str(c)) for c in cat_ids]


@register_dataset("inat2018", "iNaturalist18", "inaturalist2018")
def inat2018(split: str, root: str | None = None, image_size: int | None = None, download: bool = False,
             *, list_file: str | None = None, annotation_file: str | None = None, check_files: bool = False,
             channels: int = 3, names_file: str | None = None, num_classes: int | None = None) -> FileImageDataset:
    """iNaturalist 2018 (8142 classes, 437.5k train images, 3 val images per class).

    Reads ``<root>/train2018.json`` / ``val2018.json`` (``"test"`` = val2018, see module note), or
    ``annotation_file``; ``list_file`` reads Kang et al.'s ``iNaturalist18_<split>.txt`` format instead.
    """
    if download:
        raise ConfigError("inat2018 cannot be downloaded automatically; pass root=...")
    base = dataset_root("inat2018", root)
    if list_file is not None:
        return list_dataset(base, list_file, image_size=image_size, channels=channels,
                            num_classes=num_classes, names_file=names_file, check_files=check_files)
    if annotation_file is None and split not in INAT_FILES:
        raise ConfigError(f"unknown split {split!r} for dataset 'inat2018' (choose from {', '.join(INAT_FILES)})")
    ann = Path(annotation_file) if annotation_file is not None else base / INAT_FILES[split]
    files, labels, names = read_coco_json(ann)
    if num_classes is not None and len(names) != num_classes:
        raise DataError(f"{ann} has {len(names)} categories, expected num_classes={num_classes}")
    if names_file is not None:
        names = read_names_file(names_file, len(names))
    return _file_dataset([str(base / f) for f in files], labels, names, image_size, channels, check_files)
