"""Stage-2 classifiers: tau-norm (+ automatic tau), LWS, cRT (features and images), NCM."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowshot.data import TensorImageDataset
from lowshot.errors import ConfigError, DataError
from lowshot.heads.ncm import ncm_fit, ncm_logits
from lowshot.longtail import (apply_lws, learn_lws, retrain_crt, retrain_crt_on_images, select_tau, shot_accuracy,
                              tau_normalize)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny linear models: thread hand-offs cost more than they save, badly so on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def blobs(counts, dim=8, spread=1.0, sep=2.0, seed=0):
    """Gaussian class blobs with fixed centres (seed 123) and seeded samples."""
    centres = torch.randn(len(counts), dim, generator=torch.Generator().manual_seed(123)) * sep
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([centres[c] + spread * torch.randn(n, dim, generator=g) for c, n in enumerate(counts)])
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return x, y


def test_tau_normalize_hand_computed():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert torch.equal(tau_normalize(w, 0.0), w)
    assert torch.allclose(tau_normalize(w, 1.0), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert torch.allclose(tau_normalize(w, 0.5), torch.tensor([[3 / 5**0.5, 4 / 5**0.5], [0.0, 2**0.5]]))
    assert torch.allclose(tau_normalize(w, 2.0).norm(dim=1), torch.tensor([1 / 5, 1 / 2]))


def test_select_tau_unique_and_tie():
    w = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # head class 0 has the larger norm
    # class-1 sample (1, 1.2) is right iff 2^(1-tau) < 1.2 (tau >= 0.8); class-0 (1, 0.9) iff tau <= 1.1
    x = torch.tensor([[1.0, 1.2], [1.0, 0.9]])
    y = torch.tensor([1, 0])
    tau, curve = select_tau(w, x, y)
    assert tau == pytest.approx(0.8)  # 0.8 .. 1.1 all reach 100 %: the smallest wins
    assert len(curve) == 21 and curve[0] == (0.0, 50.0) and curve[8][1] == 100.0 and curve[12][1] == 50.0
    # (1, 1.05) needs tau >= 1.0 and (1, 0.95) needs tau <= 1.0: only tau = 1 is perfect
    x2 = torch.cat([x, torch.tensor([[1.0, 1.05], [1.0, 0.95]])])
    tau, curve = select_tau(w, x2, torch.tensor([1, 0, 1, 0]))
    assert tau == pytest.approx(1.0)
    assert max(a for _, a in curve) == 100.0 and sum(a == 100.0 for _, a in curve) == 1
    tau, _ = select_tau(w, x2, torch.tensor([1, 0, 1, 0]), grid=[1.5, 0.5, 1.0], criterion="class_mean")
    assert tau == 1.0
    with pytest.raises(ConfigError, match="criterion"):
        select_tau(w, x, y, criterion="f1")


def test_ncm_hand_example():
    x = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 0, 1, 1])
    means, center = ncm_fit(x, y, center=False)
    assert torch.equal(center, torch.zeros(2)) and torch.allclose(means, torch.eye(2))
    means, center = ncm_fit(x, y, center="class_mean")
    assert torch.allclose(center, torch.tensor([1.5, 1.0]))  # mean of the class means (3,0), (0,2)
    a, b = torch.tensor([0.5, -1.0]), torch.tensor([2.5, -1.0])  # centred class-0 features
    assert torch.allclose(means[0], (a / a.norm() + b / b.norm()) / 2)
    q = torch.tensor([[3.0, 0.5], [0.5, 2.5]])
    qc = torch.nn.functional.normalize(q - center, dim=1)
    assert torch.allclose(ncm_logits(q, means, center), -((qc[:, None] - means[None]) ** 2).sum(-1), atol=1e-6)
    assert ncm_logits(q, means, center).argmax(1).tolist() == [0, 1]
    # the official cosine NCM scores q . mu_j with the class means as they are (KNNClassifier.py:77-81)
    cos_means, _ = ncm_fit(x, y, center="class_mean")
    torch.testing.assert_close(cos_means, means)
    torch.testing.assert_close(ncm_logits(q, cos_means, center, metric="cosine"), qc @ means.t())
    assert ncm_logits(q, cos_means, center, metric="cosine").argmax(1).tolist() == [0, 1]
    with pytest.raises(DataError, match="class 1 has no training features"):
        ncm_fit(x[:2], y[:2], num_classes=2)


def test_ncm_default_centre_is_the_mean_of_all_training_features():
    """Official cl2n centre: featmean = feats.mean(axis=0) (classifier-balancing run_networks.py
    get_knncentroids), not the mean of the class means."""
    x = torch.tensor([[2.0, 0.0], [4.0, 0.0], [6.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 0, 0, 1])
    means, center = ncm_fit(x, y)
    torch.testing.assert_close(center, torch.tensor([3.0, 0.75]))
    d = torch.tensor([[-1.0, -0.75], [1.0, -0.75], [3.0, -0.75]])  # centred class-0 features
    q0 = (d / d.norm(dim=1, keepdim=True)).mean(0)  # [-.8,-.6], [.8,-.6], [.9701,-.2425]
    q1 = torch.tensor([-3.0, 2.25]) / 3.75
    torch.testing.assert_close(means, torch.stack([q0, q1]))
    assert ncm_fit(x, y, center=True)[1].tolist() == [3.0, 0.75]
    assert ncm_fit(x, y, center=False)[1].tolist() == [0.0, 0.0]
    with pytest.raises(ConfigError, match="center"):
        ncm_fit(x, y, center="median")


def test_crt_separable_reaches_full_accuracy_and_is_deterministic():
    x, y = blobs([200, 100, 50, 20], sep=6.0, spread=0.5)
    w, b = retrain_crt(x, y, 4, epochs=5, lr=0.1, batch_size=64, seed=1)
    xt, yt = blobs([100] * 4, sep=6.0, spread=0.5, seed=9)
    assert ((xt @ w.t() + b).argmax(1) == yt).float().mean() == 1.0
    w2, b2 = retrain_crt(x, y, 4, epochs=5, lr=0.1, batch_size=64, seed=1)
    assert torch.equal(w, w2) and torch.equal(b, b2)
    w3, _ = retrain_crt(x, y, 4, epochs=5, lr=0.1, batch_size=64, seed=2)
    assert not torch.equal(w, w3)


def test_class_balanced_crt_improves_tail_over_instance_sampling():
    counts = [2000, 600, 120, 24]
    x, y = blobs(counts, sep=1.2, spread=1.0)
    xt, yt = blobs([500] * 4, sep=1.2, spread=1.0, seed=5)
    kw = dict(epochs=10, lr=0.1, batch_size=128, seed=0)
    res = {}
    for sampler in ("instance", "class_balanced"):
        w, b = retrain_crt(x, y, 4, sampler=sampler, **kw)
        res[sampler] = shot_accuracy(xt @ w.t() + b, yt, counts, many=500, few=100)
    assert res["class_balanced"]["few"] > res["instance"]["few"] + 20
    assert res["class_balanced"]["class_mean"] > res["instance"]["class_mean"]


def test_lws_rebalances_and_folds_into_linear():
    counts = [2000, 600, 120, 24]
    x, y = blobs(counts, sep=1.2, spread=1.0)
    xt, yt = blobs([500] * 4, sep=1.2, spread=1.0, seed=5)
    w, b = retrain_crt(x, y, 4, sampler="instance", epochs=10, lr=0.1, batch_size=128)  # joint-style
    s = learn_lws(w, b, x, y, epochs=5, lr=0.1, batch_size=128)
    assert s.shape == (4,) and s[3] > s[0]  # tail logits are scaled up relative to the head
    ws, bs = apply_lws(w, b, s)
    assert torch.allclose(x @ ws.t() + bs, (x @ w.t() + b) * s, atol=1e-5)
    before = shot_accuracy(xt @ w.t() + b, yt, counts)["class_mean"]
    after = shot_accuracy(xt @ ws.t() + bs, yt, counts)["class_mean"]
    assert after > before
    assert torch.equal(s, learn_lws(w, b, x, y, epochs=5, lr=0.1, batch_size=128))


class TinyBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out_dim = 6
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_crt_on_images_bn_modes(freeze_bn):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (60, 1, 4, 4), dtype=torch.uint8)
    labels = torch.tensor([0] * 40 + [1] * 15 + [2] * 5)
    images[labels == 1] //= 2  # make classes distinguishable
    ds = TensorImageDataset(images, labels, ["a", "b", "c"])
    backbone = TinyBN()
    backbone.eval()
    params = {k: v.clone() for k, v in backbone.state_dict().items()}
    rng = torch.get_rng_state()
    w, b = retrain_crt_on_images(backbone, ds, lambda im: im.float() / 255, epochs=2, lr=0.1, batch_size=16,
                                 seed=0, freeze_bn=freeze_bn)
    assert w.shape == (3, 6) and b.shape == (3,)
    assert torch.equal(torch.get_rng_state(), rng)  # global RNG untouched
    assert not backbone.training  # mode restored
    state = backbone.state_dict()
    for k in ("net.1.weight", "net.1.bias", "net.2.weight", "net.2.bias"):
        assert torch.equal(state[k], params[k])  # parameters never trained
    stats_moved = not torch.equal(state["net.2.running_mean"], params["net.2.running_mean"])
    assert stats_moved == (not freeze_bn)
    if freeze_bn:  # deterministic
        w2, _ = retrain_crt_on_images(backbone, ds, lambda im: im.float() / 255, epochs=2, lr=0.1,
                                      batch_size=16, seed=0)
        assert torch.equal(w, w2)


def test_input_errors():
    with pytest.raises(DataError, match="feature rows"):
        retrain_crt(torch.zeros(3, 2), torch.zeros(4), 2)
    with pytest.raises(DataError, match="out of range"):
        retrain_crt(torch.zeros(3, 2), torch.tensor([0, 1, 5]), 2)
    with pytest.raises(ConfigError, match="epochs"):
        retrain_crt(torch.zeros(3, 2), torch.tensor([0, 1, 1]), 2, epochs=0)
    with pytest.raises(DataError, match="does not match"):
        learn_lws(torch.zeros(2, 3), None, torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    assert math.isfinite(float(tau_normalize(torch.zeros(1, 3), 1.0).sum()))  # zero row: no NaN


@pytest.mark.parametrize("sampler", ["instance", "class_balanced", "sqrt", "qpower", "progressive", "class_aware"])
def test_every_sampler_trains_crt(sampler):
    x, y = blobs([60, 20, 6], sep=6.0, spread=0.5)
    w, b = retrain_crt(x, y, 3, sampler=sampler, epochs=3, lr=0.1, batch_size=16)
    assert ((x @ w.t() + b).argmax(1) == y).float().mean() > 0.95


def test_stage2_default_schedule_is_the_official_per_epoch_cosine():
    """run_networks.py:157-160 + :255: CosineAnnealingLR(T_max=epochs, eta_min=0) stepped at the start
    of each epoch, so epoch e (1-based) runs at lr (1 + cos(pi e / T)) / 2 and the last one at 0."""
    x, y = blobs([60, 30, 10], sep=3.0)
    rec: dict = {}
    retrain_crt(x, y, 3, epochs=4, lr=0.2, batch_size=32, record=rec)
    h = 0.5 ** 0.5
    assert rec["lrs"] == pytest.approx([0.1 * (1 + h), 0.1, 0.1 * (1 - h), 0.0], abs=1e-12)
    rec_lws: dict = {}
    w, b = retrain_crt(x, y, 3, epochs=2, lr=0.1, batch_size=32)
    learn_lws(w, b, x, y, epochs=2, lr=0.2, batch_size=32, record=rec_lws)
    assert rec_lws["lrs"] == pytest.approx([0.1, 0.0], abs=1e-12)
    step_rec: dict = {}
    retrain_crt(x, y, 3, epochs=4, lr=0.2, batch_size=32, schedule="step", record=step_rec)
    assert step_rec["lrs"][-1] > 0  # per-step cosine: the last step is still above 0


def test_stage2_keeps_the_best_val_epoch():
    """run_networks.py:356-362: the official loop keeps the strictly best val epoch (first best wins)."""
    x, y = blobs([200, 100, 50, 20], sep=1.0, spread=1.5)
    xv, yv = blobs([40] * 4, sep=1.0, spread=1.5, seed=3)
    kw = dict(epochs=6, lr=0.5, batch_size=32, seed=0)
    rec: dict = {}
    w, b = retrain_crt(x, y, 4, val_features=xv, val_labels=yv, record=rec, **kw)
    curve = rec["val_curve"]
    assert len(curve) == 6 and rec["best_epoch"] == curve.index(max(curve)) + 1
    acc = 100.0 * float(((xv @ w.t() + b).argmax(1) == yv).double().mean())
    assert acc == pytest.approx(max(curve))
    last_w, last_b = retrain_crt(x, y, 4, **kw)  # no val: the final epoch
    last_acc = 100.0 * float(((xv @ last_w.t() + last_b).argmax(1) == yv).double().mean())
    assert last_acc == pytest.approx(curve[-1])
    assert rec["best_epoch"] < 6 and not torch.equal(w, last_w)  # this data peaks early (epoch 2)
    s_rec: dict = {}
    learn_lws(last_w, last_b, x, y, epochs=3, lr=0.5, batch_size=32, val_features=xv, val_labels=yv, record=s_rec)
    assert len(s_rec["val_curve"]) == 3 and s_rec["best_epoch"] == s_rec["val_curve"].index(max(s_rec["val_curve"])) + 1
