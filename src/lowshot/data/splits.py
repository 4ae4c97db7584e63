"""Deterministic class and image splits for few-shot protocols.

Few-shot numbers are only comparable when base / val / novel classes never overlap and the split
is reproducible, so every helper here is a pure function of its inputs and an integer seed
(a private ``torch.Generator``; the global RNG is never touched).
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch

from ..errors import DataError

SPLIT_NAMES = ("base", "val", "novel")

Amount = int | float | None


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _count(amount: Amount, total: int, what: str) -> int:
    """An int is a count, a float in [0, 1] a fraction of ``total`` (rounded)."""
    if amount is None:
        return 0
    if isinstance(amount, bool):
        raise DataError(f"{what}: expected a count or a fraction, got {amount!r}")
    if isinstance(amount, int):
        if amount < 0:
            raise DataError(f"{what}: count must be >= 0, got {amount}")
        return amount
    if isinstance(amount, float):
        if not 0.0 <= amount <= 1.0:
            raise DataError(f"{what}: fraction must be in [0, 1], got {amount}")
        return round(amount * total)
    raise DataError(f"{what}: expected a count or a fraction, got {amount!r}")


def split_classes(classes: int | Sequence[str], *, base: Amount = None, val: Amount = 0,
                  novel: Amount = 0, seed: int = 0,
                  groups: Sequence[object] | None = None) -> dict[str, list[int]]:
    """Randomly partition classes into ``{"base", "val", "novel"}`` lists of class ids.

    ``base``/``val``/``novel`` are counts (int) or fractions (float); ``base=None`` takes every
    unit left over. With ``groups`` (one label per class, e.g. its alphabet) the units are the
    distinct groups, so a whole group lands in one split: novel classes then come from unseen
    groups, which is what "novel" means for Omniglot. Ids within each split are ascending.
    """
    n = classes if isinstance(classes, int) else len(classes)
    if groups is not None:
        if len(groups) != n:
            raise DataError(f"groups has {len(groups)} entries for {n} classes")
        units = sorted(set(groups), key=str)
    else:
        units = list(range(n))
    u = len(units)
    n_val, n_novel = _count(val, u, "val"), _count(novel, u, "novel")
    n_base = u - n_val - n_novel if base is None else _count(base, u, "base")
    what = "groups" if groups is not None else "classes"
    if n_base < 0 or n_base + n_val + n_novel > u:
        raise DataError(f"cannot split {u} {what} into base={n_base if base is not None else 'rest'}, "
                        f"val={n_val}, novel={n_novel}")
    order = torch.randperm(u, generator=_generator(seed)).tolist()
    picked = {"novel": order[:n_novel], "val": order[n_novel:n_novel + n_val],
              "base": order[n_novel + n_val:n_novel + n_val + n_base]}
    if groups is None:
        return {k: sorted(picked[k]) for k in SPLIT_NAMES}
    unit_split = {units[i]: k for k, idx in picked.items() for i in idx}
    out: dict[str, list[int]] = {k: [] for k in SPLIT_NAMES}
    for c, g in enumerate(groups):
        if g in unit_split:
            out[unit_split[g]].append(c)
    return out


def explicit_split(class_names: Sequence[str], base: Sequence[str] | None = None,
                   val: Sequence[str] | None = None, novel: Sequence[str] | None = None, *,
                   kind: str = "class") -> dict[str, list[int]]:
    """Class ids for named lists (in the order given); unknown, repeated or shared names raise.

    ``base=None`` means "every class not named in val or novel". ``kind`` names the items in
    error messages (e.g. "alphabet" when splitting groups).
    """
    index = {name: i for i, name in enumerate(class_names)}
    out: dict[str, list[int]] = {}
    seen: dict[str, str] = {}
    for split, names in (("val", val), ("novel", novel), ("base", base)):
        if names is None:
            continue
        if isinstance(names, str):
            raise DataError(f"{split}: expected a list of class names, got the string {names!r}")
        ids = []
        for name in names:
            if name not in index:
                close = difflib.get_close_matches(str(name), list(index), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise DataError(f"{split}: unknown {kind} {name!r}{hint}")
            if name in seen:
                raise DataError(f"{kind} {name!r} is listed in both {seen[name]} and {split}"
                                if seen[name] != split else f"{kind} {name!r} is listed twice in {split}")
            seen[name] = split
            ids.append(index[name])
        out[split] = ids
    if base is None:
        out["base"] = [i for i, name in enumerate(class_names) if name not in seen]
    return {k: out.get(k, []) for k in SPLIT_NAMES}


def _per_class(labels: torch.Tensor) -> list[torch.Tensor]:
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        return []
    return [torch.nonzero(labels == c).reshape(-1) for c in range(int(labels.max()) + 1)]


def sample_per_class(labels: torch.Tensor | Sequence[int], k: int, seed: int = 0) -> torch.Tensor:
    """Indices of at most ``k`` random samples of every class (ascending); for quick subsets."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DataError(f"samples per class must be a positive int, got {k!r}")
    g = _generator(seed)
    keep = [idx[torch.randperm(idx.numel(), generator=g)[:k]] for idx in _per_class(labels)]
    return torch.sort(torch.cat(keep)).values if keep else torch.zeros(0, dtype=torch.long)


def holdout_per_class(labels: torch.Tensor | Sequence[int], amount: float,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out ``amount`` images (count, or fraction) of every class: ``(train_idx, heldout_idx)``.

    Used for "base_test" splits (base-class accuracy on unseen images). Every class keeps at
    least one training image; a request that would empty a class raises naming the class id.
    """
    g = _generator(seed)
    train, held = [], []
    for c, idx in enumerate(_per_class(labels)):
        n = idx.numel()
        if n == 0:
            continue
        h = _count(amount, n, "holdout")
        if h >= n:
            raise DataError(f"cannot hold out {h} of the {n} images of class {c}")
        perm = idx[torch.randperm(n, generator=g)]
        held.append(perm[:h])
        train.append(perm[h:])
    empty = torch.zeros(0, dtype=torch.long)
    return (torch.sort(torch.cat(train)).values if train else empty,
            torch.sort(torch.cat(held)).values if held else empty)
