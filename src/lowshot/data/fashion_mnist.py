"""Fashion-MNIST (Xiao et al. 2017) from its IDX files, plus a 5/5 few-shot class split.

Small, real and installed system-wide here (Debian ``dataset-fashion-mnist``), so it is the
dataset that end-to-end tests and quick recipes run on. Splits:

* ``train`` / ``test``: the official 60k / 10k partitions, 10 classes.
* ``base``: train images of classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat), labels 0..4.
* ``base_test``: test images of classes 0-4 (base-class accuracy on unseen images).
* ``novel``: test images of classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot), labels 0..4.
* ``val``: TRAIN images of classes 5-9. A 10-class dataset has no third group of unseen
  classes, so validation reuses the novel classes but never the novel images; model selection
  on ``val`` is therefore optimistic compared to a true held-out-class protocol.
"""
from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .archives import download_url
from .base import TensorImageDataset
from .info import download_target, env_root, register_downloader
from .common import resize_uint8
from .registry import register_dataset
from .splits import explicit_split, sample_per_class

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
SUBDIR = "fashion-mnist"

# Official files and MD5s of the gzipped IDX files (zalandoresearch/fashion-mnist README).
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MD5 = {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
       "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
       "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
       "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}
MIRRORS = ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
           "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
COUNTS = {"train": 60000, "test": 10000}

_SPLITS = {"train": ("train", None), "test": ("test", None), "base": ("train", "base"),
           "base_test": ("test", "base"), "val": ("train", "novel"), "novel": ("test", "novel")}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped or raw); checks magic number and payload size."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as fh:  # type: ignore[operator]
            data = fh.read()
    except FileNotFoundError as exc:
        raise DataError(f"IDX file {path} not found") from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    payload = len(data) - 4 - 4 * ndim
    if payload != expected:
        raise DataError(f"{path}: IDX header says shape {shape} ({expected} bytes) but file holds "
                        f"{payload} bytes (truncated or corrupt)")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _complete(folder: Path) -> bool:
    return all(_find_file(folder, s) for pair in FILES.values() for s in pair)


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        bases = [Path(root).expanduser()]
    else:
        env = env_root(SUBDIR)
        bases = ([env] if env is not None else []) + [SYSTEM_ROOT]
    # Also accept the layout other toolkits download to (<root>/FashionMNIST/raw).
    return [p for b in bases for p in (b, b / "FashionMNIST" / "raw")]


def find_root(root: str | os.PathLike | None = None) -> Path | None:
    """First folder holding all four IDX files: root, else $LOWSHOT_DATA/fashion-mnist, else system."""
    return next((c for c in _candidates(root) if _complete(c)), None)


def _not_found(root: str | os.PathLike | None) -> DataError:
    looked = ", ".join(str(c) for c in _candidates(root)[::2])
    return DataError(
        f"Fashion-MNIST not found (looked in {looked}). Get it with `apt-get install dataset-fashion-mnist` "
        f"(installs {SYSTEM_ROOT}), or pass download=True / run `lowshot data download fashion_mnist "
        f"--root DIR`, or put the four *-ubyte.gz files in $LOWSHOT_DATA/{SUBDIR}")


@register_downloader("fashion_mnist")
def download_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """Fetch the missing IDX files (MD5-checked) into root or $LOWSHOT_DATA/fashion-mnist."""
    found = find_root(root)
    if found is not None:
        return found
    target = download_target(root, SUBDIR, "Fashion-MNIST")
    for name, md5 in MD5.items():
        if _find_file(target, name[:-3]) is not None:
            continue
        errors = []
        for mirror in MIRRORS:
            try:
                download_url(mirror + name, target / name, md5)
                break
            except DataError as exc:
                errors.append(str(exc))
        else:
            raise DataError(f"could not download {name}: " + " | ".join(errors))
    return target


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _partition(images: tuple[str, int, int], labels: tuple[str, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Parsed (images uint8 [N,1,28,28], labels int64 [N]); cached per file version."""
    x, y = read_idx(images[0]), read_idx(labels[0])
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
        raise DataError(f"{images[0]}: expected uint8 images of shape [N,28,28], got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{labels[0]}: expected {x.shape[0]} labels, got shape {y.shape}")
    if y.size and int(y.max()) >= len(CLASSES):
        raise DataError(f"{labels[0]}: label {int(y.max())} out of range 0..{len(CLASSES) - 1}")
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


@functools.lru_cache(maxsize=4)
def _resized(images: tuple[str, int, int], labels: tuple[str, int, int], size: int) -> torch.Tensor:
    return resize_uint8(_partition(images, labels)[0], size)


@register_dataset("fashion_mnist", "fashion-mnist", "fmnist")
def fashion_mnist(split: str, root: str | os.PathLike | None = None, image_size: int | None = None,
                  download: bool = False, *, max_per_class: int | None = None, seed: int = 0,
                  channels: int = 1) -> TensorImageDataset:
    """Fashion-MNIST in memory as uint8 [N,channels,S,S] (S = image_size, default 28).

    ``max_per_class`` keeps a seeded random subset of at most that many images per class (quick
    runs); ``channels=3`` repeats the grey channel for RGB backbones.
    """
    if split not in _SPLITS:
        raise DataError(f"unknown fashion_mnist split {split!r} (known: {', '.join(_SPLITS)})")
    if channels not in (1, 3):
        raise DataError(f"fashion_mnist channels must be 1 or 3, got {channels!r}")
    folder = find_root(root)
    if folder is None and download:
        folder = download_fashion_mnist(root)
        if not _complete(folder):
            folder = None
    if folder is None:
        raise _not_found(root)
    partition, group = _SPLITS[split]
    img_file, lbl_file = (_stamp(_find_file(folder, s)) for s in FILES[partition])  # type: ignore[arg-type]
    images, labels = _partition(img_file, lbl_file)
    if image_size is not None and image_size != 28:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise DataError(f"image_size must be a positive int, got {image_size!r}")
        images = _resized(img_file, lbl_file, image_size)
    ids = list(range(len(CLASSES)))
    if group is not None:
        ids = explicit_split(CLASSES, base=CLASSES[:5], novel=CLASSES[5:])[group]
    mapping = torch.full((len(CLASSES),), -1, dtype=torch.long)
    mapping[torch.tensor(ids)] = torch.arange(len(ids))
    new_labels = mapping[labels]
    keep = torch.nonzero(new_labels >= 0).reshape(-1)
    if max_per_class is not None:
        keep = keep[sample_per_class(new_labels[keep], max_per_class, seed)]
    if keep.numel() == labels.numel():
        subset = images  # the whole partition: shares the (read-only by convention) cached tensor
    else:
        subset = images.index_select(0, keep)
    if channels == 3:
        subset = subset.expand(-1, 3, -1, -1).contiguous()
    ds = TensorImageDataset(subset, new_labels[keep], [CLASSES[i] for i in ids])
    ds.location = str(folder)
    return ds
