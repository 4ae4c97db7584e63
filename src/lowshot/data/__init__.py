"""Datasets (one uint8-image contract), splits, long-tailed subsets, batch loading and transforms,
checked downloads, safe archives.

Importing this package imports every reader module so that each registers itself in
``DATASETS``; ``build_dataset(name, split, ...)`` then works for all of them.
"""
from __future__ import annotations

# >>> READER MODULES: every reader, imported for its registration side effect (DATASETS and
# >>> DOWNLOADERS). A new reader module is added to this import line.
from . import cifar, cub, fashion_mnist, folder, lt_lists, lt_subsets, minimagenet, omniglot, tiered  # noqa: F401
from .archives import download_url, md5sum, safe_extract
from .base import FileImageDataset, ImageDataset, TensorImageDataset
from .info import DOWNLOADERS, dataset_summary, download_dataset, register_downloader
from .io import decode_image, list_images, load_image
from .longtail import balanced_split, class_counts, longtail_counts, make_longtail
from .registry import DATASETS, build_dataset, create_dataset, list_datasets, register_dataset
from .splits import explicit_split, holdout_per_class, sample_per_class, split_classes
from .transforms import DATASET_STATS, build_transform, default_stats

__all__ = [
    "DATASETS",
    "DATASET_STATS",
    "DOWNLOADERS",
    "FileImageDataset",
    "ImageDataset",
    "TensorImageDataset",
    "build_dataset",
    "build_transform",
    "create_dataset",
    "dataset_summary",
    "decode_image",
    "default_stats",
    "download_dataset",
    "download_url",
    "explicit_split",
    "holdout_per_class",
    "list_datasets",
    "balanced_split",
    "class_counts",
    "longtail_counts",
    "make_longtail",
    "list_images",
    "load_image",
    "md5sum",
    "register_dataset",
    "register_downloader",
    "safe_extract",
    "sample_per_class",
    "split_classes",
]
