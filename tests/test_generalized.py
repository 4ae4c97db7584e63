"""Generalized few-shot: metrics on hand-made scores, batched == per-episode loop, val-only calibration, CLI."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowshot.errors import ConfigError, DataError
from lowshot.fewshot import sample_episodes
from lowshot.fewshot.finetune import FinetuneConfig, episode_draws
from lowshot.fewshot.generalized import (CALIBRATIONS, BaseClassifier, GeneralizedReport, Reduced,
                                         episode_metrics, evaluate_generalized, fit_group_scales,
                                         format_generalized_table, sample_base_queries, seen_unseen_curve,
                                         split_heldout)

from conftest import ROOT, needs_fmnist

pytestmark = pytest.mark.usefixtures("single_thread")


def _red(mb, ok_base, mn, ok_novel):
    t = lambda v, dt=torch.float64: torch.tensor([v], dtype=dt)  # noqa: E731
    return Reduced(t(mb), t(ok_base, torch.bool), t(mn), t(ok_novel, torch.bool))


# ----------------------------------------------------------------------------- metrics by hand

def test_metrics_on_hand_made_scores():
    # two base queries (margins d = mb - mn: 2, -1), two novel queries (d: -2, 1); all right in isolation
    red = _red([3., 1., 0., 2.], [1, 1, 0, 0], [1., 2., 2., 1.], [0, 0, 1, 1])
    is_base = torch.tensor([True, True, False, False])
    m = {k: float(v) for k, v in episode_metrics(red, is_base).items()}
    # gamma 0: base predicted for d >= 0 -> q0 right, q1 wrong (goes novel), q2 right, q3 wrong
    assert m["base"] == 50 and m["novel"] == 50 and m["joint"] == 50 and m["hmean"] == 50
    assert m["base_only"] == 100 and m["novel_only"] == 100 and m["delta"] == 50
    # AUSUC: right base d in {2, -1}, right novel d in {-2, 1}: 3 of 4 pairs ordered -> 75
    assert m["ausuc"] == pytest.approx(75.0)
    m = {k: float(v) for k, v in episode_metrics(red, is_base, gamma=-1.5).items()}
    assert m["base"] == 100 and m["novel"] == 50 and m["joint"] == 75
    assert m["hmean"] == pytest.approx(2 * 100 * 50 / 150)          # 66.67
    assert m["delta"] == pytest.approx((0 + 50) / 2)
    assert m["ausuc"] == pytest.approx(75.0)                         # the sweep does not depend on gamma
    # the curve's staircase, by hand: (novel, base) = (0,100) (50,100) (50,50) (100,50) (100,0)
    base, novel = seen_unseen_curve(red, is_base, torch.tensor([-3., -1.5, 0., 1.5, 3.]))
    assert base.tolist() == [100, 100, 50, 50, 0] and novel.tolist() == [0, 50, 50, 100, 100]


def test_metrics_with_wrong_queries_ties_and_scales():
    # base: d = 1 (right), 0 (wrong class), 0.5 (right); novel: d = 1 (right, tied with base q0), -1 (wrong)
    red = _red([1., 0., .5, 1., -1.], [1, 0, 1, 0, 0], [0., 0., 0., 0., 0.], [0, 0, 0, 1, 0])
    is_base = torch.tensor([True, True, True, False, False])
    m = {k: float(v) for k, v in episode_metrics(red, is_base, gamma=0.75).items()}
    assert m["base"] == pytest.approx(100 / 3) and m["novel"] == 0 and m["hmean"] == 0
    assert m["joint"] == pytest.approx(20.0)
    assert m["base_only"] == pytest.approx(200 / 3) and m["novel_only"] == 50
    assert m["delta"] == pytest.approx(((200 / 3 - 100 / 3) + 50) / 2)
    # pairs (right base d=1, right novel d=1): tie -> 1/2; (d=0.5, d=1): 0 -> 0.5 / (3 * 2)
    assert m["ausuc"] == pytest.approx(100 * 0.5 / 6)
    # a novel scale of 3 with mn = 1 on every query: d = mb - 3, so gamma = -2.5 keeps only mb >= 0.5 on base
    red2 = red._replace(mn=torch.ones_like(red.mn))
    m = {k: float(v) for k, v in episode_metrics(red2, is_base, gamma=-2.5, scale_novel=3.0).items()}
    assert m["base"] == pytest.approx(200 / 3) and m["novel"] == 0


def test_every_episode_needs_both_groups():
    red = _red([1.], [1], [0.], [0])
    with pytest.raises(DataError, match="base and novel"):
        episode_metrics(red, torch.tensor([True]))


# ----------------------------------------------------------------------------- sampling and splits

def test_base_queries_spread_evenly_distinct_and_reproducible():
    labels = torch.arange(4).repeat_interleave(torch.tensor([5, 6, 7, 8]))
    idx = sample_base_queries(labels, 10, 300, seed=3)
    assert idx.shape == (300, 10)
    counts = torch.stack([torch.bincount(labels[row], minlength=4) for row in idx])
    assert set(counts.flatten().tolist()) <= {2, 3} and bool((counts.sum(1) == 10).all())
    assert all(len(set(row.tolist())) == 10 for row in idx)                  # no image twice
    assert torch.equal(idx, sample_base_queries(labels, 10, 300, seed=3))
    assert not torch.equal(idx, sample_base_queries(labels, 10, 300, seed=4))
    # each class gets the extra query equally often (uniform over classes)
    assert ((counts == 3).double().mean(0) - 0.5).abs().max() < 0.1
    with pytest.raises(DataError, match="base class 0 has 5 held-out images"):
        sample_base_queries(labels, 24, 2)


def test_split_heldout_is_disjoint_per_class():
    labels = torch.arange(3).repeat_interleave(torch.tensor([5, 10, 2]))
    val, test = split_heldout(labels, 0.5, seed=0)
    assert sorted(val.tolist() + test.tolist()) == list(range(17))
    assert torch.bincount(labels[val]).tolist() == [2, 5, 1]
    assert torch.equal(val, split_heldout(labels, 0.5, seed=0)[0])


# ----------------------------------------------------------------------------- batched == per-episode loop

def _blobs(seed=0, dim=12, base=5, n_novel=6, n_val=4):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(base + n_novel + n_val, dim, generator=g, dtype=torch.float64) * 1.5

    def make(classes, n):
        y = torch.arange(len(classes)).repeat_interleave(n)
        return centres[torch.tensor(classes)][y] + torch.randn(len(y), dim, generator=g, dtype=torch.float64), y

    d = {"train": make(range(base), 25), "test": make(range(base), 12), "bval": make(range(base), 12),
         "novel": make(range(base, base + n_novel), 12),
         "val": make(range(base + n_novel, base + n_novel + n_val), 12)}
    w = torch.stack([d["train"][0][d["train"][1] == c].mean(0) for c in range(base)])
    return d, w


def _reference(d, clf, method, way, shot, query, base_query, episodes, seed, gamma=0.0, cfg=None):
    """Per-episode loop: explicit joint weight matrix, argmax over all classes, torch.optim.SGD."""
    x_n, y_n = d["novel"]
    x_b, y_b = d["test"]
    eps = sample_episodes(y_n, way, shot, query, episodes, seed)
    bidx = sample_base_queries(y_b, base_query, episodes, seed)
    C = clf.num_classes
    out = {k: [] for k in ("base", "novel", "joint", "hmean", "delta", "ausuc")}
    for e in range(episodes):
        phi = clf.project
        sup = phi(x_n[eps[e, :, :shot]])                                        # [way, shot, D]
        if clf.kind == "cosine":
            wb, bb = F.normalize(clf.weight, dim=1), torch.zeros(C, dtype=torch.float64)
        elif clf.kind == "linear":
            wb, bb = clf.weight, clf.bias
        else:
            wb, bb = F.normalize(clf.weight, dim=1), torch.zeros(C, dtype=torch.float64)
        proto = F.normalize(F.normalize(sup, dim=-1).mean(1), dim=-1)
        if method == "ncm":
            wn, bn = F.normalize(sup.mean(1), dim=-1), torch.zeros(way, dtype=torch.float64)
        elif clf.kind == "linear":
            wn, bn = proto * wb.norm(dim=1).mean(), bb.mean().repeat(way)
        else:
            wn, bn = proto, torch.zeros(way, dtype=torch.float64)
        if method == "finetune":
            n = way * shot
            steps = cfg.num_steps(n, shot)
            passes = math.ceil(steps / math.ceil(n / cfg.batch_size))
            perm = episode_draws(seed, e, e + 1, way, sup.shape[-1], n, passes).perms[0]
            w = torch.nn.Parameter(wn.clone())
            b = torch.nn.Parameter(bn.clone())
            params = [w] if clf.kind == "cosine" else [w, b]
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                                  weight_decay=cfg.weight_decay)
            xs, ys = sup.reshape(n, -1), torch.arange(way).repeat_interleave(shot) + C
            per = math.ceil(n / cfg.batch_size)
            for t in range(steps):
                p, j = divmod(t, per)
                sel = perm[p, j * cfg.batch_size:(j + 1) * cfg.batch_size].long()
                wj = F.normalize(w, dim=1) if clf.kind == "cosine" else w
                bj = torch.zeros(way, dtype=torch.float64) if clf.kind == "cosine" else b
                logits = clf.scale * (xs[sel] @ torch.cat([wb, wj]).t() + torch.cat([bb, bj]))
                loss = F.cross_entropy(logits, ys[sel])
                opt.zero_grad()
                loss.backward()
                opt.step()
            wn = F.normalize(w.detach(), dim=1) if clf.kind == "cosine" else w.detach()
            bn = bn if clf.kind == "cosine" else b.detach()
        W, B = torch.cat([wb, wn]), torch.cat([bb, bn])
        qx = torch.cat([x_n[eps[e, :, shot:]].reshape(-1, x_n.shape[1]), x_b[bidx[e]]])
        qy = torch.cat([torch.arange(way).repeat_interleave(query) + C, y_b[bidx[e]]])
        s = clf.scale * (phi(qx) @ W.t() + B)
        is_b = qy < C

        def accs(gam):
            pred = (s - gam * (torch.arange(C + way) < C)).argmax(1)
            return (100 * (pred == qy)[is_b].double().mean()).item(), (100 * (pred == qy)[~is_b].double().mean()).item()

        a_b, a_n = accs(gamma)
        only_b = (100 * (s[:, :C].argmax(1) == qy)[is_b].double().mean()).item()
        only_n = (100 * (s[:, C:].argmax(1) + C == qy)[~is_b].double().mean()).item()
        # AUSUC: sweep gamma over midpoints of the sorted margins, trapezoid over (novel, base)
        dd = torch.sort(s[:, :C].max(1).values - s[:, C:].max(1).values).values
        gs = torch.cat([dd[:1] - 1, (dd[1:] + dd[:-1]) / 2, dd[-1:] + 1])
        pts = np.array([accs(float(gg))[::-1] for gg in gs])                   # (novel, base)
        out["base"].append(a_b)
        out["novel"].append(a_n)
        out["joint"].append((a_b * is_b.sum().item() + a_n * (~is_b).sum().item()) / len(qy))
        out["hmean"].append(0.0 if a_b + a_n == 0 else 2 * a_b * a_n / (a_b + a_n))
        out["delta"].append(((only_b - a_b) + (only_n - a_n)) / 2)
        out["ausuc"].append(float(np.trapezoid(pts[:, 1], pts[:, 0])) / 100)
    return out


@pytest.mark.parametrize("kind,method", [("cosine", "imprint"), ("linear", "finetune"),
                                         ("cosine", "finetune"), ("ncm", "ncm")])
def test_batched_equals_per_episode_loop(kind, method):
    d, w = _blobs()
    if kind == "ncm":
        clf = BaseClassifier.ncm(*d["train"])
    else:
        b = torch.linspace(-0.2, 0.3, w.shape[0], dtype=torch.float64) if kind == "linear" else None
        clf = BaseClassifier(w, kind, 4.0 if kind == "cosine" else 0.5, b)
    way, shot, query, base_query, episodes = 3, 2, 3, 7, 11
    ft = {"steps": 9}
    kw = dict(base_classifier=clf, way=way, shots=(shot,), query=query, base_query=base_query,
              episodes=episodes, method=method, seed=5, finetune=ft)
    rep = evaluate_generalized(*d["test"], *d["novel"], chunk_size=4, **kw)
    ref = _reference(d, clf, method, way, shot, query, base_query, episodes, 5,
                     cfg=FinetuneConfig(head="cosine" if kind == "cosine" else "linear", **ft))
    got = rep.results[0].per_episode
    for k, v in ref.items():
        np.testing.assert_allclose(got[k], v, atol=1e-6, err_msg=k)
    # chunking never changes a number
    again = evaluate_generalized(*d["test"], *d["novel"], chunk_size=64, **kw).results[0].per_episode
    for k in ref:
        np.testing.assert_allclose(got[k], again[k], atol=1e-9)
    assert 0 < rep.results[0].joint.mean < 100


def test_bias_calibration_equals_loop_with_the_chosen_gamma():
    d, w = _blobs(seed=1)
    clf = BaseClassifier(w, "cosine", 4.0)
    rep = evaluate_generalized(*d["test"], *d["novel"], base_classifier=clf, val_features=d["val"][0],
                               val_labels=d["val"][1], base_val_features=d["bval"][0],
                               base_val_labels=d["bval"][1], way=3, shots=(1,), query=3, base_query=6,
                               episodes=9, calibrations=("none", "bias"), seed=2)
    cell = {r.calibration: r for r in rep.results}["bias"]
    ref = _reference(d, clf, "imprint", 3, 1, 3, 6, 9, 2, gamma=cell.chosen["gamma"])
    np.testing.assert_allclose(cell.per_episode["base"], ref["base"], atol=1e-9)
    np.testing.assert_allclose(cell.per_episode["novel"], ref["novel"], atol=1e-9)


# ----------------------------------------------------------------------------- calibration on val only

def _calibrated(d, clf, test_novel, val=None, episodes=40):
    val = val or d["val"]
    return evaluate_generalized(*d["test"], *test_novel, base_classifier=clf, val_features=val[0],
                                val_labels=val[1], base_val_features=d["bval"][0], base_val_labels=d["bval"][1],
                                way=3, shots=(1,), query=4, episodes=episodes, calibrations=CALIBRATIONS, seed=0)


def test_calibration_is_chosen_on_validation_only():
    d, w = _blobs(seed=2)
    b = torch.zeros(w.shape[0], dtype=torch.float64)
    clf = BaseClassifier(w * 3, "linear", 1.0, b)                   # big base rows: a strong base bias
    rep = _calibrated(d, clf, d["novel"])
    chosen = {r.calibration: r.chosen for r in rep.results}
    # other test data (novel classes far off, features scaled): the same parameters
    xs, ys = d["novel"]
    other = _calibrated(d, clf, (xs * 4 + 3, ys))
    assert {r.calibration: r.chosen for r in other.results} == chosen
    # other validation data: different parameters
    xv, yv = d["val"]
    moved = _calibrated(d, clf, d["novel"], val=(xv * 4 + 3, yv))
    assert {r.calibration: r.chosen for r in moved.results} != chosen
    # the chosen values are the validation optimum (re-derived by hand for the bias)
    cells = {r.calibration: r for r in rep.results}
    assert cells["none"].chosen == {} and cells["none"].val_criterion is None
    assert set(cells["tau_norm"].chosen) == {"tau"} and set(cells["scale"].chosen) == {"scale_base", "scale_novel"}
    assert cells["bias"].chosen["gamma"] > 0                           # the base bias is subtracted
    assert cells["bias"].novel.mean > cells["none"].novel.mean
    assert cells["bias"].ausuc == cells["none"].ausuc                  # AUSUC is a sweep over all biases


def test_calibration_needs_validation_data():
    d, w = _blobs()
    with pytest.raises(ConfigError, match="validation episodes"):
        evaluate_generalized(*d["test"], *d["novel"], base_classifier=BaseClassifier(w), calibrations=("bias",))
    with pytest.raises(ConfigError, match="calibration must be among"):
        evaluate_generalized(*d["test"], *d["novel"], base_classifier=BaseClassifier(w), calibrations=("temp",))
    with pytest.raises(ConfigError, match="does not fit"):      # imprinting rows into an NCM classifier
        evaluate_generalized(*d["test"], *d["novel"], base_classifier=BaseClassifier.ncm(*d["train"]),
                             method="imprint")
    with pytest.raises(ConfigError, match="needs base_train_features"):
        evaluate_generalized(*d["test"], *d["novel"], method="ncm")


def test_group_scales_minimise_the_balanced_loss():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 10, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (6, 10), generator=g)
    scores[..., 4:] -= 1.0                                             # novel columns (C = 4) too low
    sb, sn = fit_group_scales(scores, labels, 4)

    def loss(a, b):
        s = torch.tensor([a] * 4 + [b] * 3, dtype=torch.float64)
        y = labels.flatten()
        ce = F.cross_entropy(scores.reshape(-1, 7) * s, y, reduction="none")
        base = y < 4
        return float(0.5 * ce[base].mean() + 0.5 * ce[~base].mean())

    best = loss(sb, sn)
    for da, db in ((1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)):
        assert loss(sb * math.exp(da), sn * math.exp(db)) >= best - 1e-12
    assert best < loss(1.0, 1.0)


def test_report_round_trips_through_json():
    d, w = _blobs()
    rep = _calibrated(d, BaseClassifier(w, "cosine", 5.0), d["novel"], episodes=5)
    back = GeneralizedReport.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert back == rep
    table = format_generalized_table(rep)
    assert table.count("\n") == 1 + len(CALIBRATIONS) and "tau=" in table and "gamma=" in table
    bad = rep.to_dict()
    del bad["results"][0]["ausuc"]
    with pytest.raises(DataError, match="ausuc"):
        GeneralizedReport.from_dict(bad)


# ----------------------------------------------------------------------------- CLI on a tiny trained run

FM_CFG = str(ROOT / "configs" / "fashion_mnist" / "conv4_neg_cosine.yaml")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lowshot", *args], capture_output=True, text=True, cwd=ROOT)


@needs_fmnist
def test_cli_generalized_eval_and_report(tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", FM_CFG, "data.options={max_per_class: 40}", "train.epochs=1", "train.batch_size=32",
                "train.progress=false", "val.every=0", "--run-dir", str(run))
    assert r.returncode == 0, r.stderr
    out = run / "generalized_test.json"
    r = run_cli("eval", "--checkpoint", str(run), "--generalized", "--way", "3", "--shot", "1", "5",
                "--query", "4", "--episodes", "12", "--calibration", "none", "tau_norm", "scale", "bias",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "| 5 | bias |" in r.stdout and "hmean" in r.stdout
    data = json.loads(out.read_text())
    assert data["kind"] == "generalized" and data["method"] == "imprint" and data["num_base_classes"] == 5
    assert data["base_query"] == 12 and data["source"]["base_split"] == "base_test"
    cells = {(c["shot"], c["calibration"]) for c in data["results"]}
    assert cells == {(s, c) for s in (1, 5) for c in CALIBRATIONS}
    for c in data["results"]:
        for k in ("base", "novel", "joint", "hmean", "delta", "ausuc"):
            assert set(c[k]) == {"mean", "ci95"} and 0 <= c[k]["mean"] <= 100 or k == "delta"
    # the report gets the section, table and curve
    from lowshot.report import build_report
    html = build_report([run], tmp_path / "rep").read_text()
    assert "Generalized few-shot" in html and "<td>bias</td>" in html and "seen-unseen curve" in html
    # a user error: calibration without --generalized, one line, exit 2, nothing written
    r = run_cli("eval", "--checkpoint", str(run), "--calibration", "bias", "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--generalized" in r.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("name", __import__("lowshot.heads", fromlist=["list_heads"]).list_heads())
def test_base_classifier_of_every_head_reproduces_its_eval_logits(name):
    """``BaseClassifier.from_head`` reads each head's ``score_form``: the linear form it builds scores
    exactly like the head in eval mode (margins off), for every registered head."""
    from lowshot.heads import create_head
    g = torch.Generator().manual_seed(0)
    head = create_head(name, 4, 6)
    if name == "ncm":
        head.fit(torch.randn(20, 6, generator=g), torch.arange(4).repeat(5))
    x = torch.randn(7, 6, generator=g, dtype=torch.float64)
    clf = BaseClassifier.from_head(head)
    w, b = clf.rows(torch.float64, "cpu")
    scores = clf.scale * (clf.project(x) @ w.t() + b)
    expected = head.double().eval()(x)
    if name == "ncm":   # l2 NCM rows are 2 mu, -|mu|^2: the head's -|q - mu|^2 up to -|q|^2 per query
        expected = expected + clf.project(x).square().sum(1, keepdim=True)
    torch.testing.assert_close(scores, expected)
