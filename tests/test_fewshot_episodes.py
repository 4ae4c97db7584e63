"""Episode sampling: layout, disjointness, determinism (hard-coded), clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lowshot.errors import ConfigError, DataError
from lowshot.fewshot import episode_labels, sample_episodes


def _labels(classes: int = 10, per: int = 20) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(per)


def test_shape_dtype_and_support_query_layout():
    labels = _labels()
    eps = sample_episodes(labels, way=5, shot=3, query=4, episodes=50, seed=1)
    assert eps.shape == (50, 5, 7) and eps.dtype == torch.int64
    cls = labels[eps]                                   # [E, way, shot + query]
    assert bool((cls == cls[:, :, :1]).all()), "every column block must hold one class"
    first = cls[:, :, 0]
    assert all(len(set(row.tolist())) == 5 for row in first), "classes of an episode are distinct"
    flat = eps.reshape(50, -1)
    assert all(len(set(row.tolist())) == 35 for row in flat), "no sample twice (support ∩ query = ∅)"


def test_same_seed_same_tensor_different_seed_differs():
    labels = _labels()
    a = sample_episodes(labels, 5, 1, 15, 100, seed=3)
    assert torch.equal(a, sample_episodes(labels, 5, 1, 15, 100, seed=3))
    assert not torch.equal(a, sample_episodes(labels, 5, 1, 15, 100, seed=4))


def test_hard_coded_episodes_catch_cross_machine_changes():
    eps = sample_episodes(torch.arange(12) // 3, way=2, shot=1, query=1, episodes=3, seed=7)
    assert eps.tolist() == [[[4, 5], [1, 0]], [[6, 8], [11, 10]], [[10, 9], [7, 6]]]
    # arbitrary integer labels (not 0..C-1), classes of unequal size
    eps = sample_episodes([5, 5, 5, 9, 9, 9, 2, 2, 2, 2], way=3, shot=2, query=1, episodes=2, seed=0)
    assert eps.tolist() == [[[3, 4, 5], [1, 2, 0], [9, 8, 7]], [[2, 0, 1], [3, 5, 4], [9, 6, 7]]]


def test_numpy_labels_and_unsorted_classes_work():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat([40, 7, 13, 99, 3], 6))
    eps = sample_episodes(labels, way=4, shot=2, query=3, episodes=30, seed=0)
    cls = torch.as_tensor(labels)[eps]
    assert bool((cls == cls[:, :, :1]).all())


def test_class_and_sample_draws_are_roughly_uniform():
    labels = _labels(classes=8, per=10)
    eps = sample_episodes(labels, way=2, shot=1, query=1, episodes=4000, seed=0)
    class_counts = torch.bincount(labels[eps[:, :, 0]].flatten(), minlength=8).float()
    assert class_counts.min() > 0.85 * class_counts.mean()        # expected 1000 each
    sample_counts = torch.bincount(eps.flatten(), minlength=80).float()
    assert sample_counts.min() > 0.6 * sample_counts.mean()       # expected 200 each


def test_error_names_class_with_too_few_samples():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 10 + [3] * 2)
    with pytest.raises(DataError, match=r"class 1 \('cat'\) has 3 samples.*shot \+ query = 1 \+ 4 = 5.*1 more"):
        sample_episodes(labels, 2, 1, 4, 10, class_names=["dog", "cat", "cow", "owl"])
    with pytest.raises(DataError, match=r"class 13 has 3 samples"):
        sample_episodes(labels + 12, 2, 1, 4, 10)


def test_error_when_fewer_classes_than_way():
    with pytest.raises(DataError, match="5-way episodes need at least 5 classes, the labels have 3"):
        sample_episodes(_labels(classes=3), way=5, shot=1, query=1, episodes=1)


@pytest.mark.parametrize("kw", [{"way": 0}, {"shot": 0}, {"query": -1}, {"episodes": 0}, {"way": 2.5}])
def test_bad_sizes_raise_config_error(kw):
    args = {"way": 2, "shot": 1, "query": 1, "episodes": 1, **kw}
    with pytest.raises(ConfigError):
        sample_episodes(_labels(), **args)


def test_bad_labels_raise_data_error():
    with pytest.raises(DataError, match="1-D"):
        sample_episodes(torch.zeros(4, 2, dtype=torch.long), 1, 1, 1, 1)
    with pytest.raises(DataError, match="integers"):
        sample_episodes(torch.tensor([0.5, 1.0]), 1, 1, 0, 1)


def test_episode_labels_match_class_major_layout():
    assert episode_labels(3, 2).tolist() == [0, 0, 1, 1, 2, 2]


def test_two_thousand_episodes_with_many_samples_per_class():
    labels = _labels(classes=20, per=600)
    eps = sample_episodes(labels, 5, 5, 15, 2000, seed=0)
    assert eps.shape == (2000, 5, 20)
    assert eps.unique().numel() > 0.9 * labels.numel()   # draws spread over the whole split


# --- within-group episodes (Lake et al.'s within-alphabet protocol) ---------------------------

def _grouped_labels():
    # 12 classes x 6 samples; groups: A has classes 0-4, B has 5-6 (too small for 3-way), C has 7-11
    labels = np.repeat(np.arange(12), 6)
    group_of_class = np.array(["A"] * 5 + ["B"] * 2 + ["C"] * 5)
    return labels, group_of_class[labels]


def test_within_group_episodes_draw_every_class_from_one_group():
    labels, groups = _grouped_labels()
    eps = sample_episodes(labels, 3, 1, 2, 400, seed=3, groups=groups)
    ep_groups = groups[eps.numpy()]                         # [E, way, shot+query]
    assert (ep_groups == ep_groups[:, :1, :1]).all()        # one group per episode
    used = set(ep_groups[:, 0, 0].tolist())
    assert used == {"A", "C"}                               # B has only 2 classes < way
    frac_a = float((ep_groups[:, 0, 0] == "A").mean())
    assert 0.4 < frac_a < 0.6                               # groups chosen uniformly
    cls = labels[eps.numpy()]
    assert all(len(set(row[:, 0].tolist())) == 3 for row in cls)   # distinct classes
    assert (cls == cls[:, :, :1]).all()                     # class-major layout kept


def test_within_group_episodes_are_seeded_and_ungrouped_draw_is_unchanged():
    labels, groups = _grouped_labels()
    a = sample_episodes(labels, 3, 1, 2, 50, seed=7, groups=groups)
    b = sample_episodes(labels, 3, 1, 2, 50, seed=7, groups=groups.tolist())
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_episodes(labels, 3, 1, 2, 50, seed=8, groups=groups))
    # one group holding every class behaves like a plain draw of the same classes
    plain = sample_episodes(labels, 3, 1, 2, 50, seed=7)
    one = sample_episodes(labels, 3, 1, 2, 50, seed=7, groups=np.zeros(len(labels), dtype=int))
    assert plain.shape == one.shape
    assert set(labels[one.numpy()].flatten().tolist()) <= set(range(12))


def test_within_group_errors_name_the_groups():
    labels, groups = _grouped_labels()
    with pytest.raises(DataError, match=r"'A' \(5\).*'B' \(2\).*'C' \(5\)"):
        sample_episodes(labels, 6, 1, 2, 10, seed=0, groups=groups)
    bad = groups.copy()
    bad[0] = "C"                                            # class 0 split over A and C
    with pytest.raises(DataError, match="class 0 has samples in more than one group"):
        sample_episodes(labels, 3, 1, 2, 10, seed=0, groups=bad)
    with pytest.raises(DataError, match="one id per sample"):
        sample_episodes(labels, 3, 1, 2, 10, seed=0, groups=groups[:-1])


def test_sample_groups_reads_class_metadata_per_sample_and_names_missing_keys():
    from lowshot.data.base import TensorImageDataset
    images = torch.zeros(5, 1, 4, 4, dtype=torch.uint8)
    ds = TensorImageDataset(images, torch.tensor([0, 2, 1, 2, 0]), ["a", "b", "c"],
                            class_meta={"alphabet": ["Greek", "Latin", "Greek"]})
    assert ds.sample_groups("alphabet") == ["Greek", "Greek", "Latin", "Greek", "Greek"]
    sub = ds.select_classes([2, 1])  # views keep per-class metadata aligned with the remapped labels
    assert sub.sample_groups("alphabet") == ["Greek", "Latin", "Greek"]
    with pytest.raises(DataError, match="no class metadata 'drawer'.*available: alphabet"):
        ds.sample_groups("drawer")
