"""Package surface and the helpers behind ``lowshot data info|download``."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lowshot import data
from lowshot.errors import ConfigError, DataError


def test_readers_are_registered_with_aliases() -> None:
    names = data.list_datasets()
    for name in ("fashion_mnist", "omniglot", "image_folder", "csv_list"):
        assert name in names
    assert data.DATASETS.canonical("fmnist") == "fashion_mnist"
    assert {"fashion_mnist", "omniglot"} <= set(data.DOWNLOADERS.names())
    with pytest.raises(ConfigError, match="did you mean 'omniglot'"):
        data.build_dataset("omniglott", "train")


def test_download_dataset_refuses_non_downloadable(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'image_folder' cannot be downloaded automatically"):
        data.download_dataset("folder", tmp_path)


def test_summary_lists_splits_and_location(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / cls / "x.png")
    text = data.dataset_summary("image_folder", tmp_path)
    assert text.splitlines()[0] == f"image_folder (found at {tmp_path})"
    assert "base_test" in text and "2 images" in text and "2 classes" in text and "3x84x84" in text


def test_summary_reraises_not_found(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class folders"):
        data.dataset_summary("image_folder", tmp_path)
