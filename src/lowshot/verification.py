"""Face verification on LFW (Huang et al. 2007) with the standard 10-fold protocol.

``pairs.txt`` starts with ``<folds> <n>`` and then, for every fold, ``n`` matched lines
``name i j`` followed by ``n`` mismatched lines ``name1 i name2 j`` (``pairsDevTrain.txt`` style
files have a single count and one fold). For each fold the decision threshold is the one that
maximises accuracy on the other folds, and the reported number is the mean (and population std,
as the usual LFW tables) of the held-out-fold accuracies, so no threshold is tuned on test pairs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError

METRICS = ("cosine", "euclidean")


@dataclass
class VerificationPairs:
    """Parsed pairs: image ids ``(name, index)`` on each side, ground truth and fold of each pair."""

    left: list[tuple[str, int]]
    right: list[tuple[str, int]]
    is_same: torch.Tensor  # bool [P]
    fold: torch.Tensor  # long [P], 0..num_folds-1
    num_folds: int

    def __len__(self) -> int:
        return len(self.left)


def _index(token: str, path: Path, lineno: int) -> int:
    if not token.isdigit() or int(token) < 1:
        raise DataError(f"{path}:{lineno}: image index must be a positive integer, got {token!r}")
    return int(token)


def read_pairs(path: str | os.PathLike[str]) -> VerificationPairs:
    """Parse an LFW ``pairs.txt`` (header ``folds n``) or ``pairsDevTrain.txt`` (header ``n``)."""
    path = Path(path)
    try:
        lines = [(i, ln.split()) for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    except FileNotFoundError:
        raise DataError(f"LFW pairs file {path} not found") from None
    lines = [(i, f) for i, f in lines if f]
    if not lines or not 1 <= len(lines[0][1]) <= 2 or not all(t.isdigit() for t in lines[0][1]):
        raise DataError(f"{path}:1: expected a header 'folds pairs_per_class' (e.g. '10 300')")
    head = [int(t) for t in lines[0][1]]
    folds, n = (1, head[0]) if len(head) == 1 else head
    if folds < 1 or n < 1:
        raise DataError(f"{path}:1: header counts must be positive, got {' '.join(lines[0][1])}")
    body = lines[1:]
    if len(body) != folds * 2 * n:
        raise DataError(f"{path}: header promises {folds} folds x {2 * n} pairs = {folds * 2 * n} lines, "
                        f"found {len(body)}")
    left, right, same, fold = [], [], [], []
    for k, (lineno, f) in enumerate(body):
        matched = (k % (2 * n)) < n
        if matched:
            if len(f) != 3:
                raise DataError(f"{path}:{lineno}: expected a matched pair 'name i j', got {' '.join(f)!r}")
            a, b = (f[0], _index(f[1], path, lineno)), (f[0], _index(f[2], path, lineno))
        else:
            if len(f) != 4:
                raise DataError(f"{path}:{lineno}: expected a mismatched pair 'name1 i name2 j', got {' '.join(f)!r}")
            a, b = (f[0], _index(f[1], path, lineno)), (f[2], _index(f[3], path, lineno))
        left.append(a)
        right.append(b)
        same.append(matched)
        fold.append(k // (2 * n))
    return VerificationPairs(left, right, torch.tensor(same, dtype=torch.bool), torch.tensor(fold, dtype=torch.long),
                             folds)


def lfw_image_path(root: str | os.PathLike[str], name: str, idx: int) -> Path:
    """``root/name/name_{idx:04d}.jpg`` (the LFW file naming, also for the aligned variants)."""
    return Path(root) / name / f"{name}_{int(idx):04d}.jpg"


def pair_scores(emb1: torch.Tensor, emb2: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Similarity per pair, higher = more alike: cosine, or minus the Euclidean distance."""
    if metric not in METRICS:
        raise ConfigError(f"unknown verification metric {metric!r} (choose from {', '.join(METRICS)})")
    if emb1.shape != emb2.shape or emb1.dim() != 2:
        raise DataError(f"embeddings must both be [P,D], got {tuple(emb1.shape)} and {tuple(emb2.shape)}")
    a, b = emb1.double(), emb2.double()
    if metric == "cosine":
        return F.cosine_similarity(a, b, dim=1, eps=1e-12)
    return -(a - b).norm(dim=1)


def best_threshold(scores: torch.Tensor, is_same: torch.Tensor,
                   thresholds: torch.Tensor | None = None) -> tuple[float, float]:
    """``(threshold, accuracy)`` maximising accuracy of "same iff score > threshold".

    Without a grid the search is exact: every distinct cut of the sorted scores is tried, with the
    threshold at the midpoint of the two scores around the cut (``-inf``/``+inf`` at the ends). Ties
    go to the lowest threshold (the first maximum, like ``argmax`` over an ascending grid).
    """
    s, y = scores.double().reshape(-1), is_same.bool().reshape(-1)
    n = s.numel()
    if n == 0:
        raise DataError("cannot choose a threshold from zero pairs")
    if thresholds is not None:
        t = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1, 1)
        acc = ((s.unsqueeze(0) > t) == y.unsqueeze(0)).double().mean(dim=1)
        k = int(torch.argmax(acc))
        return float(t[k, 0]), float(acc[k])
    order = torch.argsort(s, stable=True)
    s, y = s[order], y[order]
    zero = torch.zeros(1, dtype=torch.long)
    neg_before = torch.cat([zero, torch.cumsum((~y).long(), 0)])  # cut k: s[:k] predicted "different"
    pos_before = torch.cat([zero, torch.cumsum(y.long(), 0)])
    correct = neg_before + (int(y.sum()) - pos_before)
    valid = torch.ones(n + 1, dtype=torch.bool)
    valid[1:n] = s[1:] > s[:-1]  # a cut between equal scores cannot be realised by a threshold
    correct = torch.where(valid, correct, torch.full_like(correct, -1))
    k = int(torch.argmax(correct))
    thr = float("-inf") if k == 0 else float("inf") if k == n else float((s[k - 1] + s[k]) / 2)
    return thr, float(correct[k]) / n


def kfold_accuracy(scores: torch.Tensor, is_same: torch.Tensor, folds: int | torch.Tensor = 10,
                   thresholds: torch.Tensor | None = None) -> dict[str, Any]:
    """Held-out accuracy per fold with the threshold chosen on the other folds.

    ``folds``: a number k (contiguous, equal blocks in pair order, as pairs.txt is laid out) or one
    fold id per pair. Returns ``mean``, ``std`` (population), ``thresholds`` and ``per_fold``.
    """
    s, y = scores.double().reshape(-1), torch.as_tensor(is_same).bool().reshape(-1)
    if s.numel() != y.numel():
        raise DataError(f"{s.numel()} scores but {y.numel()} ground-truth labels")
    if isinstance(folds, int):
        if not 2 <= folds <= s.numel():
            raise ConfigError(f"folds must be between 2 and the number of pairs ({s.numel()}), got {folds}")
        fold_ids = torch.arange(s.numel()) * folds // s.numel()
    else:
        fold_ids = torch.as_tensor(folds, dtype=torch.long).reshape(-1)
        if fold_ids.numel() != s.numel():
            raise DataError(f"{fold_ids.numel()} fold ids for {s.numel()} pairs")
    ids = torch.unique(fold_ids).tolist()
    if len(ids) < 2:
        raise ConfigError("k-fold verification needs at least 2 folds")
    per_fold, chosen = [], []
    for f in ids:
        test = fold_ids == f
        thr, _ = best_threshold(s[~test], y[~test], thresholds)
        per_fold.append(float(((s[test] > thr) == y[test]).double().mean()))
        chosen.append(thr)
    acc = torch.tensor(per_fold, dtype=torch.float64)
    return {"mean": float(acc.mean()), "std": float(acc.std(unbiased=False)), "thresholds": chosen,
            "per_fold": per_fold}


def verification_accuracy(emb1: torch.Tensor, emb2: torch.Tensor, is_same: torch.Tensor,
                          folds: int | torch.Tensor = 10, metric: str = "cosine",
                          thresholds: torch.Tensor | None = None) -> dict[str, Any]:
    """Standard k-fold verification accuracy of embedding pairs (see :func:`kfold_accuracy`)."""
    return kfold_accuracy(pair_scores(emb1, emb2, metric), is_same, folds, thresholds)


def make_embed_fn(backbone: torch.nn.Module, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  image_size: int | None = None, channels: int = 3, batch_size: int = 128,
                  device: str | torch.device = "cpu", flip: bool = False) -> Callable[[Sequence[str]], torch.Tensor]:
    """``paths -> features [N,D]`` for :func:`evaluate_lfw`.

    ``transform`` maps a uint8 batch to the network input (default: /255). ``flip=True``
    concatenates the features of the mirrored image, the usual SphereFace-style LFW protocol.
    """
    from .data.io import load_image

    def embed(paths: Sequence[str]) -> torch.Tensor:
        was_training = backbone.training
        backbone.eval()
        out = []
        try:
            with torch.no_grad():
                for s in range(0, len(paths), batch_size):
                    x = torch.stack([load_image(p, image_size, channels) for p in paths[s:s + batch_size]])
                    x = x.to(device)
                    x = transform(x) if transform is not None else x.float() / 255.0
                    f = backbone(x)
                    if flip:
                        f = torch.cat([f, backbone(torch.flip(x, dims=[3]))], dim=1)
                    out.append(f.float().cpu())
        finally:
            backbone.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, 0)

    return embed


def evaluate_lfw(embed: Callable[[Sequence[str]], torch.Tensor] | Mapping[str, torch.Tensor],
                 pairs_path: str | os.PathLike[str], root: str | os.PathLike[str], metric: str = "cosine",
                 thresholds: torch.Tensor | None = None) -> dict[str, Any]:
    """LFW verification from a feature function (called once on all distinct image paths) or a dict
    of features keyed by image path (absolute, or relative to ``root`` like ``name/name_0001.jpg``).

    Returns :func:`kfold_accuracy`'s dict plus ``num_pairs``.
    """
    pairs = read_pairs(pairs_path)
    keys = sorted(set(pairs.left) | set(pairs.right))
    where = {k: i for i, k in enumerate(keys)}
    paths = [lfw_image_path(root, n, i) for n, i in keys]
    if callable(embed):
        for p in paths:
            if not p.is_file():
                raise DataError(f"LFW image {p} (listed in {pairs_path}) not found")
        feats = torch.as_tensor(embed([str(p) for p in paths]))
        if feats.dim() != 2 or feats.shape[0] != len(paths):
            raise DataError(f"embed function returned shape {tuple(feats.shape)} for {len(paths)} images")
    else:
        rows = []
        for (n, i), p in zip(keys, paths):
            rel = f"{n}/{n}_{i:04d}.jpg"
            v = embed.get(str(p), embed.get(rel))
            if v is None:
                raise DataError(f"no feature for LFW image {rel} (looked up as {p} and {rel})")
            rows.append(torch.as_tensor(v).reshape(-1))
        feats = torch.stack(rows)
    left = torch.tensor([where[k] for k in pairs.left], dtype=torch.long)
    right = torch.tensor([where[k] for k in pairs.right], dtype=torch.long)
    result = verification_accuracy(feats[left], feats[right], pairs.is_same, pairs.fold, metric, thresholds)
    result["num_pairs"] = len(pairs)
    return result
