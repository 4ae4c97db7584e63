"""A trained run, frozen: the one way every tool opens a checkpoint and gets its features.

``FrozenRun.open(checkpoint)`` loads the model (eval mode), its config and its test-time
transform; ``run.dataset(split)`` builds a split of the checkpoint's dataset checked against the
checkpoint (channels; with ``same_classes`` also the class list, which a stage-2 classifier needs);
``run.features(split)`` extracts that split's features once, caching them on disk under
``<run_dir>/features/`` with ONE key (``feature_cache``: the backbone's weights, the dataset split
and the test-time preprocessing), so ``eval``, ``decouple``, ``analyze`` and ``generalized``
share entries; ``embed`` and ``sweep`` open runs through it too, without the disk cache.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import feature_cache
from .checkpoint import load_checkpoint, resolve_checkpoint_path
from .config import Config
from .data import DATASETS, build_dataset
from .data.base import ImageDataset
from .data.loader import BatchLoader
from .data.transforms import build_transform
from .distributed import all_gather_cat, is_distributed, shard_indices
from .errors import DataError, LowshotError
from .models import Classifier, model_from_checkpoint
from .utils import progress, resolve_device

Transform = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: ImageDataset, transform: Transform,
                     batch_size: int = 256, device: str | torch.device = "cpu", *, show_progress: bool = True,
                     desc: str = "features", channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] float32 (CPU) and labels [N] for every sample, in dataset order.

    The backbone runs in eval mode (its mode is restored after), so a feature depends only on the
    image. ``show_progress``: a bar (or, in a log, a line every ~10 s) once extraction has run 2 s.
    """
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    loader = BatchLoader(dataset, batch_size, pin_memory=device.type == "cuda")
    try:
        for x, y in progress(loader, total=len(loader), desc=desc, enabled=show_progress):
            x = transform(x.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats.append(backbone(x).float().cpu())
            labels.append(y)
    finally:
        backbone.train(was_training)
    if not feats:
        return torch.zeros(0, getattr(backbone, "out_dim", 0)), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def extract_features_distributed(backbone: nn.Module, dataset: ImageDataset, transform: Transform,
                                 batch_size: int = 256, device: str | torch.device = "cpu",
                                 **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract_features`` with the dataset split across ranks; every rank gets all features, in order.

    The backbone runs in eval mode, so a sample's feature does not depend on which rank computed it.
    """
    if not is_distributed():
        return extract_features(backbone, dataset, transform, batch_size, device, **kw)
    part = dataset.subset(list(shard_indices(len(dataset))))
    feats, labels = extract_features(backbone, part, transform, batch_size, device, **kw)
    return all_gather_cat(feats.contiguous()), all_gather_cat(labels.contiguous())


@dataclass
class FrozenRun:
    """A loaded checkpoint plus memoised datasets and (disk-cached) features of its splits.

    ``root`` / ``dataset`` override where the data comes from (default: the checkpoint's config);
    ``same_classes``: every split must have the checkpoint's classes, in order (stage 2).
    """

    path: Path
    checkpoint: dict[str, Any]
    model: Classifier
    config: Config
    transform: Transform
    device: torch.device
    root: str | None = None
    dataset_name: str | None = None
    same_classes: bool = False
    batch_size: int = 256
    cache: bool = True
    show_progress: bool = True
    log: Callable[[str], None] | None = None
    extracted: list[str] = field(default_factory=list)  # splits computed (not read from the cache)
    extract_seconds: float = 0.0
    _datasets: dict[str, ImageDataset] = field(default_factory=dict, repr=False)
    _features: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, checkpoint: str | Path, *, device: str | torch.device = "auto", **options: Any) -> FrozenRun:
        """Load ``checkpoint`` (a file, or a run directory: its best/last checkpoint) for inference."""
        path = resolve_checkpoint_path(checkpoint)
        ckpt = load_checkpoint(path)
        model, cfg = model_from_checkpoint(ckpt)
        meta = ckpt["data"]
        transform = build_transform(False, meta["image_size"], meta["channels"], meta["mean"], meta["std"])
        dev = device if isinstance(device, torch.device) else resolve_device(str(device))
        return cls(path, ckpt, model.to(dev).eval(), cfg, transform, dev, **options)

    # ------------------------------------------------------------------ facts of the run
    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def metadata(self) -> dict[str, Any]:
        """What the images were trained with: ``image_size``, ``channels``, ``mean``, ``std``, ``preprocess``."""
        return self.checkpoint["data"]

    @property
    def class_names(self) -> list[str]:
        return list(self.checkpoint["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.checkpoint["class_names"])

    @property
    def head_name(self) -> str:
        return self.config.head.name

    # ------------------------------------------------------------------ data
    def _source(self) -> tuple[str, str | None, dict[str, Any]]:
        """(dataset name, root, reader options) every split is built from."""
        d, meta = self.config.data, self.metadata
        if self.dataset_name is None:
            return d.name, self.root if self.root is not None else d.root, dict(d.options)
        options: dict[str, Any] = {}
        if "channels" in inspect.signature(DATASETS.get(self.dataset_name)).parameters:
            options["channels"] = meta["channels"]  # e.g. image_folder: read as the checkpoint expects
        return self.dataset_name, self.root, options

    def dataset(self, split: str) -> ImageDataset:
        """A split of the run's dataset, checked against the checkpoint; one error names the cause."""
        if split in self._datasets:
            return self._datasets[split]
        name, root, options = self._source()
        meta = self.metadata
        try:
            ds = build_dataset(name, split, root=root, image_size=meta["image_size"], **options)
        except LowshotError as err:
            if self.root is not None or self.dataset_name is not None:
                raise
            where = (f"data.root {self.config.data.root!r}" if self.config.data.root
                     else "the default data location (data.root unset)")
            raise type(err)(f"{err} [{where} comes from the checkpoint's config; pass --root DIR to override "
                            f"it]") from None
        if len(ds) == 0:
            raise DataError(f"dataset {name!r} split {split!r} is empty")
        if ds.channels != meta["channels"]:
            raise DataError(f"dataset {name!r} split {split!r} has {ds.channels}-channel images but {self.path} "
                            f"expects {meta['channels']}")
        if self.same_classes and list(ds.class_names) != self.class_names:
            raise DataError(f"dataset {name!r} split {split!r} has classes {list(ds.class_names)[:5]}... "
                            f"but {self.path} was trained on {self.class_names[:5]}...")
        self._datasets[split] = ds
        return ds

    def groups(self, split: str, key: str | None) -> list[Any] | None:
        """One group id per sample (in feature order) from the class metadata ``key``; None without a key."""
        return None if key is None else self.dataset(split).sample_groups(key)

    # ------------------------------------------------------------------ features
    def feature_key(self, split: str, backbone: nn.Module | None = None) -> str:
        """The cache key of ``split``'s features: backbone weights + data source + preprocessing."""
        name, root, options = self._source()
        meta = self.metadata
        bb = self.model.backbone if backbone is None else backbone
        desc = {"backbone": self.config.model.backbone, "backbone_kwargs": self.config.model.backbone_kwargs,
                "dataset": name, "split": split, "root": None if root is None else str(root), "options": options,
                "preprocess": meta.get("preprocess", {}),
                "normalise": {k: meta[k] for k in ("channels", "image_size", "mean", "std")}}
        return feature_cache.feature_key(bb.state_dict(), desc)

    def features(self, split: str, backbone: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU features [N, D] and labels [N] of ``split``, in dataset order (``backbone``: default the run's)."""
        bb = self.model.backbone if backbone is None else backbone
        ds = self.dataset(split)
        key = self.feature_key(split, bb)
        if (split, key) in self._features:
            return self._features[(split, key)]

        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            t0 = time.perf_counter()
            out = extract_features(bb, ds, self.transform, self.batch_size, self.device,
                                   show_progress=self.show_progress, desc=f"features {split}")
            seconds = time.perf_counter() - t0
            self.extracted.append(split)
            self.extract_seconds += seconds
            self._log(f"features: {split} {tuple(out[0].shape)} extracted in {seconds:.1f}s")
            return out

        directory = self.run_dir / "features" if self.cache else None
        f, y, hit = feature_cache.cached_features(directory, split, key, ds.labels, compute)
        if hit:
            self._log(f"features: {split} {tuple(f.shape)} from cache")
        self._features[(split, key)] = (f, y)
        return f, y

    def _log(self, message: str) -> None:
        if self.log is not None:
            self.log(message)
