"""Registered long-tailed datasets, and the whole decoupling recipe on real Fashion-MNIST-LT."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowshot.longtail  # noqa: F401  (registers the *_lt datasets)
from lowshot.data import TensorImageDataset, build_dataset
from lowshot.data.registry import DATASETS, register_dataset
from lowshot.errors import ConfigError, DataError
from lowshot.heads.ncm import ncm_fit, ncm_logits
from lowshot.longtail import (apply_lws, class_counts, learn_lws, longtail_counts,
                              retrain_crt, select_tau, shot_accuracy, tau_normalize, thresholds_by_rank)

FAKE = "_test_balanced_base"


def _fake(split, root=None, image_size=None, download=False, per_class=60):
    n = per_class if split == "train" else 7
    labels = torch.arange(5).repeat(n)
    images = (torch.arange(labels.numel()) % 256).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    return TensorImageDataset(images.contiguous(), labels, [f"c{i}" for i in range(5)])


@pytest.fixture(autouse=True, scope="module")
def _fake_base_dataset():
    """Registered for this module's tests only, so other modules' registry-wide tests never see it."""
    register_dataset(FAKE)(_fake)
    yield
    DATASETS.unregister(FAKE)


def test_splits_on_a_balanced_base():
    kw = dict(base_dataset=FAKE, imbalance_factor=10, val_per_class=10, seed=3)
    train = build_dataset("fashion_mnist_lt", "train", **kw)
    val = build_dataset("fashion_mnist_lt", "val", **kw)
    test = build_dataset("fashion_mnist_lt", "test", **kw)
    assert class_counts(train.labels, 5).tolist() == longtail_counts(5, 10, 50) == [50, 28, 15, 8, 5]
    assert class_counts(val.labels, 5).tolist() == [10] * 5
    assert len(test) == 35 and train.class_names == ["c0", "c1", "c2", "c3", "c4"]
    src_train, src_val = set(train.source_indices().tolist()), set(val.source_indices().tolist())
    assert not src_train & src_val  # validation carved before subsampling, disjoint from training
    again = build_dataset("fashion_mnist_lt", "train", **kw)
    assert torch.equal(again.source_indices(), train.source_indices())
    other = build_dataset("fashion_mnist_lt", "train", **{**kw, "seed": 4})
    assert not torch.equal(other.source_indices(), train.source_indices())
    step = build_dataset("fashion_mnist_lt", "train", **{**kw, "profile": "step", "mu": 0.4})
    assert class_counts(step.labels, 5).tolist() == [50, 50, 50, 5, 5]
    base_kw = build_dataset("fashion_mnist_lt", "train", base_dataset=FAKE, val_per_class=0, per_class=20,
                            imbalance_factor=4)
    assert class_counts(base_kw.labels, 5).tolist() == longtail_counts(5, 4, 20)


def test_errors():
    with pytest.raises(ConfigError, match="unknown split 'novel'"):
        build_dataset("fashion_mnist_lt", "novel", base_dataset=FAKE)
    with pytest.raises(ConfigError, match="base dataset 'nope' is not registered"):
        build_dataset("cifar10_lt", "train", base_dataset="nope")
    with pytest.raises(DataError, match="val_per_class=0"):
        build_dataset("fashion_mnist_lt", "val", base_dataset=FAKE, val_per_class=0)
    with pytest.raises(ConfigError, match="has no option 'imbalance'"):
        build_dataset("fashion_mnist_lt", "train", base_dataset=FAKE, imbalance=5)
    with pytest.raises(DataError, match="fewer than the 61 per class"):
        build_dataset("fashion_mnist_lt", "train", base_dataset=FAKE, val_per_class=61)


def _fmnist_lt(split: str):
    try:
        import lowshot.data.fashion_mnist  # noqa: F401
        return build_dataset("fashion_mnist_lt", split)
    except (ImportError, DataError) as exc:  # reader or Debian data package not installed
        pytest.skip(f"Fashion-MNIST unavailable: {exc}")


def _pixels(ds) -> torch.Tensor:
    images = torch.stack([ds[i][0] for i in range(len(ds))]) if len(ds) < 1000 else \
        ds.parent.images[ds.indices] if hasattr(ds, "parent") else ds.images
    return F.avg_pool2d(images.float() / 255, 2).flatten(1)  # 14x14 pixels as "features"


@pytest.fixture
def one_thread():
    """Tiny linear models: thread hand-offs cost more than they save, badly so on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_real_fashion_mnist_lt_and_decoupling(one_thread):
    train, val, test = (_fmnist_lt(s) for s in ("train", "val", "test"))
    counts = class_counts(train.labels, 10)
    assert counts.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # = CIFAR-10-LT's
    assert class_counts(val.labels, 10).tolist() == [1000] * 10 and len(test) == 10000
    assert not set(train.source_indices().tolist()) & set(val.source_indices().tolist())

    xtr, xva, xte = (_pixels(d) for d in (train, val, test))
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-3
    xtr, xva, xte = ((x - mu) / sd for x in (xtr, xva, xte))
    ytr, yva, yte = train.labels, val.labels, test.labels
    many, few = thresholds_by_rank(counts)  # 3 / 4 / 3 classes
    kw = dict(epochs=10, lr=0.05, batch_size=128)

    def acc(logits):
        return shot_accuracy(logits, yte, counts, many, few)

    w, b = retrain_crt(xtr, ytr, 10, sampler="instance", **kw)  # "joint" stage-1 linear classifier
    joint = acc(xte @ w.t() + b)
    tau, curve = select_tau(w, xva, yva)
    assert 0 < tau < 2 and len(curve) == 21
    tau_norm = acc(xte @ tau_normalize(w, tau).t())
    wc, bc = retrain_crt(xtr, ytr, 10, sampler="class_balanced", **kw)
    crt = acc(xte @ wc.t() + bc)
    ws, bs = apply_lws(w, b, learn_lws(w, b, xtr, ytr, epochs=5, lr=0.05, batch_size=128))
    lws = acc(xte @ ws.t() + bs)
    means, center = ncm_fit(xtr, ytr)
    ncm = acc(ncm_logits(xte, means, center))
    # Kang et al.'s finding, on real data: rebalancing only the classifier beats the joint one
    for name, r in (("tau", tau_norm), ("crt", crt), ("lws", lws)):
        assert r["all"] > joint["all"] + 1.0, (name, r["all"], joint["all"])
        assert r["medium"] > joint["medium"] + 5.0, name
    assert ncm["few"] > joint["few"]


def test_cifar_lt_delegates_to_the_cifar_reader(tmp_path):
    pytest.importorskip("lowshot.data.cifar")  # registers cifar10 / cifar100
    with pytest.raises(DataError, match="cifar"):
        build_dataset("cifar10_lt", "train", root=str(tmp_path))  # no CIFAR files there
