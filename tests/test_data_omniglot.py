"""Omniglot read from the real small background zips (and from tiny crafted ones)."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from lowshot.data import build_dataset, dataset_summary, download_dataset, safe_extract
from lowshot.data import omniglot as om
from lowshot.data.io import decode_image
from lowshot.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
SMALL = [SHARED / "images_background_small1.zip", SHARED / "images_background_small2.zip"]
needs_real = pytest.mark.skipif(not all(p.is_file() for p in SMALL), reason=f"small Omniglot zips not in {SHARED}")


def _png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (10, 10), value).save(buf, format="PNG")
    return buf.getvalue()


def _fake_zip(path: Path, chars: dict[str, int], top: str | None = None) -> Path:
    """chars: "Alphabet/characterNN" -> number of drawers; pixel value encodes the drawer."""
    top = top or path.stem
    with zipfile.ZipFile(path, "w") as zf:
        for key, drawers in chars.items():
            for d in range(1, drawers + 1):
                zf.writestr(f"{top}/{key}/0001_{d:02d}.png", _png_bytes(10 * d))
    return path


def test_crafted_zips_dedup_meta_and_drawers(tmp_path: Path) -> None:
    _fake_zip(tmp_path / "images_background_small1.zip", {"Greek/character01": 4, "Alpha/character01": 4})
    _fake_zip(tmp_path / "images_background_small2.zip", {"Greek/character01": 4, "Beta/character02": 4})
    ds = build_dataset("omniglot", "train", root=str(tmp_path), image_size=10, invert=False)
    assert ds.class_names == ["Alpha/character01", "Beta/character02", "Greek/character01"]
    assert ds.class_meta == {"alphabet": ["Alpha", "Beta", "Greek"]}
    assert len(ds) == 12 and ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.images[:4, 0, 0, 0].tolist() == [10, 20, 30, 40]  # drawers in order
    inv = build_dataset("omniglot", "train", root=str(tmp_path), image_size=10)
    assert torch.equal(inv.images, 255 - ds.images)  # default: inverted (bright strokes)
    split = {"base_alphabets": ["Alpha", "Greek"], "val_alphabets": ["Beta"], "heldout_drawers": 1}
    base = build_dataset("omniglot", "base", root=str(tmp_path), image_size=10, invert=False, **split)
    held = build_dataset("omniglot", "base_test", root=str(tmp_path), image_size=10, invert=False, **split)
    assert base.class_names == held.class_names == ["Alpha/character01", "Greek/character01"]
    assert base.images[:, 0, 0, 0].tolist() == [10, 20, 30] * 2 and held.images[:, 0, 0, 0].tolist() == [40] * 2
    with pytest.raises(DataError, match="split 'novel' has no alphabets"):
        build_dataset("omniglot", "novel", root=str(tmp_path), **split)
    few = build_dataset("omniglot", "train", root=str(tmp_path), image_size=10, max_per_class=2, seed=5)
    assert torch.bincount(few.labels).tolist() == [2, 2, 2]
    assert torch.equal(few.images, build_dataset("omniglot", "train", root=str(tmp_path), image_size=10,
                                                 max_per_class=2, seed=5).images)


def test_conflicting_duplicate_is_an_error(tmp_path: Path) -> None:
    a = _fake_zip(tmp_path / "a.zip", {"Greek/character01": 4})
    b = _fake_zip(tmp_path / "b.zip", {"Greek/character01": 3})
    with pytest.raises(DataError, match=r"Greek/character01 has 4 images in .*a\.zip but 3 in .*b\.zip"):
        build_dataset("omniglot", "train", root=[str(a), str(b)])


def test_not_found_and_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOWSHOT_DATA", raising=False)
    with pytest.raises(DataError, match="Omniglot not found.*download=True"):
        build_dataset("omniglot", "train")
    with pytest.raises(DataError, match="no Omniglot characters"):
        build_dataset("omniglot", "train", root=str(tmp_path))
    calls = []

    def fake_download(url: str, dest: Path, md5: str | None = None) -> Path:
        calls.append((url, md5))
        dest.parent.mkdir(parents=True, exist_ok=True)
        return _fake_zip(dest, {f"{dest.stem}_Script/character01": 20})

    monkeypatch.setattr(om, "download_url", fake_download)
    monkeypatch.setenv("LOWSHOT_DATA", str(tmp_path / "data"))
    assert download_dataset("omniglot") == tmp_path / "data" / "omniglot"
    assert calls == [
        ("https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
         "68d2efa1b9178cc56df9314c21c6e718"),
        ("https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip",
         "6b91aef0f799c5bb55b94e3f2daec811")]
    ds = build_dataset("omniglot", "train")  # found through $LOWSHOT_DATA/omniglot
    assert ds.class_meta["alphabet"] == ["images_background_Script", "images_evaluation_Script"]


@needs_real
def test_real_small_sets_counts() -> None:
    ds = build_dataset("omniglot", "train", root=str(SHARED))
    assert ds.num_classes == 242 and len(ds) == 4840
    assert len(set(ds.class_meta["alphabet"])) == 8
    assert torch.bincount(ds.labels).tolist() == [20] * 242
    assert ds.images.shape == (4840, 1, 28, 28) and ds.images.dtype == torch.uint8
    # inverted by default: the background (image corners) is dark, strokes are bright
    assert int(ds.images[:, 0, 0, 0].max()) == 0 and int(ds.images.amax(dim=(1, 2, 3)).min()) > 128
    again = build_dataset("omniglot", "train", root=[str(p) for p in SMALL])
    assert torch.equal(again.images, ds.images)  # same sources, same cached decode


@needs_real
def test_real_alphabet_split_is_disjoint_and_seeded() -> None:
    splits = {s: build_dataset("omniglot", s, root=str(SHARED)) for s in ("base", "val", "novel", "base_test")}
    alph = {s: set(d.class_meta["alphabet"]) for s, d in splits.items()}
    assert not (alph["base"] & alph["val"]) and not (alph["base"] & alph["novel"])
    assert not (alph["val"] & alph["novel"])
    assert len(alph["base"] | alph["val"] | alph["novel"]) == 8
    assert (len(alph["val"]), len(alph["novel"])) == (2, 2)  # 20% of 8 alphabets each, rounded
    assert splits["base_test"].class_names == splits["base"].class_names
    assert torch.bincount(splits["base"].labels).unique().tolist() == [15]  # drawers 1-15
    assert torch.bincount(splits["base_test"].labels).unique().tolist() == [5]  # drawers 16-20
    assert sum(len(d) for d in splits.values()) == 4840
    other = [build_dataset("omniglot", "novel", root=str(SHARED), seed=s).class_meta["alphabet"]
             for s in range(1, 4)]
    assert any(set(o) != alph["novel"] for o in other)
    same = build_dataset("omniglot", "novel", root=str(SHARED), seed=0)
    assert same.class_names == splits["novel"].class_names


@needs_real
def test_real_base_test_is_drawer_16_to_20() -> None:
    held = build_dataset("omniglot", "base_test", root=str(SHARED))
    first = held.class_names[0]
    with zipfile.ZipFile(SMALL[0]) as z1, zipfile.ZipFile(SMALL[1]) as z2:
        for zf in (z1, z2):
            names = sorted(n for n in zf.namelist() if f"/{first}/" in n and n.endswith(".png"))
            if names:
                expected = 255 - decode_image(zf.read(names[15]), names[15], 28, 1)  # drawer 16
                break
    assert names[15].endswith("_16.png")
    assert torch.equal(held.images[0], expected)


@needs_real
def test_real_explicit_alphabets_and_errors() -> None:
    ds = build_dataset("omniglot", "novel", root=str(SHARED), novel_alphabets=["Korean"],
                       val_alphabets=["Greek", "Latin"])
    assert set(ds.class_meta["alphabet"]) == {"Korean"} and ds.num_classes == 40
    base = build_dataset("omniglot", "base", root=str(SHARED), novel_alphabets=["Korean"],
                         val_alphabets=["Greek", "Latin"])
    assert len(set(base.class_meta["alphabet"])) == 5
    with pytest.raises(DataError, match="novel: unknown alphabet 'Korea'; did you mean 'Korean'"):
        build_dataset("omniglot", "novel", root=str(SHARED), novel_alphabets=["Korea"])
    with pytest.raises(DataError, match="not both"):
        build_dataset("omniglot", "novel", root=str(SHARED), novel_alphabets=["Korean"], val_alphabets=2)
    with pytest.raises(DataError, match="unknown omniglot split 'test'"):
        build_dataset("omniglot", "test", root=str(SHARED))


@needs_real
def test_real_extracted_folder_equals_zip(tmp_path: Path) -> None:
    out = safe_extract(SMALL[0], tmp_path / "x")
    from_dir = build_dataset("omniglot", "train", root=[str(out / "images_background_small1"), str(SMALL[1])],
                             image_size=20)
    from_zip = build_dataset("omniglot", "train", root=[str(p) for p in SMALL], image_size=20)
    assert from_dir.class_names == from_zip.class_names
    assert torch.equal(from_dir.images, from_zip.images) and from_dir.images.shape[-1] == 20
    assert "242 classes" in dataset_summary("omniglot", SHARED)


def _marked_zip(path: Path, chars: list[str], drawers: int = 4) -> Path:
    """Each image black with one white pixel at (row 1, col 8): rotations are visible."""
    with zipfile.ZipFile(path, "w") as zf:
        for key in chars:
            for d in range(1, drawers + 1):
                img = Image.new("L", (10, 10), 0)
                img.putpixel((8, 1), 255)  # (x, y)
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                zf.writestr(f"{path.stem}/{key}/0001_{d:02d}.png", buf.getvalue())
    return path


def test_class_rotations_are_new_training_classes_only(tmp_path: Path) -> None:
    _marked_zip(tmp_path / "images_background.zip", ["Alpha/character01", "Beta/character01", "Gamma/character01"])
    split = {"base_alphabets": ["Alpha", "Beta"], "val_alphabets": ["Gamma"], "heldout_drawers": 1,
             "invert": False, "image_size": 10}
    plain = build_dataset("omniglot", "base", root=str(tmp_path), **split)
    rot = build_dataset("omniglot", "base", root=str(tmp_path), class_rotations=[90, 180, 270], **split)
    assert rot.class_names == ["Alpha/character01", "Beta/character01",
                               "Alpha/character01@rot90", "Beta/character01@rot90",
                               "Alpha/character01@rot180", "Beta/character01@rot180",
                               "Alpha/character01@rot270", "Beta/character01@rot270"]
    assert rot.class_meta["alphabet"] == ["Alpha", "Beta"] * 4
    assert len(rot) == 4 * len(plain) and torch.bincount(rot.labels).tolist() == [3] * 8
    assert torch.equal(rot.images[:len(plain)], plain.images) and torch.equal(rot.labels[:len(plain)], plain.labels)
    # the white pixel at (row 1, col 8) turns counter-clockwise: 90 -> (1, 1), 180 -> (8, 1), 270 -> (8, 8)
    for j, (r, c) in enumerate([(1, 8), (1, 1), (8, 1), (8, 8)]):
        img = rot.images[j * len(plain), 0]
        assert img[r, c] > 200 and int((img > 200).sum()) == 1, j
        assert int(rot.labels[j * len(plain)]) == 2 * j
    held = build_dataset("omniglot", "base_test", root=str(tmp_path), class_rotations=[90, 180, 270], **split)
    assert held.class_names == rot.class_names and len(held) == 8  # one held-out drawer per class
    train = build_dataset("omniglot", "train", root=str(tmp_path), class_rotations=[180], image_size=10)
    assert train.num_classes == 6
    val = build_dataset("omniglot", "val", root=str(tmp_path), class_rotations=[90, 180, 270], **split)
    assert val.class_names == ["Gamma/character01"] and len(val) == 4  # benchmark splits never rotate
    # base_val: base plus the val alphabets, same held-out drawers, rotated like base
    both = build_dataset("omniglot", "base_val", root=str(tmp_path), class_rotations=[90], **split)
    assert both.class_names == ["Alpha/character01", "Beta/character01", "Gamma/character01",
                                "Alpha/character01@rot90", "Beta/character01@rot90", "Gamma/character01@rot90"]
    assert both.class_meta["alphabet"] == ["Alpha", "Beta", "Gamma"] * 2
    assert torch.bincount(both.labels).tolist() == [3] * 6       # 4 drawers, the last one held out
    plain_both = build_dataset("omniglot", "base_val", root=str(tmp_path), **split)
    assert torch.equal(plain_both.images[:len(plain)], plain.images)   # base's images first, unchanged
    for bad, msg in (([45], "multiples of 90"), ([90, 450], "repeats"), (90, "list of angles")):
        with pytest.raises(DataError, match=msg):
            build_dataset("omniglot", "base", root=str(tmp_path), class_rotations=bad, **split)
