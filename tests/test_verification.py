"""LFW pairs parsing and the 10-fold verification protocol, with hand-computed numbers."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowshot.errors import ConfigError, DataError
from lowshot.verification import (best_threshold, evaluate_lfw, kfold_accuracy, lfw_image_path, make_embed_fn,
                                  read_pairs, verification_accuracy)

PAIRS = """2\t3
Abel_Pacheco\t1\t4
Akhmed_Zakayev\t1\t3
Akhmed_Zakayev\t2\t3
Abdel_Madi_Shabneh\t1\tDean_Barker\t1
Abdel_Madi_Shabneh\t1\tGiancarlo_Fisichella\t1
Abdel_Madi_Shabneh\t1\tMikhail_Gorbachev\t1
Amber_Tamblyn\t1\t2
Anders_Fogh_Rasmussen\t1\t3
Anders_Fogh_Rasmussen\t1\t4
Abdul_Majeed_Shobokshi\t1\tCharles_Cope\t1
Abdullah\t1\tAbdullah_Gul\t13
Abdullah\t3\tAbdullah_Gul\t1
"""


def write_pairs(tmp_path: Path, text: str = PAIRS) -> Path:
    p = tmp_path / "pairs.txt"
    p.write_text(text)
    return p


def test_read_pairs_official_format(tmp_path: Path) -> None:
    pairs = read_pairs(write_pairs(tmp_path))
    assert pairs.num_folds == 2 and len(pairs) == 12
    assert pairs.is_same.tolist() == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
    assert pairs.fold.tolist() == [0] * 6 + [1] * 6
    assert pairs.left[0] == ("Abel_Pacheco", 1) and pairs.right[0] == ("Abel_Pacheco", 4)
    assert pairs.left[10] == ("Abdullah", 1) and pairs.right[10] == ("Abdullah_Gul", 13)
    dev = write_pairs(tmp_path, "1\nA\t1\t2\nA\t1\tB\t1\n")  # pairsDevTrain.txt style header
    assert read_pairs(dev).num_folds == 1 and read_pairs(dev).is_same.tolist() == [True, False]


@pytest.mark.parametrize("text, match", [
    (PAIRS.rsplit("\n", 2)[0] + "\n", r"12 lines, found 11"),
    (PAIRS.replace("Amber_Tamblyn\t1\t2", "Amber_Tamblyn\t1"), r"pairs\.txt:8: expected a matched pair"),
    (PAIRS.replace("Charles_Cope\t1", "Charles_Cope\tx"), r"pairs\.txt:11: image index"),
    ("ten 300\n", r"pairs\.txt:1: expected a header"),
])
def test_read_pairs_errors_name_the_line(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        read_pairs(write_pairs(tmp_path, text))


def test_missing_pairs_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.txt"):
        read_pairs(tmp_path / "nope.txt")


def test_lfw_image_path() -> None:
    assert lfw_image_path("/d/lfw", "Abdullah_Gul", 13) == Path("/d/lfw/Abdullah_Gul/Abdullah_Gul_0013.jpg")


# Two folds of four pairs. Fold 1 sorted: .2D .4D .7S .8S -> best cut is unique, threshold .55.
# Fold 0 sorted: .1D .5S .6D .9S -> cuts at .3 and .75 both get 3/4; the lowest (.3) is kept.
SCORES = torch.tensor([0.9, 0.5, 0.6, 0.1, 0.8, 0.7, 0.4, 0.2])
SAME = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)


def test_best_threshold_exact_and_tie_rule() -> None:
    assert best_threshold(SCORES[4:], SAME[4:]) == (pytest.approx(0.55), 1.0)
    assert best_threshold(SCORES[:4], SAME[:4]) == (pytest.approx(0.3), 0.75)
    thr, acc = best_threshold(torch.tensor([0.1, 0.2]), torch.tensor([True, True]))
    assert thr == -math.inf and acc == 1.0
    thr, acc = best_threshold(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([False, True, False]))
    assert thr == math.inf and acc == pytest.approx(2 / 3)  # cannot split equal scores


def test_kfold_hand_computed() -> None:
    # fold 0 tested at .55: .9S ok, .5S wrong, .6D wrong, .1D ok -> 0.5
    # fold 1 tested at .3:  .8S ok, .7S ok, .4D wrong, .2D ok -> 0.75
    r = kfold_accuracy(SCORES, SAME, folds=2)
    assert r["thresholds"] == [pytest.approx(0.55), pytest.approx(0.3)]
    assert r["per_fold"] == [0.5, 0.75] and r["mean"] == pytest.approx(0.625) and r["std"] == pytest.approx(0.125)
    grid = kfold_accuracy(SCORES, SAME, folds=2, thresholds=torch.tensor([0.0, 0.3, 0.55, 0.75, 1.0]))
    assert grid["per_fold"] == [0.5, 0.75] and grid["thresholds"] == [pytest.approx(0.55), pytest.approx(0.3)]
    ids = kfold_accuracy(SCORES, SAME, folds=torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]))
    assert ids["per_fold"] == [0.75, 0.5]  # folds reported in id order


def test_verification_accuracy_from_embeddings_matches_scores() -> None:
    s = SCORES.double()
    emb1 = torch.stack([torch.ones_like(s), torch.zeros_like(s)], 1) * 3.0
    emb2 = torch.stack([s, torch.sqrt(1 - s ** 2)], 1) * 0.5  # cosine(emb1, emb2) == s
    r = verification_accuracy(emb1, emb2, SAME, folds=2)
    assert r["per_fold"] == [0.5, 0.75]
    e = verification_accuracy(emb1 / 3.0, emb2 * 2.0, SAME, folds=2, metric="euclidean")  # unit vectors
    assert e["per_fold"] == [0.5, 0.75]  # distance is monotone in cosine for unit vectors
    with pytest.raises(ConfigError, match="metric"):
        verification_accuracy(emb1, emb2, SAME, metric="l1")


def test_perfect_embeddings_give_100_percent() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randn(50, 16, generator=g)
    left = torch.arange(600) % 50
    same = torch.arange(600) % 2 == 0
    right = torch.where(same, left, (left + 1 + torch.arange(600) % 7) % 50)
    r = verification_accuracy(ids[left], ids[right] * 2.0, same, folds=10)
    assert r["mean"] == 1.0 and r["std"] == 0.0 and len(r["per_fold"]) == 10


def _lfw_fixture(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "lfw"
    pairs = read_pairs(write_pairs(tmp_path))
    people = sorted({n for n, _ in pairs.left + pairs.right})
    for n, i in set(pairs.left + pairs.right):
        (root / n).mkdir(parents=True, exist_ok=True)
        # one random pattern per person (identical for all of their images): identity-perfect images
        pattern = np.random.default_rng(people.index(n)).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(pattern).save(lfw_image_path(root, n, i), format="JPEG", quality=95)
    return tmp_path / "pairs.txt", root


def test_evaluate_lfw_with_features_dict_and_embed_fn(tmp_path: Path) -> None:
    pairs_path, root = _lfw_fixture(tmp_path)
    pairs = read_pairs(pairs_path)
    people = sorted({n for n, _ in pairs.left + pairs.right})
    onehot = torch.eye(len(people))
    feats = {f"{n}/{n}_{i:04d}.jpg": onehot[people.index(n)] for n, i in set(pairs.left + pairs.right)}
    r = evaluate_lfw(feats, pairs_path, root)
    assert r["mean"] == 1.0 and r["num_pairs"] == 12
    del feats[next(iter(feats))]
    with pytest.raises(DataError, match="no feature for LFW image"):
        evaluate_lfw(feats, pairs_path, root)

    class Net(torch.nn.Module):  # centred pixels: random patterns of different people are near-orthogonal
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1) - 0.5

    net = Net()
    r = evaluate_lfw(make_embed_fn(net, image_size=4, flip=True), pairs_path, root)
    assert r["mean"] == 1.0 and len(r["per_fold"]) == 2 and net.training
    seen = []
    evaluate_lfw(lambda paths: seen.extend(paths) or torch.randn(len(paths), 3), pairs_path, root)
    assert len(seen) == len(set(seen)) == len(set(pairs.left + pairs.right))  # each image embedded once
    lfw_image_path(root, "Abdullah", 3).unlink()
    with pytest.raises(DataError, match=r"Abdullah_0003\.jpg"):
        evaluate_lfw(make_embed_fn(net), pairs_path, root)
