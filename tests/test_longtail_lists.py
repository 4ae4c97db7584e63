"""ImageNet-LT / Places-LT list files and iNaturalist 2018 JSON on tiny generated fixtures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lowshot.data.lt_lists  # noqa: F401  (registers imagenet_lt, places_lt, inat2018)
from lowshot.data import build_dataset
from lowshot.data.lt_lists import list_dataset, read_coco_json, read_list_file
from lowshot.errors import ConfigError, DataError


def png(path: Path, value: int, size=(10, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    arr[0, 0] = (255 - value, 0, value)
    Image.fromarray(arr).save(path)


@pytest.fixture
def imagenet_root(tmp_path: Path) -> Path:
    entries = {"train": [("train/n01/a.png", 0), ("train/n01/b.png", 0), ("train/n01/c.png", 0),
                         ("train/n02/a.png", 1), ("train/n03/x y.png", 2)],
               "val": [("val/1.png", 0), ("val/2.png", 1), ("val/3.png", 2)]}
    for split, rows in entries.items():
        for i, (rel, _) in enumerate(rows):
            png(tmp_path / rel, 40 * i + 10)
        lines = [f"{rel} {lab}" for rel, lab in rows]
        if split == "val":
            lines[1] = "/" + lines[1]  # a leading slash stays under root
        (tmp_path / f"ImageNet_LT_{split}.txt").write_text("\n".join(lines) + "\n\n")
    return tmp_path


def test_imagenet_lt_from_lists(imagenet_root: Path):
    ds = build_dataset("imagenet_lt", "train", root=str(imagenet_root), image_size=8, num_classes=None)
    assert len(ds) == 5 and ds.labels.tolist() == [0, 0, 0, 1, 2]
    assert ds.class_names == ["0", "1", "2"] and ds.channels == 3 and ds.image_size == 8
    img, label = ds[4]  # path with a space
    assert img.dtype == torch.uint8 and img.shape == (3, 8, 8) and label == 2
    assert build_dataset("imagenet_lt", "train", root=str(imagenet_root)).num_classes == 1000  # benchmark default
    native = build_dataset("imagenet_lt", "val", root=str(imagenet_root), num_classes=3)
    assert native[1][0].shape == (3, 6, 10)
    assert native.paths[1] == str(imagenet_root / "val/2.png")
    names = imagenet_root / "names.txt"
    names.write_text("tench\ngoldfish\nwhite shark\n")
    named = build_dataset("imagenet_lt", "val", root=str(imagenet_root), num_classes=3, names_file=str(names))
    assert named.class_names == ["tench", "goldfish", "white shark"]
    with pytest.raises(ConfigError, match="unknown split 'novel'"):
        build_dataset("imagenet_lt", "novel", root=str(imagenet_root))


def test_malformed_line_names_file_and_line(tmp_path: Path):
    bad = tmp_path / "ImageNet_LT_train.txt"
    bad.write_text("a.png 0\nb.png 1\nc.png\n")
    with pytest.raises(DataError, match=r"ImageNet_LT_train\.txt:3: expected"):
        build_dataset("imagenet_lt", "train", root=str(tmp_path))
    bad.write_text("a.png 0\nb.png one\n")
    with pytest.raises(DataError, match=r"ImageNet_LT_train\.txt:2:.*'b.png one'"):
        read_list_file(bad)
    with pytest.raises(DataError, match="list file .*missing.txt not found"):
        read_list_file(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="label 5 out of range"):
        list_dataset(tmp_path, _write(tmp_path / "l.txt", "a.png 5\n"), num_classes=3)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_missing_images_lazy_or_checked(tmp_path: Path):
    png(tmp_path / "here.png", 0)
    (tmp_path / "Places_LT_test.txt").write_text("here.png 0\ngone.png 1\n")
    ds = build_dataset("places_lt", "test", root=str(tmp_path), image_size=4)
    assert ds.num_classes == 365 and ds[0][0].shape == (3, 4, 4)
    with pytest.raises(DataError, match="gone.png"):
        ds[1]
    with pytest.raises(DataError, match="1 of 2 images are missing, first: .*gone.png"):
        build_dataset("places_lt", "test", root=str(tmp_path), check_files=True)
    lf = _write(tmp_path / "custom.txt", "here.png 3\n")
    assert build_dataset("places_lt", "anything", root=str(tmp_path), list_file=str(lf)).labels.tolist() == [3]


def test_root_required(monkeypatch):
    monkeypatch.delenv("LOWSHOT_DATA", raising=False)
    with pytest.raises(DataError, match="LOWSHOT_DATA"):
        build_dataset("imagenet_lt", "train")
    with pytest.raises(ConfigError, match="cannot be downloaded"):
        build_dataset("places_lt", "train", root="x", download=True)


def test_inat2018_json(tmp_path: Path):
    # category ids need not be contiguous: they are mapped to 0..K-1 in id order
    cats = [{"id": 7, "name": "Felis catus"}, {"id": 3, "name": "Canis lupus"}]
    imgs = [{"id": 10, "file_name": "train_val2018/a.jpg"}, {"id": 11, "file_name": "train_val2018/b.jpg"},
            {"id": 12, "file_name": "train_val2018/c.jpg"}]
    anns = [{"id": 1, "image_id": 11, "category_id": 3}, {"id": 2, "image_id": 10, "category_id": 7},
            {"id": 3, "image_id": 12, "category_id": 7}]
    for i, im in enumerate(imgs):
        path = tmp_path / im["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((5, 5, 3), 30 * i, dtype=np.uint8)).save(path, format="JPEG")
    (tmp_path / "train2018.json").write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    ds = build_dataset("inat2018", "train", root=str(tmp_path), image_size=4, check_files=True)
    assert ds.labels.tolist() == [1, 0, 1] and ds.class_names == ["Canis lupus", "Felis catus"]
    assert ds[0][0].shape == (3, 4, 4)
    # "test" reads val2018.json (test labels were never released)
    (tmp_path / "val2018.json").write_text(json.dumps({"images": imgs[:1], "annotations": anns[1:2],
                                                       "categories": cats}))
    assert len(build_dataset("inat2018", "test", root=str(tmp_path))) == 1
    with pytest.raises(DataError, match="expected num_classes=8142"):
        build_dataset("inat2018", "train", root=str(tmp_path), num_classes=8142)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": imgs, "annotations": anns[:2], "categories": cats}))
    with pytest.raises(DataError, match=r"bad\.json: image id 12 .*c\.jpg.* has no annotation"):
        read_coco_json(bad)
    bad.write_text(json.dumps({"images": imgs, "annotations": [], "categories": cats}))
    with pytest.raises(DataError, match="no annotations"):
        read_coco_json(bad)
    bad.write_text('{"images": [\n')
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON at line 2"):
        read_coco_json(bad)
    lf = _write(tmp_path / "iNaturalist18_train.txt", "train_val2018/a.jpg 4\n")
    assert build_dataset("inat2018", "train", root=str(tmp_path), list_file=str(lf)).labels.tolist() == [4]
