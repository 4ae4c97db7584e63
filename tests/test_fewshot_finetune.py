"""Batched fine-tune == per-episode torch.optim.SGD loop; protocol constants; chunking."""
from __future__ import annotations

import math

import pytest
import torch

from lowshot.errors import ConfigError
from lowshot.fewshot import Finetune, FinetuneConfig, sample_episodes
from lowshot.fewshot.finetune import episode_draws
from lowshot.fewshot.reference import CosineHead, LinearHead


pytestmark = pytest.mark.usefixtures("single_thread")


def _data(dim: int = 24, classes: int = 8, per: int = 12, seed: int = 0, sep: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g, dtype=torch.float64) * sep
    x = (means.repeat_interleave(per, 0) + torch.randn(classes * per, dim, generator=g,
                                                      dtype=torch.float64)).relu()
    return x, torch.arange(classes).repeat_interleave(per)


def _both(x, eps, shot, seed=5, **kw):
    fast = Finetune(**kw).scores(x, eps, shot, seed)
    slow = Finetune(batched=False, **kw).scores(x, eps, shot, seed)
    return fast, slow


@pytest.mark.parametrize("head", ["cosine", "linear"])
@pytest.mark.parametrize("shot", [1, 5])
def test_batched_equals_per_episode_sgd_float64(head, shot):
    x, y = _data()
    eps = sample_episodes(y, way=5, shot=shot, query=3, episodes=3, seed=1)
    fast, slow = _both(x, eps, shot, head=head)
    assert fast.shape == slow.shape == (3, 15, 5)
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


@pytest.mark.parametrize("head", ["cosine", "linear"])
@pytest.mark.parametrize("shot", [1, 5])
def test_batched_equals_per_episode_sgd_float32(head, shot):
    x, y = _data(seed=1)
    eps = sample_episodes(y, way=5, shot=shot, query=3, episodes=2, seed=2)
    fast, slow = _both(x.float(), eps, shot, head=head)
    assert fast.dtype == slow.dtype == torch.float32
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kw", [
    {"preset": "bl0", "head": "cosine"},
    {"head": "linear", "bias": False, "scale": 5.0, "steps": 40},
    {"head": "cosine", "scale": 10.0, "epochs": 7, "batch_size": 3},
    {"head": "linear", "momentum": 0.0, "steps": 30},
    {"head": "cosine", "weight_decay": 0.0, "dampening": 0.0, "lr": 0.1, "steps": 25},
])
def test_batched_equals_reference_for_variants(kw):
    x, y = _data(seed=2)
    eps = sample_episodes(y, way=3, shot=2, query=2, episodes=3, seed=3)
    fast, slow = _both(x, eps, 2, **kw)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


def test_rank_deficient_support_duplicates_and_zero_rows():
    # dim 6 < 25 support samples; a duplicated row; an all-zero (dead ReLU) row.
    x, y = _data(dim=6, classes=6, per=10, seed=3)
    x[1] = x[0]
    x[12] = 0.0
    eps = sample_episodes(y, way=5, shot=5, query=2, episodes=3, seed=0)
    eps[0, 0, :2] = torch.tensor([0, 1])           # force the duplicate pair into one support set
    eps[1, 1, 0] = 12
    for head in ("cosine", "linear"):
        fast, slow = _both(x, eps, 5, head=head, steps=60)
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-9)


def test_chunking_and_episode_offsets_do_not_change_results():
    x, y = _data(seed=4)
    eps = sample_episodes(y, way=4, shot=3, query=3, episodes=70, seed=4)
    whole = Finetune(steps=20, chunk_size=1000).scores(x, eps, 3, seed=9)
    parts = Finetune(steps=20, chunk_size=13).scores(x, eps, 3, seed=9)
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-12)
    a = episode_draws(11, 0, 130, 3, 5, 4, 2)
    b = episode_draws(11, 60, 130, 3, 5, 4, 2)
    assert torch.equal(a.weight[60:], b.weight) and torch.equal(a.perms[60:], b.perms)


def test_draws_are_seeded_uniform_and_permutations():
    d = episode_draws(3, 0, 2, 2, 4, 5, 2)
    # hard-coded: catches changes of the generator streams across versions/machines
    assert d.perms.tolist() == [[[3, 0, 4, 1, 2], [3, 2, 0, 4, 1]], [[4, 0, 3, 2, 1], [2, 3, 1, 4, 0]]]
    torch.testing.assert_close(d.weight[1, 0], torch.tensor(
        [-0.4590243697166443, 0.2041919231414795, -0.12345892190933228, 0.17520970106124878]))
    big = episode_draws(0, 0, 200, 5, 64, 25, 3)
    assert big.weight.abs().max() <= 1 / math.sqrt(64) and big.bias.abs().max() <= 1 / math.sqrt(64)
    assert torch.equal(big.perms.sort(-1).values, torch.arange(25, dtype=big.perms.dtype).expand(200, 3, 25))
    # the solver copies each pass's [n, E] order out of this view: episodes on the unit stride
    # make that one contiguous copy (it was a strided copy costing 5% of a 5-way 5-shot solve)
    assert big.perms.stride(0) == 1
    assert not torch.equal(big.perms[0, 0], big.perms[0, 1]), "each pass reshuffles"
    assert not torch.equal(episode_draws(1, 0, 1, 5, 64, 25, 1).weight, big.weight[:1])


def test_shuffles_are_uniform_over_permutations():
    perms = episode_draws(0, 0, 4000, 2, 3, 4, 6).perms.reshape(-1, 4).long()   # 24000 draws
    codes = perms @ torch.tensor([64, 16, 4, 1])
    counts = torch.bincount(codes, minlength=256)[torch.bincount(codes, minlength=256) > 0]
    assert counts.numel() == 24                                  # all 4! orders occur
    assert counts.min() > 0.85 * 1000 and counts.max() < 1.15 * 1000


def test_protocol_step_counts():
    mm, bl0 = FinetuneConfig(), FinetuneConfig(preset="bl0")
    assert mm.num_steps(5, 1) == 150 and mm.num_steps(25, 5) == 600      # mmfewshot num_steps
    assert bl0.num_steps(5, 1) == 200 and bl0.num_steps(25, 5) == 700    # 100 passes, batches of 4
    assert FinetuneConfig(epochs=3).num_steps(25, 5) == 21
    assert FinetuneConfig(steps=7, preset="bl0").num_steps(25, 5) == 7
    assert FinetuneConfig().scale == 5.0 and FinetuneConfig(head="linear").scale == 1.0
    assert (mm.lr, mm.momentum, mm.dampening, mm.weight_decay, mm.batch_size) == (0.01, 0.9, 0.9, 1e-3, 4)


@pytest.mark.parametrize("kw", [{"head": "arc"}, {"preset": "x"}, {"steps": 3, "epochs": 1},
                                {"batch_size": 0}, {"lr": -1.0}, {"scale": 0.0}])
def test_bad_finetune_options(kw):
    with pytest.raises(ConfigError):
        FinetuneConfig(**kw)


def test_reference_heads_follow_the_head_formulas():
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(3, 4, generator=g), torch.randn(3, generator=g), torch.randn(2, 4, generator=g)
    cos = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(CosineHead(w, 5.0)(x), 5.0 * cos)
    torch.testing.assert_close(LinearHead(w, b, 2.0)(x), 2.0 * (x @ w.t() + b))


def test_reference_heads_match_lowshot_heads_when_available():
    heads = pytest.importorskip("lowshot.heads")
    if not hasattr(heads, "create_head"):
        pytest.skip("lowshot.heads.create_head not available yet")
    g = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(5, 8, generator=g), torch.randn(5, generator=g), torch.randn(4, 8, generator=g)
    cos = heads.create_head("cosine", 5, 8, margin=0.0, scale=5.0).eval()
    lin = heads.create_head("linear", 5, 8, bias=True).eval()
    with torch.no_grad():
        cos.weight.copy_(w)
        lin.weight.copy_(w)
        lin.bias.copy_(b)
        torch.testing.assert_close(cos(x), CosineHead(w, 5.0)(x))
        torch.testing.assert_close(lin(x), LinearHead(w, b, 1.0)(x))
