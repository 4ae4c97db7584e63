"""The one dataset contract every reader fulfils.

Every dataset yields ``(uint8 tensor [C,H,W], label)`` and exposes its labels as one tensor, so
samplers, episode builders and long-tail tools work on ``.labels`` without touching images, and
augmentation happens later on whole batches (on CPU or GPU, see ``transforms``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import DataError


class ImageDataset(Dataset):
    """Abstract labelled image dataset.

    Subclasses set ``labels`` (LongTensor [N], values 0..C-1), ``class_names`` (len C), ``channels``
    (1 or 3), ``image_size`` (square side of returned images, or None for native size),
    ``class_meta`` (per-class metadata lists, e.g. ``{"alphabet": [...]}``) and implement ``_load(i)``.
    ``location`` optionally says where the data was read from (shown by ``lowshot data info``).
    """

    labels: torch.Tensor
    class_names: list[str]
    channels: int
    image_size: int | None
    class_meta: dict[str, list[Any]]
    #: per-file preprocessing the reader applies after decoding (e.g. ``{"invert": True}`` for Omniglot);
    #: stored in checkpoints so ``lowshot embed`` treats raw image files exactly like the training data
    preprocess: dict[str, Any] = {}
    location: str | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _load(self, index: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._load(int(index)), int(self.labels[index])

    def describe(self) -> str:
        return f"{type(self).__name__}: {len(self)} images, {self.num_classes} classes"

    def sample_groups(self, key: str) -> list[Any]:
        """One group id per sample from the per-class metadata ``class_meta[key]``.

        The input of within-group episodes (``sample_episodes(..., groups=)``), e.g. ``"alphabet"``
        for Omniglot; an unknown key is one error naming the keys this dataset has.
        """
        if key not in self.class_meta:
            have = ", ".join(sorted(self.class_meta)) or "none"
            raise DataError(f"{type(self).__name__} has no class metadata {key!r} to group episodes by "
                            f"(available: {have})")
        per_class = self.class_meta[key]
        return [per_class[int(y)] for y in self.labels.tolist()]

    def tensor_source(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(images uint8 [M,C,H,W], index of each sample into them or None)`` when every sample
        is a row of one in-memory tensor, so a loader can gather a batch with one index; else None."""
        return None

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "ImageDataset":
        """A view on some samples; labels and class names unchanged."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        return _View(self, idx, None)

    def select_classes(self, class_ids: Sequence[int] | torch.Tensor) -> "ImageDataset":
        """Keep only ``class_ids``; labels are remapped to 0..k-1 in the given order."""
        ids = [int(c) for c in torch.as_tensor(class_ids).reshape(-1).tolist()]
        bad = [c for c in ids if not 0 <= c < self.num_classes]
        if bad:
            raise DataError(f"class id {bad[0]} out of range for a dataset of {self.num_classes} classes")
        if len(set(ids)) != len(ids):
            raise DataError(f"duplicate class ids in {ids}")
        mapping = torch.full((self.num_classes,), -1, dtype=torch.long)
        mapping[torch.tensor(ids, dtype=torch.long)] = torch.arange(len(ids))
        new = mapping[self.labels]
        idx = torch.nonzero(new >= 0).reshape(-1)
        return _View(self, idx, (ids, new[idx]))


class _View(ImageDataset):
    """Index view of a parent dataset (optionally with remapped classes)."""

    def __init__(self, parent: ImageDataset, indices: torch.Tensor,
                 remap: tuple[list[int], torch.Tensor] | None) -> None:
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(parent)):
            raise DataError(f"subset index out of range for a dataset of {len(parent)} samples")
        self.parent, self.indices = parent, indices
        self.channels, self.image_size = parent.channels, parent.image_size
        self.preprocess = dict(parent.preprocess)
        self.location = parent.location
        if remap is None:
            self.labels = parent.labels[indices]
            self.class_names = list(parent.class_names)
            self.class_meta = {k: list(v) for k, v in parent.class_meta.items()}
        else:
            ids, labels = remap
            self.labels = labels
            self.class_names = [parent.class_names[c] for c in ids]
            self.class_meta = {k: [v[c] for c in ids] for k, v in parent.class_meta.items()}

    def _load(self, index: int) -> torch.Tensor:
        return self.parent._load(int(self.indices[index]))

    def source_indices(self) -> torch.Tensor:
        """Indices of this view's samples in the root dataset."""
        inner = self.parent.source_indices() if isinstance(self.parent, _View) else None
        return self.indices if inner is None else inner[self.indices]

    def tensor_source(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        src = self.parent.tensor_source()
        if src is None:
            return None
        images, inner = src
        return images, self.indices if inner is None else inner[self.indices]


class TensorImageDataset(ImageDataset):
    """All images in memory as one uint8 tensor [N,C,H,W] (Fashion-MNIST, Omniglot, CIFAR)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                 class_meta: dict[str, list[Any]] | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() != images.shape[0]:
            raise DataError(f"{images.shape[0]} images but {labels.numel()} labels")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
            raise DataError(f"labels out of range 0..{len(class_names) - 1}")
        self.images, self.labels, self.class_names = images, labels, list(class_names)
        self.channels = int(images.shape[1])
        self.image_size = int(images.shape[2]) if images.shape[2] == images.shape[3] else None
        self.class_meta = dict(class_meta or {})

    def _load(self, index: int) -> torch.Tensor:
        return self.images[index]

    def tensor_source(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        return self.images, None


class FileImageDataset(ImageDataset):
    """Images decoded from files on demand with Pillow, resized to ``image_size``.

    ``loader(path) -> uint8 [C,H,W]`` may raise ``DataError`` for a corrupt file; that error names the file.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | torch.Tensor,
                 class_names: Sequence[str], loader: Callable[[str], torch.Tensor], channels: int,
                 image_size: int | None, class_meta: dict[str, list[Any]] | None = None) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if self.labels.numel() != len(self.paths):
            raise DataError(f"{len(self.paths)} paths but {self.labels.numel()} labels")
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(class_names)):
            raise DataError(f"labels out of range 0..{len(class_names) - 1}")
        self.class_names, self.loader = list(class_names), loader
        self.channels, self.image_size = channels, image_size
        self.class_meta = dict(class_meta or {})

    def _load(self, index: int) -> torch.Tensor:
        return self.loader(self.paths[index])
