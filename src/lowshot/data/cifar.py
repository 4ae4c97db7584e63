"""CIFAR-10 / CIFAR-100 (python pickles) and the few-shot benchmarks cut from CIFAR-100.

Shared reader helpers (root lookup, restricted unpickler, hold-out split) live in ``common.py``.

Splits:
  * ``cifar10`` / ``cifar100``: ``train`` (50k) and ``test`` (10k), uint8 [N,3,32,32] in memory
    (resized once, antialiased bilinear, when another ``image_size`` is asked for).
  * ``cifar_fs`` (Bertinetto et al. 2019) and ``fc100`` (Oreshkin et al. 2018): ``base`` / ``val`` /
    ``novel`` classes of CIFAR-100, each class with all its 600 images (official train + test
    merged, as both papers do), plus ``base_train`` / ``base_test`` (seeded hold-out, see
    :func:`split_base`). Labels inside a split follow CIFAR-100's fine-label order (alphabetical).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .base import ImageDataset, TensorImageDataset
from .info import download_target, register_downloader
from .registry import register_dataset
from .common import (FEW_SHOT_SPLITS, check_split, dataset_root, fetch, resize_uint8,  # noqa: F401
                     safe_pickle_load, split_base)

# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ---------------------------------------------------------------------------------------------

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"


def _field(d: Any, key: str, path: Path) -> Any:
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR python batch (expected a dict, got {type(d).__name__})")
    if key in d:
        return d[key]
    raise DataError(f"{path} has no {key!r} entry (keys: {', '.join(map(str, d))})")


def _images(batch: Any, path: Path) -> np.ndarray:
    data = np.asarray(_field(batch, "data", path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be uint8 [N,3072], got {data.dtype} {data.shape}")
    return data.reshape(-1, 3, 32, 32)


def _locate(root: Path, folder: str, name: str, url: str, md5: str, download: bool) -> Path:
    """The ``cifar-*-py*`` folder under ``root`` (or ``root`` itself), downloading if asked."""
    for cand in (root / folder, root):
        if (cand / "test" if "100" in folder else cand / "test_batch").exists():
            return cand
    if download:
        return fetch(url, md5, root, folder)
    raise DataError(f"{name} not found: expected folder {root / folder}. Download {url} (md5 {md5}) and "
                    f"extract it into {root}, or pass download=True")


def load_cifar10_arrays(root: Path, train: bool, download: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 images [N,3,32,32], int64 labels and the 10 class names."""
    folder = _locate(root, "cifar-10-batches-py", "CIFAR-10", CIFAR10_URL, CIFAR10_MD5, download)
    files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for fname in files:
        batch = safe_pickle_load(folder / fname)
        images.append(_images(batch, folder / fname))
        labels.append(np.asarray(_field(batch, "labels", folder / fname), dtype=np.int64))
    names = [str(n) for n in _field(safe_pickle_load(folder / "batches.meta"), "label_names",
                                      folder / "batches.meta")]
    return np.concatenate(images), np.concatenate(labels), names


def load_cifar100_arrays(root: Path, train: bool, download: bool = False
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """uint8 images, fine labels, coarse labels, 100 fine names, 20 coarse names."""
    folder = _locate(root, "cifar-100-python", "CIFAR-100", CIFAR100_URL, CIFAR100_MD5, download)
    path = folder / ("train" if train else "test")
    batch = safe_pickle_load(path)
    meta = safe_pickle_load(folder / "meta")
    fine = np.asarray(_field(batch, "fine_labels", path), dtype=np.int64)
    coarse = np.asarray(_field(batch, "coarse_labels", path), dtype=np.int64)
    return (_images(batch, path), fine, coarse, [str(n) for n in _field(meta, "fine_label_names", folder / "meta")],
            [str(n) for n in _field(meta, "coarse_label_names", folder / "meta")])


def _tensor_dataset(images: np.ndarray, labels: np.ndarray, names: Sequence[str],
                    meta: dict[str, list[Any]] | None = None) -> TensorImageDataset:
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(f"CIFAR labels outside 0..{len(names) - 1}")
    return TensorImageDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), names, meta)


def _sized(ds: TensorImageDataset, image_size: int | None) -> TensorImageDataset:
    """``ds`` resized once to ``image_size`` (e.g. 84 for backbones built for mini-ImageNet)."""
    if image_size is None or image_size == ds.images.shape[-1]:
        return ds
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive int or None, got {image_size!r}")
    out = TensorImageDataset(resize_uint8(ds.images, image_size), ds.labels, ds.class_names, ds.class_meta)
    out.location = ds.location
    return out


@register_dataset("cifar10", "cifar-10")
def cifar10(split: str, root: str | None = None, image_size: int | None = None, download: bool = False
            ) -> ImageDataset:
    """CIFAR-10 ``train``/``test`` from ``cifar-10-batches-py`` (root default ``$LOWSHOT_DATA/cifar10``)."""
    check_split("cifar10", split, ("train", "test"))
    base = dataset_root("cifar10", root)
    images, labels, names = load_cifar10_arrays(base, split == "train", download)
    ds = _tensor_dataset(images, labels, names)
    ds.location = str(base)
    return _sized(ds, image_size)


@register_dataset("cifar100", "cifar-100")
def cifar100(split: str, root: str | None = None, image_size: int | None = None, download: bool = False
             ) -> ImageDataset:
    """CIFAR-100 ``train``/``test`` (fine labels; ``class_meta['superclass']`` is the coarse label name)."""
    check_split("cifar100", split, ("train", "test"))
    base = dataset_root("cifar100", root)
    images, fine, coarse, names, coarse_names = load_cifar100_arrays(base, split == "train", download)
    ds = _tensor_dataset(images, fine, names, {"superclass": _superclass_of(fine, coarse, coarse_names, len(names))})
    ds.location = str(base)
    return _sized(ds, image_size)


def _superclass_of(fine: np.ndarray, coarse: np.ndarray, coarse_names: Sequence[str], n: int) -> list[str]:
    out = [""] * n
    for f, c in zip(fine.tolist(), coarse.tolist()):
        out[f] = str(coarse_names[c])
    return out


# ---------------------------------------------------------------------------------------------
# CIFAR-FS and FC100
# ---------------------------------------------------------------------------------------------

# CIFAR-FS class split (Bertinetto et al., ICLR 2019, "Meta-learning with differentiable closed-form
# solvers"; the splits/bertinetto/{train,val,test}.txt lists of their r2d2 code release).
CIFAR_FS_CLASSES: dict[str, tuple[str, ...]] = {
    "base": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus", "can", "castle",
        "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup", "dinosaur", "dolphin",
        "elephant", "forest", "girl", "hamster", "house", "kangaroo", "keyboard", "lawn_mower", "lion",
        "lizard", "lobster", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "palm_tree",
        "pear", "pine_tree", "plate", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "seal",
        "shrew", "skunk", "skyscraper", "snake", "spider", "squirrel", "streetcar", "sunflower", "tank",
        "tiger", "train", "trout", "tulip", "turtle", "willow_tree", "wolf",
    ),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish", "lamp",
        "maple_tree", "motorcycle", "otter", "sea", "shark", "television", "tractor",
    ),
    "novel": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy",
        "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman",
        "worm",
    ),
}

# FC100 superclass split (Oreshkin et al., NeurIPS 2018, TADAM): coarse labels 1,2,3,4,5,6,9,10,15,17,
# 18,19 / 8,11,13,16 / 0,7,12,14 of CIFAR-100 -> 60 / 20 / 20 fine classes.
FC100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "base": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
        "household_furniture", "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles",
        "trees", "vehicles_1", "vehicles_2",
    ),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"),
    "novel": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=2)
def _cifar100_merged(train: tuple[str, int, int], test: tuple[str, int, int], meta: tuple[str, int, int]
                     ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Cached (keyed by file stamps): building base/val/novel/base_test parses the 180 MB once."""
    folder = Path(train[0]).parent
    tr = load_cifar100_arrays(folder, True)
    te = load_cifar100_arrays(folder, False)
    fine = np.concatenate([tr[1], te[1]])
    sup = _superclass_of(fine, np.concatenate([tr[2], te[2]]), tr[4], len(tr[3]))
    if fine.min() < 0 or fine.max() >= len(tr[3]):
        raise DataError(f"CIFAR-100 labels in {folder} outside 0..{len(tr[3]) - 1}")
    return torch.from_numpy(np.concatenate([tr[0], te[0]])), torch.from_numpy(fine), tr[3], sup


def _cifar100_all(root: Path, download: bool) -> tuple[TensorImageDataset, list[str], list[str]]:
    """All 60k CIFAR-100 images (train then test) with fine labels and each fine class's superclass.

    The image tensor is shared between calls (cached): treat it as read-only.
    """
    folder = _locate(root, "cifar-100-python", "CIFAR-100", CIFAR100_URL, CIFAR100_MD5, download)
    for f in ("train", "test", "meta"):
        if not (folder / f).is_file():
            raise DataError(f"CIFAR-100 file {folder / f} not found")
    images, fine, names, sup = _cifar100_merged(*(_stamp(folder / f) for f in ("train", "test", "meta")))
    ds = TensorImageDataset(images, fine, names, {"superclass": list(sup)})
    ds.location = str(folder)
    return ds, list(names), list(sup)


def _class_split(name: str, split: str, root: str | None, image_size: int | None, download: bool,
                 holdout: int | float, seed: int, pick: Any) -> ImageDataset:
    check_split(name, split, FEW_SHOT_SPLITS)
    # CIFAR-FS / FC100 are views of CIFAR-100: share its folder unless a root is given.
    full, names, sup = _cifar100_all(dataset_root("cifar100", root), download)
    part = "base" if split.startswith("base") else split
    ds = full.select_classes(pick(part, names, sup))
    if image_size is not None and image_size != 32:  # materialise only these classes, then resize
        src = ds.source_indices()
        ds = _sized(TensorImageDataset(full.images[src], ds.labels, ds.class_names, ds.class_meta), image_size)
        ds.location = full.location
    return split_base(ds, split, holdout, seed)


def _pick_cifar_fs(part: str, names: list[str], sup: list[str]) -> list[int]:
    wanted = set(CIFAR_FS_CLASSES[part])
    missing = wanted - set(names)
    if missing:
        raise DataError(f"CIFAR-100 meta lacks CIFAR-FS class {min(missing)!r}; is this CIFAR-100?")
    return [i for i, n in enumerate(names) if n in wanted]


def _pick_fc100(part: str, names: list[str], sup: list[str]) -> list[int]:
    wanted = set(FC100_SUPERCLASSES[part])
    missing = wanted - set(sup)
    if missing:
        raise DataError(f"CIFAR-100 meta lacks FC100 superclass {min(missing)!r}; is this CIFAR-100?")
    return [i for i, s in enumerate(sup) if s in wanted]


@register_dataset("cifar_fs", "cifar-fs")
def cifar_fs(split: str, root: str | None = None, image_size: int | None = None, download: bool = False, *,
             holdout: int | float = 0.1, holdout_seed: int = 0) -> ImageDataset:
    """CIFAR-FS 64/16/20 classes (reads CIFAR-100 from ``root`` or ``$LOWSHOT_DATA/cifar100``).

    ``holdout`` / ``holdout_seed``: the per-class share of base images kept for ``base_test``.
    """
    return _class_split("cifar_fs", split, root, image_size, download, holdout, holdout_seed, _pick_cifar_fs)


@register_dataset("fc100")
def fc100(split: str, root: str | None = None, image_size: int | None = None, download: bool = False, *,
          holdout: int | float = 0.1, holdout_seed: int = 0) -> ImageDataset:
    """FC100 12/4/4 superclasses = 60/20/20 classes (reads CIFAR-100 like ``cifar_fs``)."""
    return _class_split("fc100", split, root, image_size, download, holdout, holdout_seed, _pick_fc100)


# ---------------------------------------------------------------------------------------------
# Downloaders for ``lowshot data download NAME``
# ---------------------------------------------------------------------------------------------


@register_downloader("cifar10")
def download_cifar10(root: str | os.PathLike[str] | None = None) -> Path:
    """Fetch and unpack cifar-10-python.tar.gz (MD5-checked) into root or $LOWSHOT_DATA/cifar10."""
    target = download_target(root, "cifar10", "CIFAR-10")
    return _locate(target, "cifar-10-batches-py", "CIFAR-10", CIFAR10_URL, CIFAR10_MD5, True)


def _download_cifar100(root: str | os.PathLike[str] | None = None) -> Path:
    """Fetch and unpack cifar-100-python.tar.gz (MD5-checked) into root or $LOWSHOT_DATA/cifar100."""
    target = download_target(root, "cifar100", "CIFAR-100")
    return _locate(target, "cifar-100-python", "CIFAR-100", CIFAR100_URL, CIFAR100_MD5, True)


for _name in ("cifar100", "cifar_fs", "fc100"):  # the few-shot splits are views of CIFAR-100
    register_downloader(_name)(_download_cifar100)
