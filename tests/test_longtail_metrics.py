"""Many / medium / few-shot accuracy: official boundaries, NaN groups, rank thresholds, tables."""
from __future__ import annotations

import math

import pytest
import torch

from lowshot.longtail import (format_per_class_table, per_class_table, shot_accuracy, shot_groups,
                              thresholds_by_rank)


def test_official_boundaries():
    # many: > 100, few: < 20, medium: 20..100 inclusive (Kang et al.'s shot_acc)
    assert shot_groups([101, 100, 20, 19]) == ["many", "medium", "medium", "few"]


def test_hand_computed_shot_accuracy():
    train_counts = [500, 150, 60, 20, 10, 3]  # many, many, medium, medium, few, few
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 5, 5])
    preds = torch.tensor([0, 0, 0, 1, 1, 1, 2, 0, 0, 0, 4, 0, 0, 0, 5, 5])
    # per-class accuracy: 3/4, 2/2, 1/2, 0/2, 1/4, 2/2
    r = shot_accuracy(preds, labels, train_counts)
    assert r["per_class"] == pytest.approx([75.0, 100.0, 50.0, 0.0, 25.0, 100.0])
    assert r["many"] == pytest.approx((75 + 100) / 2)
    assert r["medium"] == pytest.approx((50 + 0) / 2)
    assert r["few"] == pytest.approx((25 + 100) / 2)
    assert r["all"] == pytest.approx(100 * 9 / 16)  # pooled over images
    assert r["class_mean"] == pytest.approx((75 + 100 + 50 + 0 + 25 + 100) / 6)
    assert r["groups"] == ["many", "many", "medium", "medium", "few", "few"]
    logits = torch.nn.functional.one_hot(preds, 6).float() * 3 - 1
    assert shot_accuracy(logits, labels, torch.tensor(train_counts)) == r


def test_empty_group_and_absent_class_are_nan():
    r = shot_accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), [1000, 500, 200])
    assert r["many"] == 100.0 and math.isnan(r["medium"]) and math.isnan(r["few"])
    assert math.isnan(r["per_class"][2])  # class 2 never occurs in the evaluation labels
    assert r["class_mean"] == 100.0


def test_custom_thresholds_and_rank_thresholds():
    cifar10_lt = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    many, few = thresholds_by_rank(cifar10_lt)
    groups = shot_groups(cifar10_lt, many, few)
    assert groups == ["many"] * 3 + ["medium"] * 4 + ["few"] * 3
    shuffled = [cifar10_lt[i] for i in [3, 9, 0, 5, 1, 8, 2, 7, 4, 6]]  # ranks, not class ids
    assert shot_groups(shuffled, *thresholds_by_rank(shuffled)).count("few") == 3
    # ties at a boundary go to medium
    assert shot_groups([9, 5, 5, 5, 1], *thresholds_by_rank([9, 5, 5, 5, 1], (0.4, 0.2))) == \
        ["many", "medium", "medium", "medium", "few"]
    assert shot_groups([8, 3], *thresholds_by_rank([8, 3], (0.5, 0.5))) == ["many", "few"]
    assert shot_groups([8, 3], *thresholds_by_rank([8, 3], (0.0, 0.0))) == ["medium", "medium"]
    with pytest.raises(ValueError, match="fractions"):
        thresholds_by_rank([1, 2], (0.8, 0.5))


def test_per_class_table():
    rows = per_class_table(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 1]), [10, 300],
                           class_names=["cat", "dog"])
    assert [r["name"] for r in rows] == ["dog", "cat"]  # head class first
    assert rows[0] == {"class": 1, "name": "dog", "train_count": 300, "test_count": 2, "correct": 1,
                       "accuracy": 50.0, "group": "many"}
    assert rows[1]["accuracy"] == 0.0 and rows[1]["group"] == "few"
    text = format_per_class_table(rows)
    assert "dog" in text.splitlines()[1] and "50.00" in text
    with pytest.raises(ValueError, match="out of range"):
        shot_accuracy(torch.tensor([0]), torch.tensor([5]), [1, 2])
