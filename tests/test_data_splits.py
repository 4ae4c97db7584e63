"""Class / image split helpers: disjointness, sizes, determinism, group integrity, clear errors."""
from __future__ import annotations

import pytest
import torch

from lowshot.data.splits import explicit_split, holdout_per_class, sample_per_class, split_classes
from lowshot.errors import DataError


def test_split_classes_counts_and_fractions() -> None:
    s = split_classes(100, val=0.16, novel=20, seed=3)
    assert [len(s[k]) for k in ("base", "val", "novel")] == [64, 16, 20]
    everything = s["base"] + s["val"] + s["novel"]
    assert sorted(everything) == list(range(100))  # a partition: disjoint and complete
    assert all(s[k] == sorted(s[k]) for k in s)
    s2 = split_classes(10, base=2, val=1, novel=1)
    assert [len(s2[k]) for k in ("base", "val", "novel")] == [2, 1, 1]  # explicit base: rest unused


def test_split_classes_deterministic_per_seed() -> None:
    names = [f"c{i}" for i in range(30)]
    a, b = split_classes(names, val=5, novel=5, seed=7), split_classes(names, val=5, novel=5, seed=7)
    assert a == b
    assert any(split_classes(names, val=5, novel=5, seed=s) != a for s in range(8, 12))
    before = torch.random.get_rng_state()
    split_classes(names, val=5, novel=5, seed=1)
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is not consumed


def test_split_classes_keeps_groups_whole() -> None:
    groups = ["g" + str(i // 3) for i in range(30)] + ["late"] * 2  # 11 groups, sizes 3 and 2
    s = split_classes(len(groups), val=2, novel=3, seed=0, groups=groups)
    seen = {k: {groups[c] for c in s[k]} for k in s}
    assert len(seen["val"]) == 2 and len(seen["novel"]) == 3 and len(seen["base"]) == 6
    assert not (seen["base"] & seen["val"]) and not (seen["base"] & seen["novel"])
    assert not (seen["val"] & seen["novel"])
    assert sorted(s["base"] + s["val"] + s["novel"]) == list(range(32))


@pytest.mark.parametrize("kw,match", [
    ({"val": 8, "novel": 5}, "cannot split 10 classes"),
    ({"val": 1.5}, "fraction must be in"),
    ({"val": -1}, "count must be >= 0"),
    ({"val": "3"}, "expected a count or a fraction"),
])
def test_split_classes_errors(kw: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        split_classes(10, **kw)


def test_explicit_split_order_rest_and_errors() -> None:
    names = ["cat", "dog", "emu", "fox", "gnu"]
    s = explicit_split(names, val=["fox"], novel=["gnu", "cat"])
    assert s == {"base": [1, 2], "val": [3], "novel": [4, 0]}
    with pytest.raises(DataError, match=r"unknown class 'doge'; did you mean 'dog'"):
        explicit_split(names, novel=["doge"])
    with pytest.raises(DataError, match="'fox' is listed in both val and novel"):
        explicit_split(names, val=["fox"], novel=["fox"])
    with pytest.raises(DataError, match="listed twice"):
        explicit_split(names, base=["cat", "cat"])


def test_holdout_per_class() -> None:
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 6)
    train, held = holdout_per_class(labels, 2, seed=0)
    assert torch.bincount(labels[held]).tolist() == [2, 2, 2]
    assert torch.bincount(labels[train]).tolist() == [8, 2, 4]
    assert sorted(train.tolist() + held.tolist()) == list(range(20))
    _, h2 = holdout_per_class(labels, 0.5, seed=0)
    assert torch.bincount(labels[h2]).tolist() == [5, 2, 3]
    assert torch.equal(holdout_per_class(labels, 2, seed=0)[1], held)
    with pytest.raises(DataError, match="of class 1"):
        holdout_per_class(labels, 4)


def test_sample_per_class() -> None:
    labels = torch.tensor([0] * 10 + [1] * 3)
    idx = sample_per_class(labels, 5, seed=1)
    assert torch.bincount(labels[idx]).tolist() == [5, 3] and idx.tolist() == sorted(idx.tolist())
    assert torch.equal(idx, sample_per_class(labels, 5, seed=1))
    assert any(not torch.equal(idx, sample_per_class(labels, 5, seed=s)) for s in range(2, 6))
    with pytest.raises(DataError, match="positive int"):
        sample_per_class(labels, 0)
