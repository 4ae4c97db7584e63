"""Omniglot (Lake et al. 2015) read straight from the official zips or extracted folders.

Layout: ``images_background/<Alphabet>/characterNN/NNNN_DD.png`` (DD = drawer 01..20). Each
character is a class named ``"Alphabet/characterNN"`` with ``class_meta["alphabet"]``. The
same character found in two sources (the small background sets share Greek and Latin) is read
once; if the copies disagree in image count that is an error, not a silent merge. When a root
holds the full ``images_background`` its subsets ``images_background_small1/2`` are skipped.

Images are decoded once into memory (uint8 [N,1,S,S], S = ``image_size``, default 28, Pillow
antialiased resize) and cached in-process. ``invert=True`` (default) makes strokes bright on a
zero background, as in MNIST: zero padding and zero-initialised statistics then match the
background, which is the usual choice for conv nets on Omniglot.

Splits: ``train`` = every character and drawer. ``base`` / ``val`` / ``novel`` split by
ALPHABET, so novel characters come from alphabets never seen in training (seeded; counts,
fractions or explicit lists via ``base_alphabets`` / ``val_alphabets`` / ``novel_alphabets``,
default 20% val and 20% novel alphabets). ``base_test`` holds the last ``heldout_drawers``
(default 5, i.e. drawers 16-20) drawers of every base character; ``base`` then has drawers 1-15.
``base_val`` is ``base`` plus the val alphabets (same drawers): the final training set once a
recipe has been chosen on val (retraining on train + val); novel stays unseen.

``class_rotations`` (e.g. ``[90, 180, 270]``) is the classic Omniglot class augmentation
(Santoro et al. 2016, Vinyals et al. 2016): every character rotated by each angle becomes a new
class ("Alphabet/characterNN@rot90", same alphabet). It applies to the TRAINING splits only
(``train``, ``base``, ``base_test``, ``base_val``; base and base_test keep the same class list); ``val`` and ``novel``
are never rotated, so the one-shot benchmark stays Lake et al.'s.
"""
from __future__ import annotations

import functools
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import DataError
from .archives import download_url
from .base import TensorImageDataset
from .info import download_target, env_root, register_downloader
from .io import decode_image
from .registry import register_dataset
from .splits import explicit_split, sample_per_class, split_classes

SUBDIR = "omniglot"
FULL_SOURCES = ("images_background", "images_evaluation")
SMALL_SOURCES = ("images_background_small1", "images_background_small2")
URL = "https://github.com/brendenlake/omniglot/raw/master/python/{}.zip"
# MD5s of the official zips (as also listed by torchvision's Omniglot reader).
MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",
       "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
SPLITS = ("train", "base", "base_test", "val", "novel", "base_val")
TRAINING_SPLITS = ("train", "base", "base_test", "base_val")  # the splits ``class_rotations`` multiplies

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- locating sources

def _named_sources(folder: Path) -> list[Path]:
    """Known sources in a folder (extracted folder preferred over its zip)."""
    found: dict[str, Path] = {}
    for name in FULL_SOURCES + SMALL_SOURCES:
        for cand in (folder / name, folder / f"{name}.zip"):
            if cand.exists():
                found[name] = cand
                break
    if "images_background" in found:  # the small sets are subsets of the full background set
        for name in SMALL_SOURCES:
            found.pop(name, None)
    return list(found.values())


def _expand(path: Path) -> list[Path]:
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(f"Omniglot source {path} is not a zip file")
        return [path]
    if path.is_dir():
        for folder in (path, path / "omniglot-py"):
            named = _named_sources(folder)
            if named:
                return named
        return [path]  # an extracted source itself: <Alphabet>/<character>/*.png
    raise DataError(f"Omniglot source {path} does not exist")


def _not_found(where: str) -> DataError:
    return DataError(
        f"Omniglot not found ({where}). Pass root=DIR holding images_background.zip / "
        f"images_evaluation.zip (or the small sets, or extracted folders of the same names), or "
        f"set $LOWSHOT_DATA (then $LOWSHOT_DATA/{SUBDIR}), or use download=True / `lowshot data "
        f"download omniglot --root DIR` to fetch the official zips from github.com/brendenlake/omniglot")


def find_sources(root: PathLike | Sequence[PathLike] | None = None) -> list[Path]:
    """Zips / folders to read: explicit root (a dir, a zip, or a list), else $LOWSHOT_DATA/omniglot."""
    if root is None:
        env = env_root(SUBDIR)
        if env is None or not env.is_dir():
            raise _not_found("no root given and $LOWSHOT_DATA/omniglot does not exist")
        sources = _named_sources(env)
        if not sources:
            raise _not_found(f"nothing usable in {env}")
        return sources
    roots = [root] if isinstance(root, (str, os.PathLike)) else list(root)
    if not roots:
        raise _not_found("empty list of roots")
    return [p for r in roots for p in _expand(Path(r).expanduser())]


@register_downloader("omniglot")
def download_omniglot(root: PathLike | None = None) -> Path:
    """Fetch the official background and evaluation zips (MD5-checked); they are read unextracted."""
    target = download_target(root, SUBDIR, "Omniglot")
    for name, md5 in MD5.items():
        if not (target / name).is_dir():
            download_url(URL.format(name), target / f"{name}.zip", md5)
    return target


# ----------------------------------------------------------------------------- scanning / decoding

def _character_key(parts: Sequence[str]) -> str | None:
    if len(parts) < 3 or not parts[-1].lower().endswith(".png"):
        return None
    if any(p.startswith((".", "__MACOSX")) for p in parts):
        return None
    return f"{parts[-3]}/{parts[-2]}"


def _scan(source: Path) -> dict[str, list[str]]:
    """Map "Alphabet/characterNN" -> sorted member names (zip) or file paths (folder)."""
    chars: dict[str, list[str]] = {}
    if source.is_file():
        try:
            with zipfile.ZipFile(source) as zf:
                names = [i.filename for i in zf.infolist() if not i.is_dir()]
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"cannot read Omniglot zip {source}: {exc}") from exc
        for name in names:
            key = _character_key(name.split("/"))
            if key is not None:
                chars.setdefault(key, []).append(name)
    else:
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(source).parts
            for f in filenames:
                key = _character_key((*rel, f)) if len(rel) >= 2 else None
                if key is not None:
                    chars.setdefault(key, []).append(os.path.join(dirpath, f))
    if not chars:
        raise DataError(f"no Omniglot characters in {source} (expected <Alphabet>/<characterNN>/*.png)")
    return {k: sorted(v, key=lambda s: os.path.basename(s)) for k, v in chars.items()}


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _decoded(stamps: tuple[tuple[str, int, int], ...], image_size: int, invert: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], list[str]]:
    """(images [N,1,S,S], labels [N], drawer rank [N], class names, alphabets) for the sources."""
    merged: dict[str, tuple[Path, list[str]]] = {}
    for stamp in stamps:
        source = Path(stamp[0])
        for key, files in _scan(source).items():
            if key in merged:
                first, kept = merged[key]
                if len(kept) != len(files):
                    raise DataError(f"character {key} has {len(kept)} images in {first} but "
                                    f"{len(files)} in {source}")
                continue
            merged[key] = (source, files)
    names = sorted(merged)
    total = sum(len(merged[k][1]) for k in names)
    images = torch.empty((total, 1, image_size, image_size), dtype=torch.uint8)
    labels = torch.empty(total, dtype=torch.long)
    ranks = torch.empty(total, dtype=torch.long)
    zips: dict[Path, zipfile.ZipFile] = {}
    try:
        i = 0
        from ..utils import progress
        for c, key in enumerate(progress(names, desc=f"decoding Omniglot ({total} images)")):  # shown after 2 s
            source, files = merged[key]
            for r, f in enumerate(files):
                if source.is_file():
                    zf = zips.get(source) or zips.setdefault(source, zipfile.ZipFile(source))
                    try:
                        raw = zf.read(f)
                    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:  # e.g. "Bad CRC-32"
                        raise DataError(f"Omniglot zip {source} is corrupt: cannot read {f} ({exc}); "
                                        f"download it again") from exc
                    img = decode_image(raw, f"{source}:{f}", image_size, 1)
                else:
                    with open(f, "rb") as fh:
                        img = decode_image(fh, f, image_size, 1)
                images[i] = img
                labels[i], ranks[i] = c, r
                i += 1
    finally:
        for zf in zips.values():
            zf.close()
    if invert:
        images = 255 - images
    return images, labels, ranks, names, [k.split("/")[0] for k in names]


# ----------------------------------------------------------------------------- splits

Amount = int | float | Sequence[str] | None


def alphabet_split(alphabets: Sequence[str], *, seed: int = 0, base_alphabets: Sequence[str] | None = None,
                   val_alphabets: Amount = None, novel_alphabets: Amount = None) -> dict[str, list[int]]:
    """Class ids per split, whole alphabets per split (see module doc for the kw semantics)."""
    given = {"base": base_alphabets, "val": val_alphabets, "novel": novel_alphabets}
    if isinstance(base_alphabets, (int, float)) and not isinstance(base_alphabets, bool):
        raise DataError("base_alphabets must be a list of alphabet names (base takes the rest otherwise)")
    lists = {k: v for k, v in given.items() if v is not None and not isinstance(v, (int, float))}
    if lists:
        numeric = [k for k, v in given.items() if v is not None and k not in lists]
        if numeric:
            raise DataError(f"give alphabet lists for all splits or counts for all, not both "
                            f"({', '.join(k + '_alphabets' for k in numeric)} is a count)")
        unique = sorted(set(alphabets))
        ids = explicit_split(unique, base=lists.get("base"), val=lists.get("val", []),
                             novel=lists.get("novel", []), kind="alphabet")
        split_of = {unique[i]: k for k, idx in ids.items() for i in idx}
        out: dict[str, list[int]] = {k: [] for k in ids}
        for c, a in enumerate(alphabets):
            if a in split_of:
                out[split_of[a]].append(c)
        return out
    return split_classes(len(alphabets), val=0.2 if val_alphabets is None else val_alphabets,  # type: ignore[arg-type]
                         novel=0.2 if novel_alphabets is None else novel_alphabets,  # type: ignore[arg-type]
                         seed=seed, groups=list(alphabets))


def _quarter_turns(angles: Sequence[int] | None) -> list[int]:
    """Counter-clockwise quarter turns (1..3) for ``class_rotations``; 0 / 360 (the original) dropped."""
    if angles is None:
        return []
    if isinstance(angles, (str, int)) or not all(isinstance(a, int) and not isinstance(a, bool) for a in angles):
        raise DataError(f"class_rotations must be a list of angles in degrees (multiples of 90), got {angles!r}")
    if any(a % 90 for a in angles):
        raise DataError(f"class_rotations must be multiples of 90 degrees, got {list(angles)}")
    turns = [(a // 90) % 4 for a in angles]
    turns = [t for t in turns if t]
    if len(set(turns)) != len(turns):
        raise DataError(f"class_rotations repeats an angle (mod 360): {list(angles)}")
    return turns


def _rotated_classes(images: torch.Tensor, labels: torch.Tensor, names: list[str], alphabets: list[str],
                     turns: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Append each quarter-turned copy of every image as a new class (ids offset by C per angle)."""
    c = len(names)
    imgs, labs = [images], [labels]
    out_names, out_alpha = list(names), list(alphabets)
    for j, t in enumerate(turns, start=1):
        imgs.append(torch.rot90(images, t, dims=(2, 3)))
        labs.append(labels + j * c)
        out_names += [f"{n}@rot{90 * t}" for n in names]
        out_alpha += alphabets
    return torch.cat(imgs), torch.cat(labs), out_names, out_alpha


@register_dataset("omniglot")
def omniglot(split: str, root: PathLike | Sequence[PathLike] | None = None, image_size: int | None = None,
             download: bool = False, *, seed: int = 0, base_alphabets: Sequence[str] | None = None,
             val_alphabets: Amount = None, novel_alphabets: Amount = None, heldout_drawers: int = 5,
             invert: bool = True, channels: int = 1, max_per_class: int | None = None,
             class_rotations: Sequence[int] | None = None) -> TensorImageDataset:
    """Omniglot split in memory as uint8 [N,channels,S,S]; see the module docstring for splits.

    ``max_per_class`` keeps at most that many images per character (seeded by ``seed``).
    ``class_rotations``: angles (multiples of 90) whose rotated copies become extra classes of
    the training splits (module docstring).
    """
    if split not in SPLITS:
        raise DataError(f"unknown omniglot split {split!r} (known: {', '.join(SPLITS)}; Omniglot has "
                        f"no official test partition, novel alphabets play that role)")
    size = 28 if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"image_size must be a positive int, got {image_size!r}")
    if channels not in (1, 3):
        raise DataError(f"omniglot channels must be 1 or 3, got {channels!r}")
    turns = _quarter_turns(class_rotations)
    if download:
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise DataError("download=True needs a single root folder, not a list of sources")
        download_omniglot(root)  # type: ignore[arg-type]
    sources = find_sources(root)
    images, labels, ranks, names, alphabets = _decoded(tuple(_stamp(s) for s in sources), size, bool(invert))
    if split == "train":
        ids, keep = list(range(len(names))), torch.arange(labels.numel())
    else:
        parts = alphabet_split(alphabets, seed=seed, base_alphabets=base_alphabets,
                               val_alphabets=val_alphabets, novel_alphabets=novel_alphabets)
        ids = parts["base"] + parts["val"] if split == "base_val" else parts[
            "base" if split == "base_test" else split]
        if not ids:
            raise DataError(f"omniglot split {split!r} has no alphabets (check val_alphabets/novel_alphabets)")
        chosen = torch.zeros(len(names), dtype=torch.bool)
        chosen[torch.tensor(ids)] = True
        mask = chosen[labels]
        if split in ("base", "base_test", "base_val"):
            if isinstance(heldout_drawers, bool) or not isinstance(heldout_drawers, int) or heldout_drawers < 0:
                raise DataError(f"heldout_drawers must be an int >= 0, got {heldout_drawers!r}")
            per_class = torch.bincount(labels, minlength=len(names))[labels]
            held = ranks >= per_class - heldout_drawers
            mask &= held if split == "base_test" else ~held
        keep = torch.nonzero(mask).reshape(-1)
        if keep.numel() == 0:
            raise DataError(f"omniglot split {split!r} is empty (heldout_drawers={heldout_drawers})")
    mapping = torch.full((len(names),), -1, dtype=torch.long)
    mapping[torch.tensor(ids)] = torch.arange(len(ids))
    if max_per_class is not None:
        keep = keep[sample_per_class(mapping[labels[keep]], max_per_class, seed)]
    subset = images if keep.numel() == labels.numel() else images.index_select(0, keep)
    targets = mapping[labels[keep]]
    class_names, class_alphabets = [names[i] for i in ids], [alphabets[i] for i in ids]
    if turns and split in TRAINING_SPLITS:
        subset, targets, class_names, class_alphabets = _rotated_classes(
            subset, targets, class_names, class_alphabets, turns)
    if channels == 3:
        subset = subset.expand(-1, 3, -1, -1).contiguous()
    ds = TensorImageDataset(subset, targets, class_names, {"alphabet": class_alphabets})
    ds.location = ", ".join(str(s) for s in sources)
    ds.preprocess = {"invert": bool(invert)}
    return ds
