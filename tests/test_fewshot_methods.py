"""NCM (hand-computed), logistic regression vs scikit-learn, evaluate()/CI/table, chunking."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowshot.errors import ConfigError, DataError
from lowshot.fewshot import (
    EVALUATORS,
    LogisticRegression,
    NearestClassMean,
    evaluate,
    evaluate_many,
    format_table,
    list_evaluators,
    sample_episodes,
    summarize,
)


pytestmark = pytest.mark.usefixtures("single_thread")


# 2-way 2-shot 1-query episode: class 0 support (2,0),(4,2) query (1,1); class 1 support
# (0,2),(0,4) query (1,3).  Prototypes (3,1) and (0,3).
HAND_X = torch.tensor([[2.0, 0], [4, 2], [1, 1], [0, 2], [0, 4], [1, 3]], dtype=torch.float64)
HAND_EP = torch.tensor([[[0, 1, 2], [3, 4, 5]]])


def _clusters(classes=10, per=30, dim=32, sep=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g) * sep
    x = (means.repeat_interleave(per, 0) + torch.randn(classes * per, dim, generator=g)).relu()
    return x, torch.arange(classes).repeat_interleave(per)


def test_ncm_l2_hand_computed():
    s = NearestClassMean(metric="l2").scores(HAND_X, HAND_EP, shot=2)
    # q0=(1,1): |q-p0|^2 = 4, |q-p1|^2 = 1+4 = 5;  q1=(1,3): 4+4 = 8, 1+0 = 1
    torch.testing.assert_close(s, torch.tensor([[[-4.0, -5.0], [-8.0, -1.0]]], dtype=torch.float64))


def test_ncm_cosine_hand_computed():
    s = NearestClassMean(metric="cosine").scores(HAND_X, HAND_EP, shot=2)
    want = [[4 / math.sqrt(20), 1 / math.sqrt(2)], [0.6, 3 / math.sqrt(10)]]
    torch.testing.assert_close(s, torch.tensor([want], dtype=torch.float64))


def test_ncm_centering_on_support_mean_and_on_given_vector():
    s = NearestClassMean(center=True).scores(HAND_X, HAND_EP, shot=2)
    # support mean (1.5, 2): p0=(1.5,-1), p1=(-1.5,1), q0=(-.5,-1), q1=(-.5,1)
    n = math.sqrt(1.25 * 3.25)
    torch.testing.assert_close(s, torch.tensor([[[0.25 / n, -0.25 / n], [-1.75 / n, 1.75 / n]]],
                                               dtype=torch.float64))
    s = NearestClassMean(center_vector=[1.0, 1.0]).scores(HAND_X, HAND_EP, shot=2)
    # p0=(2,0), p1=(-1,2), q0=(0,0) -> cos 0 (F.normalize of zero), q1=(0,2)
    torch.testing.assert_close(s, torch.tensor([[[0.0, 0.0], [0.0, 2 / math.sqrt(5)]]], dtype=torch.float64))
    with pytest.raises(DataError, match="center_vector has 3 values"):
        NearestClassMean(center_vector=[1.0, 1.0, 1.0]).scores(HAND_X, HAND_EP, shot=2)
    with pytest.raises(ConfigError):
        NearestClassMean(center=False, center_vector=[1.0, 1.0])


def test_summarize_ci95_hand_check():
    mean, std, ci = summarize([100.0, 50.0, 75.0, 75.0])
    assert mean == 75.0
    assert std == pytest.approx(math.sqrt((25 ** 2 + 25 ** 2) / 4))          # ddof = 0
    assert ci == pytest.approx(1.96 * 17.677669529663688 / 2)


def test_evaluate_result_keys_percent_and_ci():
    x, y = _clusters(sep=0.3)
    r = evaluate(x.numpy(), (y * 7 + 3).numpy(), way=5, shot=1, query=4, episodes=60,
                 method="ncm", seed=2)
    assert {"mean", "ci95", "accuracies", "way", "shot", "query", "episodes", "method",
            "seconds"} <= set(r)
    acc = np.asarray(r["accuracies"])
    assert acc.shape == (60,) and acc.min() >= 0 and acc.max() <= 100
    assert np.allclose(acc * 20 / 100, np.round(acc * 20 / 100))             # k / 20 queries
    assert r["mean"] == pytest.approx(acc.mean())
    assert r["ci95"] == pytest.approx(1.96 * acc.std() / math.sqrt(60))
    assert 20 < r["mean"] < 100 and r["method"] == "ncm"


@pytest.mark.parametrize("method,kw", [("finetune", {}), ("finetune", {"head": "linear"}),
                                       ("ncm", {}), ("protonet", {"metric": "l2"}), ("logreg", {})])
def test_near_perfect_accuracy_on_well_separated_clusters(method, kw):
    x, y = _clusters(sep=4.0, seed=1)
    r = evaluate(x, y, way=5, shot=1, query=5, episodes=40, method=method, **kw)
    assert r["mean"] > 99.0


def test_logreg_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _clusters(sep=0.4, seed=2)
    xn = torch.nn.functional.normalize(x.double(), dim=-1).numpy()
    for shot in (1, 5):
        eps = sample_episodes(y, 5, shot, 10, 6, seed=shot)
        ours = LogisticRegression(C=0.5).scores(x, eps, shot).numpy()
        agree, worst = [], 0.0
        for e in range(6):
            sup, qry = eps[e, :, :shot].flatten().numpy(), eps[e, :, shot:].flatten().numpy()
            clf = sklearn.LogisticRegression(C=0.5, max_iter=5000, tol=1e-10)
            dec = clf.fit(xn[sup], np.repeat(np.arange(5), shot)).decision_function(xn[qry])
            agree.append(np.mean(dec.argmax(1) == ours[e].argmax(1)))
            centred = lambda a: a - a.mean(1, keepdims=True)
            worst = max(worst, float(np.abs(centred(dec) - centred(ours[e])).max()))
        assert np.mean(agree) >= 0.98
        assert worst < 1e-4


def test_logreg_options():
    assert LogisticRegression(l2=4.0).C == 0.25
    with pytest.raises(ConfigError):
        LogisticRegression(C=1.0, l2=1.0)
    with pytest.raises(ConfigError):
        LogisticRegression(C=0.0)


@pytest.mark.parametrize("name,kw", [("ncm", {"center": True}), ("logreg", {}),
                                     ("finetune", {"steps": 15})])
def test_chunking_gives_identical_scores(name, kw):
    x, y = _clusters(seed=3)
    eps = sample_episodes(y, 5, 2, 3, 37, seed=1)
    a = EVALUATORS.create(name, chunk_size=1000, **kw).scores(x.double(), eps, 2, seed=4)
    b = EVALUATORS.create(name, chunk_size=5, **kw).scores(x.double(), eps, 2, seed=4)
    # logreg's float32 Newton phase uses MKL batched sgemm, whose rounding for some shapes
    # depends on a matrix's position in the batch; the float64 polish to ~1e-14 gradients
    # leaves differences at float64 resolution times the conditioning (~1e-12).
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10 if name == "logreg" else 1e-12)


def test_evaluate_errors_are_clear():
    x, y = _clusters()
    with pytest.raises(DataError, match="300 feature rows but 299 labels"):
        evaluate(x, y[:-1], episodes=2)
    with pytest.raises(ConfigError, match="did you mean 'ncm'"):
        evaluate(x, y, method="ncn", episodes=2)
    with pytest.raises(ConfigError, match="'steps_'"):
        evaluate(x, y, method="finetune", steps_=3, episodes=2)
    bad = x.clone()
    bad[7, 1] = float("nan")
    with pytest.raises(DataError, match="sample 7"):
        evaluate(bad, y, episodes=2)
    with pytest.raises(ConfigError):
        evaluate(x, y, query=0, episodes=2)


def test_evaluate_many_and_table():
    x, y = _clusters(sep=0.6)
    res = evaluate_many(x, y, shots=(1, 2), methods=["ncm", ("ncm", {"metric": "l2"})],
                        query=3, episodes=20, device="cpu")
    assert [(r["label"], r["shot"]) for r in res] == [
        ("ncm", 1), ("ncm", 2), ("ncm(metric=l2)", 1), ("ncm(metric=l2)", 2)]
    table = format_table(res).splitlines()
    assert table[0] == "| method | 5-way 1-shot | 5-way 2-shot |"
    assert table[2].startswith("| ncm | ") and " ± " in table[2] and len(table) == 4
    assert list_evaluators() == ["finetune", "logreg", "ncm"]


def test_logreg_memory_budget_subchunks_do_not_change_results(monkeypatch):
    """Many-way episodes are fitted in memory-bounded sub-chunks; results equal a single batched fit."""
    import lowshot.fewshot.logreg as lr
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 16, generator=g) + torch.arange(30).repeat_interleave(10)[:, None] * 0.3
    labels = torch.arange(30).repeat_interleave(10)
    from lowshot.fewshot import evaluate
    full = evaluate(feats, labels, way=10, shot=2, query=3, episodes=12, method="logreg", seed=1)
    monkeypatch.setattr(lr, "_FIT_BUDGET_BYTES", 1)  # one episode per Newton fit
    tiny = evaluate(feats, labels, way=10, shot=2, query=3, episodes=12, method="logreg", seed=1)
    assert full["accuracies"] == tiny["accuracies"]


def test_finetune_head_follows_training_head_family():
    from lowshot.fewshot import method_kwargs_for_head
    assert method_kwargs_for_head("neg_cosine", "finetune", {}) == {"head": "cosine"}
    assert method_kwargs_for_head("arcface", "finetune", {"steps": 10}) == {"head": "cosine", "steps": 10}
    # bl0 meta-tests a neg-softmax model with its own metric at scale 5, margin 0, no bias
    assert method_kwargs_for_head("neg_softmax", "finetune", {}) == {"head": "linear", "bias": False, "scale": 5.0}
    assert method_kwargs_for_head("neg_softmax", "finetune", {"scale": 10.0}) == {
        "head": "linear", "bias": False, "scale": 10.0}
    assert method_kwargs_for_head("linear", "finetune", {}) == {"head": "linear"}  # nn.Linear: bias, scale 1
    assert method_kwargs_for_head("softmax", "finetune", {}) == {"head": "linear"}
    assert method_kwargs_for_head("virtual_softmax", "finetune", {}) == {"head": "linear", "bias": False}
    assert method_kwargs_for_head("neg_softmax", "finetune", {"head": "cosine"}) == {"head": "cosine"}
    assert method_kwargs_for_head("virtual_softmax", "finetune", {"head": "cosine"}) == {"head": "cosine"}
    assert method_kwargs_for_head("cosine", "ncm", {"metric": "l2"}) == {"metric": "l2"}


def test_head_family_is_declared_at_registration():
    """A plug-in head names its family when registered; fewshot/api.py holds no list of names."""
    from lowshot.fewshot import method_kwargs_for_head
    from lowshot.heads import HEADS, head_family, register_head
    from lowshot.heads.linear import LinearHead

    @register_head("test_family_plugin", family="neg_softmax")
    def plugin(num_classes, embedding_size):
        return LinearHead(num_classes, embedding_size, bias=False)

    try:
        assert head_family("test_family_plugin") == "neg_softmax"
        assert head_family("arcface") == "cosine" and head_family("neg_cosine") == "cosine"
        assert head_family("not_a_head") == "linear"
        assert method_kwargs_for_head("test_family_plugin", "finetune") == {"head": "linear", "bias": False,
                                                                             "scale": 5.0}
        with pytest.raises(ValueError, match="family"):
            register_head("test_family_bad", family="nope")
    finally:
        HEADS.unregister("test_family_plugin")


def test_validation_and_sweeps_use_the_family_fine_tune_head():
    """Validation during training and sweeps go through train._fewshot_method_kwargs."""
    from lowshot.config import load_config
    from lowshot.fewshot.evaluators import create_evaluator
    from lowshot.train import _fewshot_method_kwargs
    cfg = load_config(None, ["head.name=neg_softmax"])
    kw = _fewshot_method_kwargs(cfg, "finetune", {"preset": "bl0"})
    assert kw == {"preset": "bl0", "head": "linear", "bias": False, "scale": 5.0}
    solver = create_evaluator("finetune", **kw)
    assert (solver.config.head, solver.config.bias, solver.config.scale) == ("linear", False, 5.0)


def test_logreg_fit_is_float64_optimal_per_episode_and_batch_independent():
    """Every episode meets the float64 KKT conditions (float32 Newton + float64 refinement), and
    an episode fitted inside a mixed batch (one 'hard', badly scaled episode) equals its solo fit."""
    from lowshot.fewshot.logreg import fit_logreg
    g = torch.Generator().manual_seed(3)
    way, shot, e = 4, 3, 7
    n = way * shot
    coords = torch.randn(e, n, n, generator=g, dtype=torch.float64).tril()
    coords[2] *= 6.0                                       # many more Newton steps than the others
    y = torch.arange(way).repeat_interleave(shot)
    l2 = 0.5
    alpha, b = fit_logreg(coords, y, way, l2, tol=1e-9)
    # Back in coordinates: A = alpha C; logits = C A^T + b; dF/dA = (P - Y)^T C + l2 A.
    a = torch.bmm(alpha, coords)
    logits = torch.bmm(coords, a.transpose(1, 2)) + b.unsqueeze(1)
    resid = torch.softmax(logits, -1) - torch.nn.functional.one_hot(y, way).double()
    grad_a = torch.bmm(resid.transpose(1, 2), coords) + l2 * a
    assert float(grad_a.abs().max()) < 1e-8 and float(resid.sum(1).abs().max()) < 1e-8
    torch.testing.assert_close(b.sum(1), torch.zeros(e, dtype=torch.float64), rtol=0, atol=1e-12)
    for i in (0, 2, 6):
        solo = fit_logreg(coords[i:i + 1], y, way, l2, tol=1e-9)
        torch.testing.assert_close(solo[0][0], alpha[i], rtol=0, atol=1e-10)
        torch.testing.assert_close(solo[1][0], b[i], rtol=0, atol=1e-10)


def test_ncm_table_path_keeps_float32_precision_under_a_large_common_offset():
    """Centring must happen on the rows: x.c - m.c in float32 loses digits when |m| >> spread."""
    x, y = _clusters(seed=7)
    x = (x + 30.0).float()
    centre = x.double().mean(0)
    eps = sample_episodes(y, 5, 1, 4, 50, seed=3)
    for metric in ("l2", "cosine"):
        ours = NearestClassMean(metric=metric, center_vector=centre, normalize=True).scores(x, eps, 1)
        exact = NearestClassMean(metric=metric, center_vector=centre, normalize=True).scores(x.double(), eps, 1)
        torch.testing.assert_close(ours, exact, rtol=0, atol=5e-6)   # naive algebra: 1.5e-5


def test_ncm_table_path_matches_simpleshot_numpy_loop():
    """Global centre + normalisation applied once to the table == SimpleShot's per-episode code."""
    x, y = _clusters(seed=5)
    eps = sample_episodes(y, 5, 3, 4, 9, seed=2)
    centre = x.mean(0)
    ours = NearestClassMean(metric="l2", center_vector=centre, normalize=True).scores(x, eps, 3)
    xn, c = x.double().numpy(), centre.double().numpy()
    for e in range(9):
        sup = xn[eps[e, :, :3].flatten().numpy()] - c
        qry = xn[eps[e, :, 3:].flatten().numpy()] - c
        sup /= np.linalg.norm(sup, axis=1, keepdims=True)
        qry /= np.linalg.norm(qry, axis=1, keepdims=True)
        proto = sup.reshape(5, 3, -1).mean(1)
        ref = -np.linalg.norm(proto[:, None] - qry, axis=-1).T ** 2
        np.testing.assert_allclose(ours[e].numpy(), ref, rtol=0, atol=1e-5)
        assert (ours[e].argmax(1).numpy() == ref.argmax(1)).all()
    cos = NearestClassMean(center_vector=centre, normalize=True).scores(x.double(), eps, 3)
    l2 = NearestClassMean(metric="l2", center_vector=centre, normalize=True).scores(x.double(), eps, 3)
    # Unit-norm queries: -|q - p|^2 = 2 q.p - 1 - |p|^2, so both metrics rank classes alike only
    # up to |p|; check the cosine path against its own formula instead.
    assert torch.isfinite(cos).all() and cos.abs().max() <= 1 + 1e-12 and torch.isfinite(l2).all()
