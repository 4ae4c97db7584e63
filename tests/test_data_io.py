"""Pillow decoding, image listing, and the image_folder / csv_list readers on generated files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowshot.data import build_dataset, list_images, load_image
from lowshot.data.io import decode_image
from lowshot.errors import DataError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _png(path: Path, pixels: list[list[tuple[int, int, int]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.array(pixels, dtype=np.uint8), "RGB").save(path)
    return path


def _solid(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (10, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_load_image_exact_pixels_and_layout(tmp_path: Path) -> None:
    p = _png(tmp_path / "a.png", [[RED, GREEN], [BLUE, WHITE]])
    x = load_image(p, None, 3)
    assert x.dtype == torch.uint8 and x.shape == (3, 2, 2)
    assert x[:, 0, 0].tolist() == [255, 0, 0] and x[:, 0, 1].tolist() == [0, 255, 0]
    assert x[:, 1, 0].tolist() == [0, 0, 255] and x[:, 1, 1].tolist() == [255, 255, 255]
    g = load_image(p, None, 1)
    # ITU-R 601 luma as Pillow computes it: L = (299 R + 587 G + 114 B) / 1000
    assert g.shape == (1, 2, 2) and g[0].tolist() == [[76, 150], [29, 255]]


def test_load_image_resizes_to_square_and_keeps_constant_colour(tmp_path: Path) -> None:
    p = _solid(tmp_path / "c.jpg", (200, 100, 50), size=(40, 20))
    x = load_image(p, 16, 3)
    assert x.shape == (3, 16, 16)
    assert (x.float().mean(dim=(1, 2)) - torch.tensor([200.0, 100.0, 50.0])).abs().max() < 3  # JPEG
    g = _solid(tmp_path / "g.png", (90, 90, 90))
    assert load_image(g, 5, 3).shape == (3, 5, 5) and int(load_image(g, 5, 1).max()) == 90


def test_truncated_and_garbage_files_name_the_file(tmp_path: Path) -> None:
    good = _solid(tmp_path / "full.png", (1, 2, 3), size=(64, 64))
    data = good.read_bytes()
    bad = tmp_path / "truncated.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"truncated\.png"):
        load_image(bad, 28, 3)
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"junk\.jpg"):
        load_image(tmp_path / "junk.jpg")
    with pytest.raises(DataError, match=r"missing\.png not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(DataError, match=r"zip:member\.png"):
        decode_image(b"\x89PNG\r\n\x1a\n garbage", "zip:member.png")
    with pytest.raises(DataError, match="channels"):
        load_image(good, 28, 2)


def test_list_images_recursive_sorted_filtered(tmp_path: Path) -> None:
    for rel in ["b/2.png", "b/10.JPG", "a/z.webp", "a/sub/y.bmp", "a/.hidden.png", ".git/x.png"]:
        _solid(tmp_path / "root" / rel, (0, 0, 0))
    (tmp_path / "root" / "a" / "notes.txt").write_text("x")
    single = _solid(tmp_path / "single.png", (0, 0, 0))
    got = list_images([tmp_path / "root", single])
    rel = [str(Path(p).relative_to(tmp_path)) for p in got]
    assert rel == ["root/a/sub/y.bmp", "root/a/z.webp", "root/b/10.JPG", "root/b/2.png", "single.png"]
    with pytest.raises(DataError, match="nope"):
        list_images(tmp_path / "nope")


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for name, color, n in [("zebra", RED, 2), ("ant", GREEN, 3), ("moth", BLUE, 1)]:
        for i in range(n):
            _solid(root / name / f"{i}.png", color)
    (root / "empty").mkdir()
    return root


def test_image_folder(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    ds = build_dataset("image_folder", "train", root=str(root))
    assert ds.class_names == ["ant", "moth", "zebra"]  # sorted; the empty folder is no class
    assert ds.labels.tolist() == [0, 0, 0, 1, 2, 2]
    img, label = ds[4]
    assert img.shape == (3, 84, 84) and img.dtype == torch.uint8 and label == 2
    assert img[:, 40, 40].tolist() == [255, 0, 0]
    grey = build_dataset("image_folder", "train", root=str(root), image_size=8, channels=1)
    assert grey[0][0].shape == (1, 8, 8) and int(grey[0][0][0, 0, 0]) == 150
    assert grey.location == str(root)
    few = build_dataset("image_folder", "train", root=str(root), max_per_class=2, seed=1)
    assert torch.bincount(few.labels).tolist() == [2, 1, 2] and few.class_names == ds.class_names


def test_image_folder_split_subdir_and_errors(tmp_path: Path) -> None:
    _solid(tmp_path / "ds" / "val" / "cat" / "a.png", WHITE)
    _solid(tmp_path / "ds" / "train" / "dog" / "a.png", WHITE)
    assert build_dataset("image_folder", "val", root=str(tmp_path / "ds")).class_names == ["cat"]
    _solid(tmp_path / "flat" / "a.png", WHITE)
    with pytest.raises(DataError, match="one sub-folder per class"):
        build_dataset("image_folder", "train", root=str(tmp_path / "flat"))
    with pytest.raises(DataError, match="does not exist"):
        build_dataset("image_folder", "train", root=str(tmp_path / "missing"))


def test_image_folder_corrupt_item_names_file(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "moth" / "0.png").write_bytes(b"\x89PNG broken")
    ds = build_dataset("image_folder", "train", root=str(root), image_size=8)
    with pytest.raises(DataError, match=r"moth/0\.png"):
        ds[3]


def test_csv_list_names_header_and_relative_paths(tmp_path: Path) -> None:
    _solid(tmp_path / "imgs" / "a.png", RED)
    _solid(tmp_path / "imgs" / "b.png", GREEN)
    csv = tmp_path / "lists" / "train.csv"
    csv.parent.mkdir()
    csv.write_text("path,label\n# a comment\nimgs/a.png,zebra\n\nimgs/b.png,ant\nimgs/a.png,zebra\n")
    ds = build_dataset("csv_list", "train", root=str(csv), image_size=4, image_root=str(tmp_path))
    assert ds.class_names == ["ant", "zebra"] and ds.labels.tolist() == [1, 0, 1]
    assert ds[1][0][:, 0, 0].tolist() == [0, 255, 0]
    # default image root: the CSV's own folder
    csv2 = tmp_path / "list.csv"
    csv2.write_text("imgs/a.png,3\nimgs/b.png,0\n")
    ds2 = build_dataset("csv_list", "train", root=str(csv2), num_classes=4)  # ids 1, 2 without rows: explicit
    assert ds2.class_names == ["0", "1", "2", "3"] and ds2.labels.tolist() == [3, 0]
    assert ds2.image_size == 84 and ds2[0][0].shape == (3, 84, 84)


@pytest.mark.parametrize("body,match", [
    ("a.png,0\nb.png,1,extra\n", r"bad\.csv:2: expected 2 columns"),
    ("a.png,0\nmissing.png,1\n", r"bad\.csv:2: image file .*missing\.png not found"),
    ("a.png,0\na.png,-1\n", r"bad\.csv:2: negative label"),
    ("a.png,0\n,1\n", r"bad\.csv:2: empty path"),
    ("path,label\n", r"bad\.csv has no rows"),
])
def test_csv_list_errors_name_file_and_line(tmp_path: Path, body: str, match: str) -> None:
    _solid(tmp_path / "a.png", RED)
    (tmp_path / "bad.csv").write_text(body)
    with pytest.raises(DataError, match=match):
        build_dataset("csv_list", "train", root=str(tmp_path / "bad.csv"))
