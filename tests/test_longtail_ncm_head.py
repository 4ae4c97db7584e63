"""The ``ncm`` head: hand-computed logits, fit, gradcheck, agreement with heads.ncm.ncm_logits."""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from lowshot.errors import ConfigError, DataError
from lowshot.heads import create_head, list_heads
from lowshot.heads.ncm import ncm_fit, ncm_logits

R2 = math.sqrt(2.0)


def test_registered_with_alias() -> None:
    assert "ncm" in list_heads()
    assert type(create_head("nearest_class_mean", 2, 3)).__name__ == "NCMHead"


def test_l2_and_cosine_hand_values() -> None:
    head = create_head("ncm", 2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
        head.center.copy_(torch.tensor([1.0, 1.0]))
    x = torch.tensor([[4.0, 5.0], [1.0, 3.0]])  # x - c = [3, 4] -> q = [.6, .8]; [0, 2] -> q = [0, 1]
    # -||q - mu||^2: [.6,.8]-[1,0] -> .16+.64 = .8;  [.6,.8]-[0,.5] -> .36+.09 = .45
    #                [0,1]-[1,0] -> 2;              [0,1]-[0,.5] -> .25
    expected = -torch.tensor([[0.8, 0.45], [2.0, 0.25]])
    torch.testing.assert_close(head.eval()(x), expected)
    torch.testing.assert_close(head.train()(x, torch.tensor([0, 1])), expected)  # no margin in training
    cos = create_head("ncm", 2, 2, metric="cosine")
    cos.load_state_dict(head.state_dict())
    # official "cos" (KNNClassifier.py:77-81): q . mu, mu NOT re-normalised:
    # [.6,.8].[1,0] = .6, [.6,.8].[0,.5] = .4; [0,1] -> 0, .5
    torch.testing.assert_close(cos.eval()(x), torch.tensor([[0.6, 0.4], [0.0, 0.5]]))


def test_fit_hand_values_center_is_mean_of_class_means() -> None:
    x = torch.tensor([[2.0, 0.0], [4.0, 0.0], [6.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 0, 0, 1])
    head = create_head("ncm", 2, 2).fit(x, y, center="class_mean")
    # class means [4, 0] and [0, 3]; centre = their mean [2, 1.5] (not the feature mean [3, .75])
    torch.testing.assert_close(head.center, torch.tensor([2.0, 1.5]))
    d = torch.tensor([[0.0, -1.5], [2.0, -1.5], [4.0, -1.5]])
    q0 = d / d.norm(dim=1, keepdim=True)  # [0,-1], [.8,-.6], [.9363,-.3511]
    q1 = torch.tensor([[-2.0, 1.5]]) / 2.5
    torch.testing.assert_close(head.weight, torch.cat([q0.mean(0, keepdim=True), q1]))
    means, center = ncm_fit(x, y, center="class_mean")
    torch.testing.assert_close(head.weight, means)
    torch.testing.assert_close(head.center, center)
    plain = create_head("ncm", 2, 2).fit(x, y, center=False)
    assert torch.equal(plain.center, torch.zeros(2))
    official = create_head("ncm", 2, 2).fit(x, y)  # default: mean of all features [3, .75]
    torch.testing.assert_close(official.center, torch.tensor([3.0, 0.75]))
    cos = create_head("ncm", 2, 2, metric="cosine").fit(x, y, center="class_mean")
    torch.testing.assert_close(cos.weight, head.weight)  # class means not re-normalised (official)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_head_matches_ncm_fit_and_ncm_logits(metric: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g) + 1.0, torch.arange(4).repeat(10)
    head = create_head("ncm", 4, 6, metric=metric).fit(x, y)
    means, center = ncm_fit(x, y)
    q = torch.randn(7, 6, generator=g)
    torch.testing.assert_close(head.eval()(q), ncm_logits(q, means, center, metric))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gradcheck(metric: str) -> None:
    torch.manual_seed(1)
    head = create_head("ncm", 3, 5, metric=metric).double()
    with torch.no_grad():
        head.center.copy_(torch.randn(5, dtype=torch.float64))
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = head.weight.detach().clone().requires_grad_()
    y = torch.tensor([0, 1, 2, 1])

    def fn(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return functional_call(head, {"weight": weight, "center": head.center}, (features, y))

    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-5)


def test_errors() -> None:
    with pytest.raises(ConfigError, match="metric"):
        create_head("ncm", 2, 2, metric="manhattan")
    head = create_head("ncm", 3, 2)
    with pytest.raises(DataError, match="class 2 has no training features"):
        head.fit(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(DataError, match="labels must lie in 0..2"):
        head.fit(torch.randn(2, 2), torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match="embedding_size"):
        head(torch.randn(2, 3))
