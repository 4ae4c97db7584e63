"""Long-tailed subsets: count profiles, exact imbalance factor, seeded selection, balanced splits."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowshot.errors import ConfigError, DataError
from lowshot.longtail import balanced_split, class_counts, class_indices, longtail_counts, make_longtail


def balanced_labels(C: int, n: int) -> torch.Tensor:
    # interleaved, so class membership is not a contiguous block
    return torch.arange(C).repeat(n)


def test_hand_computed_exp_profile():
    # 100 * 10^(-i/4): 100, 56.23, 31.62, 17.78, 10
    assert longtail_counts(5, 10, 100) == [100, 56, 31, 17, 10]
    labels = balanced_labels(5, 120)
    keep = make_longtail(labels, 10, n_max=100)
    assert class_counts(labels[keep], 5).tolist() == [100, 56, 31, 17, 10]


def test_standard_cifar10_lt_counts():
    # the published CIFAR-10-LT (IF = 100) per-class counts (Cao et al. 2019)
    assert longtail_counts(10, 100, 5000) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@settings(max_examples=200, deadline=None)
@given(C=st.integers(2, 40), IF=st.integers(1, 200), m=st.integers(1, 30))
def test_exp_counts_monotone_and_exact_factor(C, IF, m):
    n_max = IF * m
    counts = longtail_counts(C, IF, n_max)
    assert len(counts) == C
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert counts[0] == n_max and counts[-1] * IF == n_max  # n_0 / n_{C-1} == IF exactly
    for i, n in enumerate(counts):  # each is the floor of the formula
        x = n_max * IF ** (-i / (C - 1))
        assert n <= x + 1e-6 and n > x - 1


@settings(max_examples=100, deadline=None)
@given(C=st.integers(2, 12), IF=st.floats(1.0, 50.0), n_max=st.integers(50, 400), seed=st.integers(0, 10**6))
def test_make_longtail_matches_profile(C, IF, n_max, seed):
    labels = balanced_labels(C, n_max)
    keep = make_longtail(labels, IF, seed=seed)
    assert torch.equal(keep, torch.unique(keep))  # sorted, no duplicates
    assert class_counts(labels[keep], C).tolist() == longtail_counts(C, IF, n_max)


def test_step_profile():
    assert longtail_counts(10, 10, 100, "step") == [100] * 5 + [10] * 5
    assert longtail_counts(10, 10, 100, "step", mu=0.3) == [100] * 7 + [10] * 3
    labels = balanced_labels(4, 50)
    assert class_counts(labels[make_longtail(labels, 5, "step")], 4).tolist() == [50, 50, 10, 10]


def test_seeded_and_nested():
    labels = balanced_labels(6, 200)
    a, b = make_longtail(labels, 20, seed=3), make_longtail(labels, 20, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, make_longtail(labels, 20, seed=4))
    # same seed and n_max: a larger imbalance factor only removes images
    small_if = set(make_longtail(labels, 5, seed=3).tolist())
    assert set(a.tolist()) <= small_if


def test_order_puts_head_where_asked():
    labels = balanced_labels(3, 40)
    keep = make_longtail(labels, 4, order=[2, 0, 1])
    assert class_counts(labels[keep], 3).tolist() == [20, 10, 40]
    with pytest.raises(ConfigError, match="permutation"):
        make_longtail(labels, 4, order=[0, 0, 1])


def test_errors():
    labels = torch.cat([torch.zeros(100), torch.ones(100), torch.full((5,), 2)]).long()
    with pytest.raises(DataError, match="class 2 has 5 images"):
        make_longtail(labels, 2)  # needs 50 of class 2
    with pytest.raises(DataError, match="class 0 has 100"):
        make_longtail(balanced_labels(2, 100), 2, n_max=150)
    with pytest.raises(ConfigError, match="unknown long-tail profile 'linear'"):
        longtail_counts(3, 10, 100, "linear")
    with pytest.raises(ConfigError, match="imbalance_factor"):
        longtail_counts(3, 0.5, 100)
    with pytest.raises(ConfigError, match="tail class"):
        longtail_counts(3, 200, 100)
    assert longtail_counts(1, 10, 7) == [7]


def test_balanced_split_and_class_indices():
    labels = torch.cat([torch.zeros(30), torch.ones(12), torch.full((20,), 2)]).long()[torch.randperm(62)]
    val, rest = balanced_split(labels, 10, seed=1)
    assert class_counts(labels[val], 3).tolist() == [10, 10, 10]
    assert class_counts(labels[rest], 3).tolist() == [20, 2, 10]
    assert sorted(val.tolist() + rest.tolist()) == list(range(62))
    assert torch.equal(val, balanced_split(labels, 10, seed=1)[0])
    assert not torch.equal(val, balanced_split(labels, 10, seed=2)[0])
    with pytest.raises(DataError, match="class 1 has 12 images"):
        balanced_split(labels, 13)
    groups = class_indices(labels)
    for c, g in enumerate(groups):
        assert torch.equal(g, torch.nonzero(labels == c).reshape(-1))
    assert class_counts(torch.tensor([0, 2]), 5).tolist() == [1, 0, 1, 0, 0]
    assert math.isclose(float(class_counts(labels).sum()), 62)
