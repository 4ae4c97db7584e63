"""Benchmark readers on tiny fixtures written in each dataset's published on-disk format."""
from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lowshot.data.minimagenet  # registers mini_imagenet
import lowshot.data.tiered  # noqa: F401  (registers tiered_imagenet)
from lowshot.data import cifar as cifar_mod
from lowshot.data import cub as cub_mod
from lowshot.data.cifar import CIFAR_FS_CLASSES, FC100_SUPERCLASSES, safe_pickle_load
from lowshot.data.info import download_dataset
from lowshot.data.registry import build_dataset
from lowshot.errors import ConfigError, DataError

# ------------------------------------------------------------------ Python 2 pickle writer
# The published CIFAR and tiered-ImageNet pickles were written by Python 2 (py2 ``str`` values and
# ``numpy.core.multiarray`` globals); this emits exactly those opcodes so the fixtures match.


def _py2(obj: object, out: bytearray) -> None:
    if obj is None:
        out += b"N"
    elif isinstance(obj, bool):
        out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):
        out += b"K" + bytes([obj]) if 0 <= obj < 256 else b"J" + struct.pack("<i", obj)
    elif isinstance(obj, (str, bytes)):  # a Python 2 str: raw bytes
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        out += (b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<I", len(raw))) + raw
    elif isinstance(obj, (list, tuple)):
        out += b"(" if isinstance(obj, tuple) else b"]("
        for x in obj:
            _py2(x, out)
        out += b"t" if isinstance(obj, tuple) else b"e"
    elif isinstance(obj, dict):
        out += b"}("
        for k, v in obj.items():
            _py2(k, out)
            _py2(v, out)
        out += b"u"
    elif isinstance(obj, np.ndarray):
        code, order = {np.dtype(np.uint8): ("u1", "|"), np.dtype(np.int64): ("i8", "<")}[obj.dtype]
        out += b"cnumpy.core.multiarray\n_reconstruct\n"
        out += b"(cnumpy\nndarray\n"
        _py2((0,), out)
        _py2("b", out)
        out += b"tR("
        _py2(1, out)
        _py2(tuple(obj.shape), out)
        out += b"cnumpy\ndtype\n"
        _py2((code, 0, 1), out)
        out += b"R"
        _py2((3, order, None, None, None, -1, -1, 0), out)
        out += b"b"
        out += b"\x89"
        _py2(np.ascontiguousarray(obj).tobytes(), out)
        out += b"tb"
    else:  # pragma: no cover - fixture helper
        raise TypeError(type(obj))


def py2_pickle(obj: object, path: Path) -> None:
    out = bytearray(b"\x80\x02")
    _py2(obj, out)
    path.write_bytes(bytes(out + b"."))


def test_py2_pickle_writer_roundtrips_through_safe_loader(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    py2_pickle({"data": arr, "labels": [1, 300, -2], "names": ["a", "b"], "t": (None, True)}, tmp_path / "x")
    got = safe_pickle_load(tmp_path / "x")
    np.testing.assert_array_equal(got["data"], arr)
    assert got["labels"] == [1, 300, -2] and got["names"] == ["a", "b"] and got["t"] == (None, True)


# ------------------------------------------------------------------ pickle safety


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a tampered download would contain
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["system", "eval", "nested"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    if payload == "system":
        obj: object = _Evil(marker)
    elif payload == "eval":
        class _E:
            def __reduce__(self):
                return (eval, (f"open({str(marker)!r}, 'w')",))
        obj = _E()
    else:  # hidden inside otherwise valid tiered-ImageNet content
        obj = {"label_specific": np.zeros(2, np.int64), "label_general": [_Evil(marker)],
               "label_specific_str": ["a"], "label_general_str": ["g"]}
    path = tmp_path / "train_labels.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError, match="train_labels.pkl"):
        safe_pickle_load(path)
    assert not marker.exists()


def test_truncated_pickle_is_a_data_error(tmp_path: Path) -> None:
    p = tmp_path / "batch"
    p.write_bytes(pickle.dumps({"data": np.zeros(5, np.uint8)})[:-7])
    with pytest.raises(DataError, match="corrupt pickle"):
        safe_pickle_load(p)


# ------------------------------------------------------------------ CIFAR


CIFAR100_SUPER = {
    "aquatic_mammals": "beaver dolphin otter seal whale", "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip", "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe", "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman", "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train", "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}
FINE = sorted(n for v in CIFAR100_SUPER.values() for n in v.split())
COARSE = sorted(CIFAR100_SUPER)
SUPER_OF = {n: s for s, v in CIFAR100_SUPER.items() for n in v.split()}


def _pixels(labels: list[int], rng: np.random.Generator) -> np.ndarray:
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    data[:, 0] = labels  # first red pixel encodes the label
    return data


def make_cifar10(root: Path, per_batch: int = 3) -> None:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for i, f in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        labels = [(i + j) % 10 for j in range(per_batch)]
        py2_pickle({"batch_label": f"batch {i}", "labels": labels, "data": _pixels(labels, rng),
                    "filenames": [f"img_{j}.png" for j in range(per_batch)]}, d / f)
    py2_pickle({"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}, d / "batches.meta")


def make_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1) -> None:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, k in (("train", train_per_class), ("test", test_per_class)):
        fine = [c for c in range(100) for _ in range(k)]
        coarse = [COARSE.index(SUPER_OF[FINE[c]]) for c in fine]
        py2_pickle({"filenames": [f"f{i}.png" for i in range(len(fine))], "batch_label": name,
                    "fine_labels": fine, "coarse_labels": coarse, "data": _pixels(fine, rng)}, d / name)
    py2_pickle({"fine_label_names": FINE, "coarse_label_names": COARSE}, d / "meta")


def test_cifar10_reads_python_batches(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    train = build_dataset("cifar10", "train", root=str(tmp_path))
    test = build_dataset("cifar10", "test", root=str(tmp_path / "cifar-10-batches-py"))
    assert len(train) == 15 and len(test) == 3 and train.class_names[3] == "cat"
    raw = safe_pickle_load(tmp_path / "cifar-10-batches-py" / "data_batch_2")
    img, label = train[3]  # first image of data_batch_2
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and label == raw["labels"][0] == 1
    assert img[0, 0, 0] == label and img[0, 0, 1] == raw["data"][0][1] and img[1, 0, 0] == raw["data"][0][1024]
    assert train.labels.tolist() == [(i + j) % 10 for i in range(5) for j in range(3)]


def test_cifar_missing_data_names_folder_and_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWSHOT_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"cifar100.*cifar-100-python.*cifar-100-python\.tar\.gz.*eb9058c3"):
        build_dataset("cifar100", "train")
    make_cifar10(tmp_path / "cifar10")
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        build_dataset("cifar10", "train")
    monkeypatch.delenv("LOWSHOT_DATA")
    with pytest.raises(DataError, match="LOWSHOT_DATA"):
        build_dataset("cifar10", "train")
    with pytest.raises(ConfigError, match="split 'base'"):
        build_dataset("cifar10", "base", root=str(tmp_path))


def test_cifar10_download_via_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    make_cifar10(src, per_batch=1)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(cifar_mod, "CIFAR10_URL", archive.as_uri())
    monkeypatch.setattr(cifar_mod, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    root = tmp_path / "data"
    ds = build_dataset("cifar10", "train", root=str(root), download=True)
    assert len(ds) == 5 and (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no scratch left behind
    got = download_dataset("cifar10", tmp_path / "cli")  # `lowshot data download cifar10 --root DIR`
    assert got == tmp_path / "cli" / "cifar-10-batches-py" and (got / "batches.meta").is_file()
    monkeypatch.setattr(cifar_mod, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(DataError, match="checksum"):
        build_dataset("cifar10", "train", root=str(tmp_path / "other"), download=True)


def test_cifar_fs_and_fc100_class_lists_are_published_splits() -> None:
    assert len(FINE) == 100 and len(COARSE) == 20
    fs = {k: set(v) for k, v in CIFAR_FS_CLASSES.items()}
    assert [len(fs[k]) for k in ("base", "val", "novel")] == [64, 16, 20]
    assert fs["base"].isdisjoint(fs["val"]) and fs["base"].isdisjoint(fs["novel"]) and fs["val"].isdisjoint(fs["novel"])
    assert fs["base"] | fs["val"] | fs["novel"] == set(FINE)
    fc = {k: set(v) for k, v in FC100_SUPERCLASSES.items()}
    assert [len(fc[k]) for k in ("base", "val", "novel")] == [12, 4, 4]
    assert fc["base"] | fc["val"] | fc["novel"] == set(COARSE)
    # TADAM's coarse ids: base 1,2,3,4,5,6,9,10,15,17,18,19 / val 8,11,13,16 / novel 0,7,12,14
    assert sorted(COARSE.index(s) for s in fc["val"]) == [8, 11, 13, 16]
    assert sorted(COARSE.index(s) for s in fc["novel"]) == [0, 7, 12, 14]


def test_cifar_fs_and_fc100_from_cifar100_pickles(tmp_path: Path) -> None:
    make_cifar100(tmp_path)
    r = str(tmp_path)
    full = build_dataset("cifar100", "train", root=r)
    assert len(full) == 200 and full.class_names == FINE and full.location == r
    assert full.class_meta["superclass"][FINE.index("whale")] == "aquatic_mammals"
    for split, n in (("base", 64), ("val", 16), ("novel", 20)):
        ds = build_dataset("cifar_fs", split, root=r)
        assert ds.class_names == sorted(CIFAR_FS_CLASSES[split]) and len(ds) == 3 * n  # train+test merged
        assert sorted(set(ds.labels.tolist())) == list(range(n))
        for i in (0, len(ds) - 1):  # the label stored in the image's first pixel is the CIFAR-100 fine id
            img, y = ds[i]
            assert FINE[int(img[0, 0, 0])] == ds.class_names[y]
    for split, n in (("base", 60), ("val", 20), ("novel", 20)):
        ds = build_dataset("fc100", split, root=r)
        assert len(ds.class_names) == n and len(ds) == 3 * n
        assert set(ds.class_meta["superclass"]) == set(FC100_SUPERCLASSES[split])
        assert all(SUPER_OF[c] == s for c, s in zip(ds.class_names, ds.class_meta["superclass"]))
    big = build_dataset("fc100", "novel", root=r, image_size=40)
    assert big[0][0].shape == (3, 40, 40) and big.class_names == build_dataset("fc100", "novel", root=r).class_names
    assert build_dataset("cifar100", "test", root=r, image_size=16)[0][0].shape == (3, 16, 16)
    bt = build_dataset("cifar_fs", "base_test", root=r, holdout=1)
    btr = build_dataset("cifar_fs", "base_train", root=r, holdout=1)
    assert len(bt) == 64 and len(btr) == 128 and torch.bincount(bt.labels).tolist() == [1] * 64
    assert set(bt.source_indices().tolist()).isdisjoint(btr.source_indices().tolist())
    again = build_dataset("cifar_fs", "base_test", root=r, holdout=1)
    assert torch.equal(again.source_indices(), bt.source_indices())  # seeded
    with pytest.raises(ConfigError, match="holdout"):
        build_dataset("fc100", "base_test", root=r, holdout=1.5)
    with pytest.raises(ConfigError, match="no option 'holdot'"):
        build_dataset("fc100", "base", root=r, holdot=0.1)


# ------------------------------------------------------------------ mini-ImageNet


def _solid(path: Path, value: tuple[int, int, int], size: int = 8, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), value).save(path, format=fmt)


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        w.writerows(rows)


MINI = {"train": ["n01532829", "n01558993", "n01704323"], "val": ["n01855672", "n02091244"],
        "test": ["n01930112", "n01981276"]}
COLORS = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]


def make_mini_resized(root: Path, per_class: int = 4) -> None:
    for part, wnids in MINI.items():
        rows = []
        for c, w in enumerate(wnids):
            for k in range(1, per_class + 1):
                name = f"{w}{k:08d}.jpg"
                _solid(root / "images" / name, COLORS[c % 3], fmt="JPEG")
                rows.append((name, w))
        _write_csv(root / f"{part}.csv", rows)


def test_mini_imagenet_pre_resized_naming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_mini_resized(tmp_path / "mini_imagenet")
    monkeypatch.setenv("LOWSHOT_DATA", str(tmp_path))
    base = build_dataset("mini_imagenet", "base", image_size=8)
    assert base.class_names == MINI["train"] and len(base) == 12 and base.image_size == 8
    assert torch.bincount(base.labels).tolist() == [4, 4, 4]
    img, y = base[5]
    assert img.shape == (3, 8, 8) and y == 1 and abs(img[1].float().mean() - 250) < 8 and img[0].float().mean() < 20
    novel = build_dataset("mini_imagenet", "novel")
    assert novel.class_names == MINI["test"] and novel[0][0].shape == (3, 84, 84)  # default 84x84
    assert build_dataset("mini_imagenet", "val").class_names == MINI["val"]
    held = build_dataset("mini_imagenet", "base_test", image_size=8, holdout=0.25)
    kept = build_dataset("mini_imagenet", "base_train", image_size=8, holdout=0.25)
    assert torch.bincount(held.labels).tolist() == [1, 1, 1] and len(kept) == 9
    assert sorted(held.source_indices().tolist() + kept.source_indices().tolist()) == list(range(12))


def test_mini_imagenet_imagenet_tree_naming(tmp_path: Path) -> None:
    root = tmp_path
    gray = {5: 0, 9: 80, 17: 160, 120: 240}
    for w in MINI["train"]:
        for k, v in gray.items():
            _solid(root / "images" / w / f"{w}_{k}.JPEG", (v, v, v), fmt="JPEG")
    # Ravi index 2 = 2nd file by numeric suffix (_9), not by string order (_17)
    _write_csv(root / "train.csv", [(f"{w}{k:08d}.jpg", w) for w in MINI["train"] for k in (2, 4, 1)])
    ds = build_dataset("mini_imagenet", "base", root=str(root), image_size=8)
    assert [Path(p).name for p in ds.paths[:3]] == ["n01532829_9.JPEG", "n01532829_120.JPEG", "n01532829_5.JPEG"]
    assert abs(ds[0][0].float().mean() - 80) < 8 and abs(ds[1][0].float().mean() - 240) < 8
    # CSVs naming real ImageNet files inside class folders; ImageNet tree given separately
    _write_csv(root / "val.csv", [(f"{w}_17.JPEG", w) for w in MINI["val"]])
    for w in MINI["val"]:
        _solid(root / "images" / w / f"{w}_17.JPEG", (1, 2, 3), fmt="JPEG")
    assert len(build_dataset("mini_imagenet", "val", root=str(root), image_size=8)) == 2
    other = tmp_path / "ilsvrc_train"
    for w in MINI["test"]:
        for k in (3, 1):
            _solid(other / w / f"{w}_{k}.JPEG", (9, 9, 9), fmt="JPEG")
    _write_csv(root / "test.csv", [(f"{w}00000002.jpg", w) for w in MINI["test"]])
    ds = build_dataset("mini_imagenet", "novel", root=str(root), image_size=8, imagenet_root=str(other))
    assert [Path(p).name for p in ds.paths] == ["n01930112_3.JPEG", "n01981276_3.JPEG"]


def test_mini_imagenet_errors_name_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train\.csv.*meta-learning-lstm"):
        build_dataset("mini_imagenet", "base", root=str(tmp_path))
    make_mini_resized(tmp_path, per_class=2)
    (tmp_path / "images" / "n0155899300000002.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of the 6 images.*n0155899300000002\.jpg"):
        build_dataset("mini_imagenet", "base", root=str(tmp_path))
    (tmp_path / "val.csv").write_text("file,class\nx.jpg,n1\n")
    with pytest.raises(DataError, match="val.csv.*header"):
        build_dataset("mini_imagenet", "val", root=str(tmp_path))
    with pytest.raises(ConfigError, match="choose from"):
        build_dataset("mini_imagenet", "train", root=str(tmp_path))


def test_mini_imagenet_pickle_cache(tmp_path: Path) -> None:
    data = np.zeros((5, 84, 84, 3), np.uint8)
    data[:, 0, 0, 0] = np.arange(5)
    cache = {"image_data": data, "class_dict": {"n02": [0, 3], "n01": [1, 2, 4]}}
    (tmp_path / "mini-imagenet-cache-val.pkl").write_bytes(pickle.dumps(cache, protocol=4))
    ds = build_dataset("mini_imagenet", "val", root=str(tmp_path))
    assert ds.class_names == ["n01", "n02"] and ds.labels.tolist() == [1, 0, 0, 1, 0]
    assert ds[3][0].shape == (3, 84, 84) and int(ds[3][0][0, 0, 0]) == 3
    assert build_dataset("mini_imagenet", "val", root=str(tmp_path), image_size=42)[0][0].shape == (3, 42, 42)


# ------------------------------------------------------------------ tiered-ImageNet


def _png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    arr = np.full((size, size, 3), value, np.uint8)
    arr[0, 0] = (value, 255 - value, 7)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_tiered(root: Path, part: str = "train", py2: bool = True) -> list[int]:
    specific = [0, 0, 1, 1, 2, 3, 3, 2]  # four classes, two general categories
    general = [0, 0, 0, 0, 1, 1, 1, 1]
    values = [10 * (i + 1) for i in range(len(specific))]
    labels = {"label_specific": np.array(specific, np.int64), "label_general": np.array(general, np.int64),
              "label_specific_str": ["n01", "n02", "n03", "n04"], "label_general_str": ["birds", "tools"]}
    root.mkdir(parents=True, exist_ok=True)
    if py2:  # the authors' release: py2 pickles, each image a cv2.imencode uint8 array
        py2_pickle([np.frombuffer(_png(v), np.uint8) for v in values], root / f"{part}_images_png.pkl")
        py2_pickle(labels, root / f"{part}_labels.pkl")
    else:
        (root / f"{part}_images_png.pkl").write_bytes(pickle.dumps([_png(v) for v in values], protocol=5))
        (root / f"{part}_labels.pkl").write_bytes(pickle.dumps(labels, protocol=5))
    return values


@pytest.mark.parametrize("py2", [True, False])
def test_tiered_png_pickles(tmp_path: Path, py2: bool) -> None:
    values = make_tiered(tmp_path, "train", py2)
    ds = build_dataset("tiered_imagenet", "base", root=str(tmp_path), image_size=8)
    assert ds.class_names == ["n01", "n02", "n03", "n04"] and ds.labels.tolist() == [0, 0, 1, 1, 2, 3, 3, 2]
    assert ds.class_meta["category"] == ["birds", "birds", "tools", "tools"]
    for i in (0, 5):
        img, _ = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 8, 8)
        assert img[:, 0, 0].tolist() == [values[i], 255 - values[i], 7] and int(img[2, 4, 4]) == values[i]
    assert ds[1][0].shape == (3, 8, 8)
    assert build_dataset("tiered_imagenet", "base", root=str(tmp_path))[0][0].shape == (3, 84, 84)
    sub = ds.select_classes([3, 1])
    assert sub.class_meta["category"] == ["tools", "birds"] and len(sub) == 4
    held = build_dataset("tiered_imagenet", "base_test", root=str(tmp_path), holdout=1)
    assert torch.bincount(held.labels).tolist() == [1, 1, 1, 1]


def test_tiered_split_files_and_errors(tmp_path: Path) -> None:
    make_tiered(tmp_path, "test")
    assert len(build_dataset("tiered_imagenet", "novel", root=str(tmp_path), image_size=8)) == 8
    with pytest.raises(DataError, match="val_labels.pkl"):
        build_dataset("tiered_imagenet", "val", root=str(tmp_path))
    lab = safe_pickle_load(tmp_path / "test_labels.pkl")
    lab["label_specific"] = lab["label_specific"][:5]
    lab["label_general"] = lab["label_general"][:5]
    (tmp_path / "test_labels.pkl").write_bytes(pickle.dumps(lab))
    with pytest.raises(DataError, match="test_labels.pkl.*5 specific"):
        build_dataset("tiered_imagenet", "novel", root=str(tmp_path))
    (tmp_path / "test_labels.pkl").write_bytes(pickle.dumps(_Evil(tmp_path / "pwned")))
    with pytest.raises(DataError, match="refusing"):
        build_dataset("tiered_imagenet", "novel", root=str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_tiered_corrupt_png_names_the_image(tmp_path: Path) -> None:
    make_tiered(tmp_path, "val", py2=False)
    blobs = pickle.loads((tmp_path / "val_images_png.pkl").read_bytes())
    blobs[2] = blobs[2][:20]
    (tmp_path / "val_images_png.pkl").write_bytes(pickle.dumps(blobs))
    ds = build_dataset("tiered_imagenet", "val", root=str(tmp_path), image_size=8)
    ds[1]
    with pytest.raises(DataError, match=r"#2 of .*val_images_png\.pkl"):
        ds[2]


def test_tiered_npz_variant(tmp_path: Path) -> None:
    make_tiered(tmp_path, "train", py2=False)
    (tmp_path / "train_images_png.pkl").unlink()
    imgs = np.stack([np.full((84, 84, 3), i, np.uint8) for i in range(8)])
    np.savez(tmp_path / "train_images.npz", images=imgs)
    ds = build_dataset("tiered_imagenet", "base", root=str(tmp_path))
    assert len(ds) == 8 and int(ds[6][0][1, 3, 3]) == 6 and ds[6][1] == 3


# ------------------------------------------------------------------ CUB-200-2011


def make_cub(root: Path, n_classes: int = 8) -> Path:
    d = root / "CUB_200_2011"
    names = [f"{c + 1:03d}.Bird_{c}" for c in range(n_classes)]
    images, labels, split, boxes = [], [], [], []
    img_id = 0
    for c, name in enumerate(names):
        for k in range(2):
            img_id += 1
            rel = f"{name}/Bird_{c}_{k:04d}_{img_id}.jpg"
            arr = np.full((24, 32, 3), 30, np.uint8)
            arr[4:16, 8:24] = (200, 20 * c, 100)  # the bird, inside its box
            (d / "images" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(d / "images" / rel, format="JPEG", quality=95, subsampling=0)
            images.append(f"{img_id} {rel}")
            labels.append(f"{img_id} {c + 1}")
            split.append(f"{img_id} {1 - k}")
            boxes.append(f"{img_id} 8.0 4.0 16.0 12.0")
    for fname, lines in (("classes.txt", [f"{c + 1} {n}" for c, n in enumerate(names)]), ("images.txt", images),
                         ("image_class_labels.txt", labels), ("train_test_split.txt", split),
                         ("bounding_boxes.txt", boxes)):
        (d / fname).write_text("\n".join(lines) + "\n")
    return d


def test_cub_few_shot_split_rule_and_official_split(tmp_path: Path) -> None:
    make_cub(tmp_path)
    r = str(tmp_path)
    names = [f"{c + 1:03d}.Bird_{c}" for c in range(8)]
    expected = {"base": [0, 2, 4, 6], "val": [1, 5], "novel": [3, 7]}
    for split, ids in expected.items():
        ds = build_dataset("cub", split, root=r, image_size=8)
        assert ds.class_names == [names[i] for i in ids] and len(ds) == 2 * len(ids)
        assert ds.labels.tolist() == [j for j in range(len(ids)) for _ in range(2)]
        img, y = ds[len(ds) - 1]
        assert img.shape == (3, 8, 8) and f"Bird_{ids[y]}_" in Path(ds.parent.paths[int(ds.indices[-1])]).name
    train = build_dataset("cub", "train", root=str(tmp_path / "CUB_200_2011"), image_size=8)
    test = build_dataset("cub", "test", root=r, image_size=8)
    assert len(train) == len(test) == 8 and train.class_names == names and train.labels.tolist() == list(range(8))
    assert all("_0000_" in p for p in train.paths) and all("_0001_" in p for p in test.paths)
    assert build_dataset("cub", "train", root=r)[0][0].shape == (3, 224, 224)
    bt = build_dataset("cub", "base_test", root=r, holdout=1)
    assert torch.bincount(bt.labels).tolist() == [1, 1, 1, 1]


def test_cub_bbox_crop(tmp_path: Path) -> None:
    make_cub(tmp_path, n_classes=2)
    full = build_dataset("cub", "train", root=str(tmp_path), image_size=8)
    crop = build_dataset("cub", "train", root=str(tmp_path), image_size=8, crop_bbox=True)
    img = crop[1][0].float()  # class 1: box colour (200, 20, 100) fills the crop
    assert abs(img[0].mean() - 200) < 10 and abs(img[2].mean() - 100) < 10
    assert full[1][0].float()[0].mean() < 150  # without cropping the grey border dilutes it
    pickle.dumps(crop.loader)  # picklable for DataLoader workers


def test_cub_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"CUB_200_2011.*data\.caltech\.edu.*97eceeb1"):
        build_dataset("cub", "base", root=str(tmp_path))
    d = make_cub(tmp_path)
    next((d / "images").rglob("*.jpg")).unlink()
    with pytest.raises(DataError, match=r"CUB image .*\.jpg"):
        build_dataset("cub", "train", root=str(tmp_path))
    (d / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match="train_test_split.txt"):
        build_dataset("cub", "test", root=str(tmp_path))
    (d / "classes.txt").write_text("1 a\nfoo\n")
    with pytest.raises(DataError, match=r"classes\.txt:2"):
        build_dataset("cub", "base", root=str(tmp_path))


def test_cub_download_via_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cub(tmp_path / "src", n_classes=4)
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "CUB_200_2011", arcname="CUB_200_2011")
        info = tarfile.TarInfo("attributes.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    monkeypatch.setattr(cub_mod, "CUB_URL", archive.as_uri())
    monkeypatch.setattr(cub_mod, "CUB_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setenv("LOWSHOT_DATA", str(tmp_path / "data"))
    ds = build_dataset("cub", "novel", download=True, image_size=8)
    assert ds.class_names == ["004.Bird_3"] and len(ds) == 2
    assert (tmp_path / "data" / "cub" / "CUB_200_2011" / "images.txt").is_file()
    assert ds.location == str(tmp_path / "data" / "cub" / "CUB_200_2011")
    assert (download_dataset("cub") / "classes.txt").is_file()  # already there: nothing fetched
