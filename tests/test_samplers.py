"""Long-tail samplers: class frequencies vs theory, determinism, set_epoch, exact resume, DDP shards."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lowshot.errors import CheckpointError, ConfigError
from lowshot.data.samplers import SAMPLERS, build_sampler, list_samplers

COUNTS = [400, 100, 25, 5]
_SHUFFLE = torch.randperm(530, generator=torch.Generator().manual_seed(0))
LABELS = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])[_SHUFFLE]
ALL = ["instance", "class_balanced", "sqrt", "qpower", "progressive", "class_aware"]
KW = {"progressive": {"total_epochs": 10}}

# chi-square critical value for df = 3 at p = 1e-4 (draws are seeded, so this never flakes; it only
# fails when the frequencies do not follow the stated distribution)
CHI2_DF3 = 21.1


def make(name, labels=LABELS, **kw):
    return build_sampler(name, labels, **{**KW.get(name, {}), **kw})


def chi2(observed: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * observed.sum()
    return float(((observed.double() - expected) ** 2 / expected).sum())


def test_registry():
    assert list_samplers() == sorted(ALL)
    with pytest.raises(ConfigError, match="did you mean 'class_balanced'"):
        build_sampler("class_balancd", LABELS)
    with pytest.raises(ConfigError, match="sampler 'sqrt' has no option 'foo'"):
        build_sampler("sqrt", LABELS, foo=1)
    with pytest.raises(ConfigError, match="total_epochs"):
        build_sampler("progressive", LABELS)
    with pytest.raises(ConfigError, match="rank"):
        build_sampler("instance", LABELS, num_replicas=2, rank=2)


@pytest.mark.parametrize("name,q", [("class_balanced", 0.0), ("sqrt", 0.5), ("qpower", 0.25), ("qpower", 1.0)])
def test_class_frequencies_follow_power_law(name, q):
    kw = {"q": q} if name == "qpower" else {}
    s = make(name, num_samples=20000, **kw)
    n = torch.tensor(COUNTS, dtype=torch.float64)
    theory = n**q / (n**q).sum()
    assert torch.allclose(s.class_probabilities(), theory)
    observed = torch.bincount(LABELS[torch.tensor(list(s))], minlength=4)
    assert chi2(observed, theory) < CHI2_DF3
    # ... and clearly not instance frequencies unless q = 1
    if q < 1:
        assert chi2(observed, n / n.sum()) > 100


def test_uniform_within_class():
    s = make("class_balanced", num_samples=20000)
    idx = torch.tensor(list(s))
    tail = torch.nonzero(LABELS == 3).reshape(-1)
    hits = torch.stack([(idx == i).sum() for i in tail])
    assert chi2(hits, torch.full((5,), 0.2, dtype=torch.float64)) < 18.5  # df = 4, p = 1e-3


def test_progressive_interpolates():
    """lam_t = t / (T - 1), np.linspace(0, 1, epochs) in classifier-balancing
    data/ClassPrioritySampler.py:313-314: the last epoch (9 of 10) is fully class-balanced."""
    s = make("progressive", num_samples=20000)
    n = torch.tensor(COUNTS, dtype=torch.float64)
    ib, cb = n / n.sum(), torch.full((4,), 0.25, dtype=torch.float64)
    for epoch, t in [(0, 0.0), (3, 1 / 3), (9, 1.0), (15, 1.0)]:
        s.set_epoch(epoch)
        theory = (1 - t) * ib + t * cb
        assert torch.allclose(s.class_probabilities(), theory)
        observed = torch.bincount(LABELS[torch.tensor(list(s))], minlength=4)
        assert chi2(observed, theory) < CHI2_DF3


def test_progressive_single_epoch_is_instance_balanced():
    s = make("progressive", total_epochs=1)
    n = torch.tensor(COUNTS, dtype=torch.float64)
    assert torch.allclose(s.class_probabilities(), n / n.sum())  # np.linspace(0, 1, 1) == [0]


def test_instance_is_a_permutation():
    s = make("instance")
    assert sorted(s) == list(range(530))
    s = make("instance", num_samples=1325)  # 2.5 epochs' worth: each index 2 or 3 times
    reps = torch.bincount(torch.tensor(list(s)), minlength=530)
    assert set(reps.tolist()) == {2, 3} and int(reps.sum()) == 1325


def test_class_aware_structure():
    k = 4
    s = make("class_aware", samples_per_class=k, num_samples=4 * k * 30)
    idx = torch.tensor(list(s))
    groups = LABELS[idx].view(-1, k)
    assert bool((groups == groups[:, :1]).all())  # k consecutive images of one class
    cls_seq = groups[:, 0].view(-1, 4)  # round-robin: each cycle of 4 visits has every class once
    assert all(sorted(row.tolist()) == [0, 1, 2, 3] for row in cls_seq)
    assert torch.bincount(LABELS[idx], minlength=4).tolist() == [120] * 4
    tail = idx[LABELS[idx] == 3]  # the 5 tail images repeat only after all 5 were drawn
    for start in range(0, 120 - 5, 5):
        assert len(set(tail[start:start + 5].tolist())) == 5
    assert len(make("class_aware", num_samples="balanced")) == 400 * 4


def test_empty_class_is_never_drawn():
    labels = torch.tensor([0] * 10 + [2] * 3)
    for name in ALL:
        s = make(name, labels=labels, num_classes=4, num_samples=300)
        drawn = torch.bincount(labels[torch.tensor(list(s))], minlength=4)
        assert drawn[1] == 0 and drawn[3] == 0, name


@pytest.mark.parametrize("name", ALL)
def test_deterministic_and_set_epoch(name):
    a, b = make(name, seed=7), make(name, seed=7)
    first = list(a)
    assert first == list(b)
    assert first != list(make(name, seed=8))
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(a) == first  # a second pass over the same epoch replays it


@pytest.mark.parametrize("name", ALL)
def test_resume_mid_epoch(name):
    s = make(name, seed=3)
    s.set_epoch(2)
    full = list(s)
    it = iter(s)
    taken = [next(it) for _ in range(37)]
    state = s.state_dict()
    assert taken == full[:37] and state["epoch"] == 2 and state["offset"] == 37
    t = make(name, seed=3)
    t.load_state_dict(state)
    t.set_epoch(2)  # the trainer calls set_epoch at the top of the resumed epoch: no reset
    assert len(t) == len(full) - 37
    assert list(t) == full[37:]
    assert list(t) == full  # the following pass is a whole epoch again
    u = make(name, seed=3)
    u.set_epoch(2)
    u.set_start(100)
    assert list(u) == full[100:]
    # explicit consumed count (DataLoader prefetch runs ahead of training)
    assert s.state_dict(consumed=10)["offset"] == 10


def test_finished_epoch_state_and_mismatch():
    s = make("sqrt")
    list(s)
    state = s.state_dict()
    assert state["offset"] == s.num_samples
    t = make("sqrt")
    t.load_state_dict(state)
    assert len(t) == 0 and list(t) == []
    t.set_epoch(1)
    assert len(t) == 530
    with pytest.raises(CheckpointError, match="seed"):
        make("sqrt", seed=1).load_state_dict(state)
    with pytest.raises(CheckpointError, match="sampler"):
        make("instance").load_state_dict(state)
    with pytest.raises(CheckpointError, match="offset"):
        make("sqrt").load_state_dict({"epoch": 0})


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("replicas", [2, 3, 7])
def test_ddp_shards_partition_the_epoch(name, replicas):
    shards = [make(name, seed=5, num_replicas=replicas, rank=r) for r in range(replicas)]
    for s in shards:
        s.set_epoch(4)
    draw = shards[0].epoch_indices().tolist()
    lists = [list(s) for s in shards]
    assert len({len(x) for x in lists}) == 1 and len(lists[0]) == -(-530 // replicas)
    interleaved = [x[i] for i in range(len(lists[0])) for x in lists]
    assert interleaved[:530] == draw  # every position of the global draw exactly once ...
    assert interleaved[530:] == draw[: len(interleaved) - 530]  # ... plus wrap-around padding
    if name == "instance":
        assert set(interleaved) == set(range(530))


def test_ddp_resume_with_other_world_size():
    old = [make("class_balanced", seed=1, num_replicas=2, rank=r) for r in range(2)]
    draw = old[0].epoch_indices().tolist()
    state = old[0].state_dict(consumed=50)  # each of 2 ranks consumed 50 -> 100 global positions
    new = [make("class_balanced", seed=1, num_replicas=3, rank=r) for r in range(3)]
    for s in new:
        s.load_state_dict(state)
    lists = [list(s) for s in new]
    interleaved = [x[i] for i in range(len(lists[0])) for x in lists]
    assert interleaved[:430] == draw[100:]


def test_dataloader_integration():
    ds = TensorDataset(torch.arange(530), LABELS)
    s = make("class_balanced", seed=0)
    loader = DataLoader(ds, batch_size=64, sampler=s)
    assert len(loader) == 9
    seen = torch.cat([x for x, _ in loader])
    assert seen.tolist() == s.epoch_indices().tolist()
    assert SAMPLERS.canonical("square_root") == "sqrt"
