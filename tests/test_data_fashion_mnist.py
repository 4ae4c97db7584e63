"""Fashion-MNIST: IDX parsing on crafted files, real data from the system package, splits."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowshot.data import build_dataset, dataset_summary, download_dataset
from lowshot.data import fashion_mnist as fm
from lowshot.errors import DataError

SYSTEM = fm.SYSTEM_ROOT
needs_real = pytest.mark.skipif(not fm._complete(SYSTEM),
                                reason=f"Fashion-MNIST not installed at {SYSTEM} (apt-get install dataset-fashion-mnist)")


def _idx(array: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


def _write_fake(folder: Path, per_class: int = 2) -> None:
    """A tiny but valid Fashion-MNIST: image i is filled with value i, labels cycle 0..9."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("train", "test"):
        n = 10 * per_class
        images = np.stack([np.full((28, 28), i, dtype=np.uint8) for i in range(n)])
        labels = np.arange(n) % 10
        img_name, lbl_name = fm.FILES[part]
        (folder / (img_name + ".gz")).write_bytes(gzip.compress(_idx(images)))
        (folder / lbl_name).write_bytes(_idx(labels))  # raw (uncompressed) is accepted too


def test_read_idx_gz_and_raw(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(_idx(arr))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(_idx(arr)))
    assert np.array_equal(fm.read_idx(tmp_path / "a.idx"), arr)
    assert np.array_equal(fm.read_idx(tmp_path / "a.idx.gz"), arr)


@pytest.mark.parametrize("data,match", [
    (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", r"bad\.idx: IDX header says shape \(5,\)"),
    (b"\x01\x02\x08\x01\x00\x00\x00\x01a", r"bad\.idx is not an IDX file"),
    (b"\x00\x00\x08\x03\x00\x00", r"bad\.idx: truncated IDX header"),
    (b"\x1f\x8b\x08\x00garbage", r"cannot read IDX file .*bad\.idx"),
])
def test_read_idx_rejects_corrupt_files(tmp_path: Path, data: bytes, match: str) -> None:
    (tmp_path / "bad.idx").write_bytes(data)
    with pytest.raises(DataError, match=match):
        fm.read_idx(tmp_path / "bad.idx")


def test_splits_on_fake_data(tmp_path: Path) -> None:
    _write_fake(tmp_path / "fm", per_class=3)
    root = str(tmp_path / "fm")
    base = build_dataset("fashion_mnist", "base", root=root)
    assert base.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
    assert base.labels.tolist() == [0, 1, 2, 3, 4] * 3
    # image i of the partition is filled with value i: base keeps images 0-4, 10-14, 20-24
    assert base.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 20, 21, 22, 23, 24]
    novel = build_dataset("fashion_mnist", "novel", root=root)
    assert novel.class_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert novel.labels.tolist() == [0, 1, 2, 3, 4] * 3 and novel.images[0, 0, 0, 0] == 5
    sub = build_dataset("fashion_mnist", "val", root=root, max_per_class=2, seed=4)
    assert torch.bincount(sub.labels).tolist() == [2] * 5
    assert torch.equal(sub.images, build_dataset("fashion_mnist", "val", root=root, max_per_class=2,
                                                  seed=4).images)
    rgb = build_dataset("fashion_mnist", "test", root=root, channels=3, image_size=14)
    assert rgb.images.shape == (30, 3, 14, 14) and rgb.location == root
    with pytest.raises(DataError, match="unknown fashion_mnist split 'nove'"):
        build_dataset("fashion_mnist", "nove", root=root)


def test_not_found_explains_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist.*download=True.*LOWSHOT_DATA"):
        build_dataset("fashion_mnist", "train", root=str(tmp_path))


def test_lowshot_data_env_is_searched_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fake(tmp_path / "fashion-mnist")
    monkeypatch.setenv("LOWSHOT_DATA", str(tmp_path))
    ds = build_dataset("fmnist", "train")
    assert len(ds) == 20 and ds.location == str(tmp_path / "fashion-mnist")


def test_download_uses_official_files_and_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "upstream"
    _write_fake(fake)
    for img_name, lbl_name in fm.FILES.values():  # upstream serves every file gzipped
        (fake / (lbl_name + ".gz")).write_bytes(gzip.compress((fake / lbl_name).read_bytes()))
    calls = []

    def fake_download(url: str, dest: Path, md5: str | None = None) -> Path:
        calls.append((url, md5))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((fake / Path(url).name).read_bytes())
        return dest

    monkeypatch.setattr(fm, "download_url", fake_download)
    target = tmp_path / "dl"
    assert download_dataset("fashion-mnist", target) == target
    assert sorted(calls) == sorted((fm.MIRRORS[0] + n, md5) for n, md5 in fm.MD5.items())
    assert ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d") in fm.MD5.items()
    assert len(build_dataset("fashion_mnist", "novel", root=str(target), download=True)) == 10
    assert len(calls) == 4  # present files are not fetched again
    monkeypatch.delenv("LOWSHOT_DATA", raising=False)
    monkeypatch.setattr(fm, "SYSTEM_ROOT", tmp_path / "nowhere")
    with pytest.raises(DataError, match="needs a destination"):
        download_dataset("fashion_mnist")


@needs_real
def test_real_fashion_mnist_partitions_and_splits() -> None:
    train = build_dataset("fashion_mnist", "train", root=str(SYSTEM))
    test = build_dataset("fashion_mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published order
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert abs(train.images.float().mean().item() / 255 - 0.2860) < 1e-3
    counts = {s: len(build_dataset("fashion_mnist", s)) for s in ("base", "base_test", "val", "novel")}
    assert counts == {"base": 30000, "base_test": 5000, "val": 30000, "novel": 5000}
    val, novel = build_dataset("fashion_mnist", "val"), build_dataset("fashion_mnist", "novel")
    assert val.class_names == novel.class_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    # val = train images of classes 5-9, in order: its first image is train image 0 (an ankle boot)
    assert torch.equal(val.images[0], train.images[0]) and int(val.labels[0]) == 4
    assert torch.equal(novel.images[0], test.images[0]) and int(novel.labels[0]) == 4
    again = build_dataset("fashion_mnist", "train")
    assert again.images.data_ptr() == train.images.data_ptr()  # parsed once, cached


@needs_real
def test_real_resize_matches_interpolate_and_summary() -> None:
    small = build_dataset("fashion_mnist", "novel", max_per_class=3, seed=0)
    big = build_dataset("fashion_mnist", "novel", image_size=32, max_per_class=3, seed=0)
    assert torch.equal(small.labels, big.labels) and big.images.shape == (15, 1, 32, 32)
    ref = F.interpolate(small.images.float(), size=(32, 32), mode="bilinear", align_corners=False,
                        antialias=True).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(ref, big.images)
    text = dataset_summary("fashion_mnist")
    assert str(SYSTEM) in text and "60000" in text and "base_test" in text
