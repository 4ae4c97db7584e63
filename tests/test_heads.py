"""Heads: hand-computed logits, margin gating, gradcheck, ArcFace edge cases, registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lowshot.errors import ConfigError
from lowshot.heads import arc_margin, create_head, list_heads

# Tiny explicit problem used for the hand-computed values below.
W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])  # |w| = 1, 2, sqrt(2)
X = torch.tensor([[3.0, 4.0], [1.0, -1.0]])  # |x| = 5, sqrt(2)
Y = torch.tensor([1, 0])
R2 = math.sqrt(2.0)
COS_HALF, SIN_HALF = 0.8775825618903728, 0.479425538604203  # cos(0.5), sin(0.5)


def make(name: str, **kw) -> torch.nn.Module:
    head = create_head(name, 3, 2, **kw)
    with torch.no_grad():
        head.weight.copy_(W)
    return head


def test_linear_values() -> None:
    head = make("linear")
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.5, -1.0, 0.0]))
    expected = torch.tensor([[3.5, 7.0, 1.0], [1.5, -3.0, -2.0]])  # Wx = [3,8,1], [1,-2,-2]
    torch.testing.assert_close(head.train()(X, Y), expected)
    torch.testing.assert_close(head.eval()(X), expected)
    assert create_head("linear", 3, 2, bias=False).bias is None


def test_neg_softmax_values() -> None:
    head = make("neg_softmax", margin=-0.5, scale=2.0)
    plain = torch.tensor([[6.0, 16.0, 2.0], [2.0, -4.0, -4.0]])
    # target logits: 2 * (8 + 0.5) = 17 and 2 * (1 + 0.5) = 3
    margined = torch.tensor([[6.0, 17.0, 2.0], [3.0, -4.0, -4.0]])
    torch.testing.assert_close(head.train()(X, Y), margined)
    torch.testing.assert_close(head.train()(X), plain)
    torch.testing.assert_close(head.eval()(X, Y), plain)
    pos = make("neg_softmax", margin=0.25, scale=2.0)
    torch.testing.assert_close(pos.train()(X, Y)[0, 1], torch.tensor(2.0 * (8.0 - 0.25)))


def test_neg_softmax_loss_equals_ce_with_target_bonus() -> None:
    torch.manual_seed(0)
    head = create_head("neg_softmax", 5, 8, margin=-0.3, scale=5.0).train()
    x, y = torch.randn(6, 8), torch.randint(0, 5, (6,))
    loss = F.cross_entropy(head(x, y), y)
    bonus = 5.0 * 0.3 * F.one_hot(y, 5).float()
    reference = F.cross_entropy(5.0 * (x @ head.weight.T) + bonus, y)
    torch.testing.assert_close(loss, reference)


def test_cosine_values() -> None:
    head = make("cosine", margin=0.2, scale=10.0)
    cos = torch.tensor([[0.6, 0.8, 1 / (5 * R2)], [1 / R2, -1 / R2, -1.0]])
    torch.testing.assert_close(head.eval()(X, Y), 10 * cos)
    margined = 10 * cos.clone()
    margined[0, 1] = 10 * (0.8 - 0.2)
    margined[1, 0] = 10 * (1 / R2 - 0.2)
    torch.testing.assert_close(head.train()(X, Y), margined)
    neg = make("neg_cosine", margin=-0.1, scale=10.0).train()
    torch.testing.assert_close(neg(X, Y)[0, 1], torch.tensor(10 * 0.9))


def test_arcface_values() -> None:
    head = make("arcface", margin=0.5, scale=10.0)
    cos = torch.tensor([[0.6, 0.8, 1 / (5 * R2)], [1 / R2, -1 / R2, -1.0]])
    torch.testing.assert_close(head.eval()(X, Y), 10 * cos)
    margined = 10 * cos.clone()
    # cos(acos(0.8) + 0.5) = 0.8 cos .5 - 0.6 sin .5; cos(pi/4 + .5) = (cos .5 - sin .5)/sqrt2
    margined[0, 1] = 10 * (0.8 * COS_HALF - 0.6 * SIN_HALF)
    margined[1, 0] = 10 * (COS_HALF - SIN_HALF) / R2
    torch.testing.assert_close(head.train()(X, Y), margined)
    torch.testing.assert_close(margined[0, 1], torch.tensor(4.1441073), atol=1e-5, rtol=0)


def test_arc_margin_formula_and_extension() -> None:
    c = torch.tensor([0.8, -1.0, 1.0, 0.3], dtype=torch.float64)
    pos = arc_margin(c, 0.5)
    expected_pos = [
        math.cos(math.acos(0.8) + 0.5),
        -1.0 - (1.0 - COS_HALF),  # theta = pi lies beyond pi - m: additive fallback
        COS_HALF,  # theta = 0: cos(m)
        math.cos(math.acos(0.3) + 0.5),
    ]
    torch.testing.assert_close(pos, torch.tensor(expected_pos, dtype=torch.float64))
    neg = arc_margin(c, -0.5)
    expected_neg = [
        0.8 * COS_HALF + 0.6 * SIN_HALF,  # cos(acos(.8) - .5) = 0.98972...
        -COS_HALF,  # theta = pi: cos(pi - 0.5)
        1.0 + (1.0 - COS_HALF),  # theta = 0 < |m|: additive fallback
        math.cos(math.acos(0.3) - 0.5),
    ]
    torch.testing.assert_close(neg, torch.tensor(expected_neg, dtype=torch.float64))


@pytest.mark.parametrize("m", [0.5, -0.5, 1.2, -1.2])
def test_arc_margin_is_continuous_and_monotone(m: float) -> None:
    c = torch.linspace(-1.0, 1.0, 20001, dtype=torch.float64)
    psi = arc_margin(c, m)
    steps = psi.diff()
    assert (steps >= -1e-12).all(), "psi must not decrease as cos(theta) increases"
    # Lipschitz in theta (|dpsi/dtheta| <= 1): the largest jump is bounded by the theta step.
    assert steps.max() <= c.acos().diff().abs().max() + 1e-9
    if m > 0:
        assert (psi <= c + 1e-12).all()
    else:
        assert (psi >= c - 1e-12).all()


@pytest.mark.parametrize("m", [0.5, -0.5])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arcface_exact_theta_zero_and_pi(m: float, sign: float, dtype: torch.dtype) -> None:
    head = create_head("arcface", 3, 2, margin=m, scale=8.0).to(dtype).train()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    x = torch.tensor([[sign * 3.0, 0.0], [0.0, sign * 0.5]], dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 1])  # cos(theta_y) is exactly +1 (sign=1) or -1 (sign=-1)
    logits = head(x, y)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, y).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    c = torch.tensor(sign, dtype=torch.float64)
    torch.testing.assert_close(logits[0, 0].double(), 8.0 * arc_margin(c, m), atol=1e-5, rtol=0)


def test_arcface_float32_nearly_parallel_features_have_finite_grads() -> None:
    torch.manual_seed(1)
    head = create_head("arcface", 4, 16, margin=0.5).train()
    y = torch.arange(4)
    # Scaled copies of the class weights: cos rounds to 1 +- ulp in float32.
    x = (head.weight.detach() * torch.tensor([[0.3], [7.0], [-2.0], [1e-3]])).requires_grad_()
    F.cross_entropy(head(x, y), y).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_arcface_zero_margin_is_cosine() -> None:
    torch.manual_seed(2)
    arc = create_head("arcface", 4, 6, margin=0.0, scale=12.0).train()
    cos = create_head("cosine", 4, 6, margin=0.0, scale=12.0).train()
    cos.load_state_dict(arc.state_dict())
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    torch.testing.assert_close(arc(x, y), cos(x, y))


def test_virtual_softmax_column() -> None:
    head = make("virtual_softmax")
    out = head.train()(X, Y)
    # virtual logits ||W_y|| ||x_i||: |W_1| |x_0| = 2 * 5 = 10, |W_0| |x_1| = 1 * sqrt(2)
    expected = torch.tensor([[3.0, 8.0, 1.0, 10.0], [1.0, -2.0, -2.0, R2]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(head.eval()(X, Y), expected[:, :3])
    torch.testing.assert_close(head.train()(X), expected[:, :3])
    # Labels index the first C columns, so the usual loss call works with C+1 columns.
    loss = F.cross_entropy(head.train()(X, Y), Y)
    torch.testing.assert_close(loss, F.cross_entropy(expected, Y))


def test_virtual_softmax_random_per_sample_norms_and_gradient() -> None:
    torch.manual_seed(3)
    head = create_head("virtual_softmax", 5, 7).train()
    x, y = torch.randn(9, 7, requires_grad=True), torch.randint(0, 5, (9,))
    out = head(x, y)
    assert out.shape == (9, 6)
    torch.testing.assert_close(out[:, 5], head.weight[y].norm(dim=1) * x.norm(dim=1))
    out[:, 5].sum().backward()  # gradient flows through the virtual logit
    torch.testing.assert_close(
        x.grad, head.weight[y].norm(dim=1, keepdim=True) * F.normalize(x.detach())
    )
    detached = create_head("virtual_softmax", 5, 7, detach_virtual=True).train()
    x.grad = None
    detached(x, y)[:, 5].sum().backward()
    assert (x.grad == 0).all() and (detached.weight.grad == 0).all()


MARGIN_HEADS = [
    ("neg_softmax", {}),
    ("cosine", {"margin": 0.3}),
    ("cosine", {"margin": -0.2}),
    ("arcface", {}),
]


@pytest.mark.parametrize("name,kw", MARGIN_HEADS)
def test_margin_only_in_training_with_labels(name: str, kw: dict) -> None:
    torch.manual_seed(4)
    head = create_head(name, 4, 6, **kw)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    plain = head.eval()(x)
    torch.testing.assert_close(head.eval()(x, y), plain)
    torch.testing.assert_close(head.train()(x), plain)
    trained = head.train()(x, y)
    differs = (trained - plain).abs() > 1e-6
    target = F.one_hot(y, 4).bool()
    assert differs[target].all() and not differs[~target].any()


def _gradcheck_head(
    name: str, kw: dict, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
) -> None:
    head = create_head(name, 3, x.shape[1], **kw).double().train()
    params = {n: p.detach().clone().requires_grad_() for n, p in head.named_parameters()}
    if weight is not None:
        params["weight"] = weight.clone().requires_grad_()
    names = list(params)

    def fn(features: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        return functional_call(head, dict(zip(names, tensors, strict=True)), (features, y))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *params.values()), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("linear", {}),
        ("neg_softmax", {"margin": -0.3, "bias": True}),
        ("cosine", {"margin": -0.1}),
        ("cosine", {"margin": 0.35}),
        ("arcface", {"margin": 0.5}),
        ("arcface", {"margin": -0.5}),
        ("virtual_softmax", {}),
    ],
)
def test_gradcheck(name: str, kw: dict) -> None:
    torch.manual_seed(5)
    x = torch.randn(4, 5, dtype=torch.float64)
    _gradcheck_head(name, kw, x, torch.tensor([0, 1, 2, 1]))


@pytest.mark.parametrize("m", [0.5, -0.5])
def test_gradcheck_arcface_extension_region(m: float) -> None:
    """Targets beyond the switch point (theta_y > pi - m, resp. theta_y < |m|)."""
    torch.manual_seed(6)
    w = torch.randn(3, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    direction = -1.0 if m > 0 else 1.0
    x = direction * w[y] + 0.05 * torch.randn(3, 5, dtype=torch.float64)
    cos = F.cosine_similarity(x, w[y])
    in_fallback = cos < -math.cos(m) if m > 0 else cos > math.cos(m)
    assert in_fallback.all()
    _gradcheck_head("arcface", {"margin": m}, x, y, weight=w)


@pytest.mark.parametrize("name", list_heads())
def test_every_head_contract(name: str) -> None:
    torch.manual_seed(7)
    head = create_head(name, 6, 10)
    assert isinstance(head.weight, torch.nn.Parameter) and head.weight.shape == (6, 10)
    x, y = torch.randn(8, 10, requires_grad=True), torch.randint(0, 6, (8,))
    logits = head.train()(x, y)
    assert logits.shape[0] == 8 and logits.shape[1] in (6, 7)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, y).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    assert head.eval()(x).shape == (8, 6)
    clone = create_head(name, 6, 10)
    clone.load_state_dict(head.state_dict())
    torch.testing.assert_close(clone.eval()(x), head.eval()(x))
    with pytest.raises(ConfigError, match="embedding_size"):
        head(torch.randn(8, 9))


def test_unknown_head_and_option() -> None:
    with pytest.raises(ConfigError, match="did you mean 'arcface'"):
        create_head("arcfce", 3, 2)
    with pytest.raises(ConfigError, match="'margn'"):
        create_head("cosine", 3, 2, margn=0.1)
    with pytest.raises(ConfigError, match="scale"):
        create_head("cosine", 3, 2, scale=0.0)
    with pytest.raises(ConfigError, match="radians"):
        create_head("arcface", 3, 2, margin=30.0)
    with pytest.raises(ConfigError, match="num_classes"):
        create_head("linear", 0, 2)


def test_aliases_resolve() -> None:
    for alias in ("neg_cosine", "cosface", "normface"):
        assert type(create_head(alias, 2, 2)).__name__ == "CosineHead"
    assert type(create_head("virtual", 2, 2)).__name__ == "VirtualSoftmaxHead"
