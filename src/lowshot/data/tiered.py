"""tiered-ImageNet (Ren et al., ICLR 2018): 608 classes under 34 categories, split by category.

Files under the root (``root`` or ``$LOWSHOT_DATA/tiered_imagenet``), as released by the authors::

    {train,val,test}_images_png.pkl   # list of PNG-encoded images (bytes or uint8 arrays), 84x84
    {train,val,test}_labels.pkl       # dict: label_specific, label_general,
                                      #       label_specific_str, label_general_str

Both are pickles downloaded from third-party mirrors, so they are read with the restricted
unpickler of :func:`lowshot.data.cifar.safe_pickle_load`: it can rebuild numpy arrays and builtin
containers and nothing else, so a tampered file raises ``DataError`` instead of running code.
``{split}_images.npz`` (key ``images``, uint8 [N,84,84,3], the decompressed variant some repos ship)
is accepted instead of the PNG pickle and read with ``allow_pickle=False``.

Splits: ``base`` (train: 351 classes / 20 categories), ``val`` (97 / 6), ``novel`` (test: 160 / 8),
``base_train``/``base_test`` (seeded 10% per-class hold-out). ``class_meta["category"]`` holds each
class's general category. PNGs are decoded lazily on access.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import DataError
from .base import ImageDataset, TensorImageDataset
from .common import FEW_SHOT_SPLITS, check_split, dataset_root, resize_uint8, safe_pickle_load, split_base
from .registry import register_dataset

SPLIT_FILES = {"base": "train", "val": "val", "novel": "test"}
SOURCE = "https://github.com/renmengye/few-shot-ssl-public"


def _as_bytes(item: Any, index: int, source: str) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):  # Python 2 str unpickled as latin-1 text
        return item.encode("latin1")
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    raise DataError(f"{source}: image {index} is a {type(item).__name__}, expected PNG bytes")


class EncodedImageDataset(ImageDataset):
    """Images kept encoded (PNG/JPEG) in ONE uint8 buffer + offsets, decoded on access.

    One buffer instead of a list of bytes objects: forked DataLoader workers would otherwise touch
    (and so copy) every object's refcount page, multiplying the ~GBs of tiered-ImageNet per worker.
    """

    def __init__(self, encoded: Sequence[Any], labels: torch.Tensor | Sequence[int], class_names: Sequence[str],
                 image_size: int | None, channels: int = 3, class_meta: dict[str, list[Any]] | None = None,
                 source: str = "") -> None:
        blobs = [_as_bytes(b, i, source) for i, b in enumerate(encoded)]
        self.offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        del blobs
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if self.labels.numel() != len(self.offsets) - 1:
            raise DataError(f"{source}: {len(self.offsets) - 1} images but {self.labels.numel()} labels")
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(class_names)):
            raise DataError(f"{source}: labels out of range 0..{len(class_names) - 1}")
        self.class_names, self.channels, self.image_size = list(class_names), channels, image_size
        self.class_meta = dict(class_meta or {})
        self.source = source

    def _load(self, index: int) -> torch.Tensor:
        from .io import decode_image  # lazy: decoding helpers live with the other data I/O

        data = self.buffer[self.offsets[index]:self.offsets[index + 1]].tobytes()
        return decode_image(data, f"#{index} of {self.source}", self.image_size, self.channels)


def _labels(path: Path, n: int | None) -> tuple[np.ndarray, list[str], list[str]]:
    """Labels remapped to 0..k-1 (sorted specific ids), class names and per-class category."""
    obj = safe_pickle_load(path)
    keys = ("label_specific", "label_general", "label_specific_str", "label_general_str")
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise DataError(f"{path} is not a tiered-ImageNet label file (needs keys {', '.join(keys)})")
    spec = np.asarray(obj["label_specific"]).astype(np.int64).reshape(-1)
    gen = np.asarray(obj["label_general"]).astype(np.int64).reshape(-1)
    spec_str, gen_str = [str(s) for s in obj["label_specific_str"]], [str(s) for s in obj["label_general_str"]]
    if gen.shape != spec.shape or (n is not None and spec.size != n):
        raise DataError(f"{path}: {spec.size} specific and {gen.size} general labels for {n} images")
    ids, labels = np.unique(spec, return_inverse=True)
    names, category = [], []
    for k, s in enumerate(ids.tolist()):
        names.append(spec_str[s] if 0 <= s < len(spec_str) else str(s))
        gs = np.unique(gen[labels == k])
        if gs.size != 1:
            raise DataError(f"{path}: class {names[-1]} belongs to {gs.size} general categories")
        g = int(gs[0])
        category.append(gen_str[g] if 0 <= g < len(gen_str) else str(g))
    return labels.astype(np.int64), names, category


def _missing(root: Path, what: Path) -> DataError:
    return DataError(f"tiered-ImageNet file {what} not found. Put the authors' {{train,val,test}}_images_png.pkl "
                     f"and {{train,val,test}}_labels.pkl (tiered-imagenet.tar, see {SOURCE}) in {root}. There is "
                     "no public URL with a published checksum, so download=True is not available.")


@register_dataset("tiered_imagenet", "tieredimagenet", "tiered-imagenet")
def tiered_imagenet(split: str, root: str | None = None, image_size: int | None = None, download: bool = False, *,
                     holdout: int | float = 0.1, holdout_seed: int = 0) -> ImageDataset:
    """tiered-ImageNet; ``holdout`` / ``holdout_seed``: the share of base images kept for ``base_test``."""
    check_split("tiered_imagenet", split, FEW_SHOT_SPLITS)
    seed = holdout_seed
    size = 84 if image_size is None else int(image_size)
    base = dataset_root("tiered_imagenet", root)
    part = SPLIT_FILES["base" if split.startswith("base") else split]
    png, npz, lab = base / f"{part}_images_png.pkl", base / f"{part}_images.npz", base / f"{part}_labels.pkl"
    if not lab.is_file():
        raise _missing(base, lab)
    if png.is_file():
        encoded = safe_pickle_load(png)
        if isinstance(encoded, np.ndarray) and encoded.dtype == object:
            encoded = list(encoded)
        if not isinstance(encoded, (list, tuple)):
            raise DataError(f"{png}: expected a list of PNG-encoded images, got {type(encoded).__name__}")
        labels, names, category = _labels(lab, len(encoded))
        ds: ImageDataset = EncodedImageDataset(encoded, labels, names, size, 3, {"category": category}, str(png))
    elif npz.is_file():
        try:
            with np.load(npz, allow_pickle=False) as z:
                images = z["images"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read images from {npz}: {e}") from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"{npz}: images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
        labels, names, category = _labels(lab, images.shape[0])
        tensor = resize_uint8(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), size)
        ds = TensorImageDataset(tensor, torch.from_numpy(labels), names, {"category": category})
    else:
        raise _missing(base, png)
    ds.location = str(base)
    return split_base(ds, split, holdout, seed)
