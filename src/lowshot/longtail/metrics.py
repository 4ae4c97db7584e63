"""Long-tail evaluation: overall, many / medium / few-shot and per-class accuracy.

Definitions follow Kang et al.'s official ``shot_acc``: a class is *many-shot* when it has more
than ``many`` (100) training images, *few-shot* with fewer than ``few`` (20), *medium* otherwise;
a group's accuracy is the mean of its classes' accuracies (not pooled over images), over the
classes that occur in the evaluation labels. Unlike the official code an empty group is NaN, not 0,
so "no few-shot class" never reads as "0 % on few-shot classes".

The 100 / 20 thresholds only make sense for datasets with hundreds of classes (ImageNet-LT,
Places-LT, iNaturalist). For small benchmarks (Fashion-MNIST-LT and CIFAR-10-LT: 10 classes with
5000..50 images, all "many" by the official rule) use ``thresholds_by_rank``: classes sorted by
training count, the top third is many, the bottom third few, the rest medium (10 classes -> 3/4/3).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..errors import ConfigError, DataError

GROUPS = ("many", "medium", "few")


def _counts(train_counts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    c = torch.as_tensor(train_counts).reshape(-1)
    if c.is_floating_point() and not torch.equal(c, c.round()):
        raise DataError("train_counts must be integer image counts per class")
    return c.long()


def _predictions(predictions: torch.Tensor) -> torch.Tensor:
    p = torch.as_tensor(predictions)
    if p.dim() == 2:  # logits / scores [N, C]
        p = p.argmax(dim=1)
    return p.reshape(-1).long()


def shot_groups(train_counts: Sequence[int] | torch.Tensor, many: float = 100, few: float = 20) -> list[str]:
    """Group of every class: ``"many"`` if count > many, else ``"few"`` if count < few, else
    ``"medium"`` (the official order of tests)."""
    return ["many" if n > many else "few" if n < few else "medium" for n in _counts(train_counts).tolist()]


def thresholds_by_rank(train_counts: Sequence[int] | torch.Tensor,
                       fractions: tuple[float, float] = (1 / 3, 1 / 3)) -> tuple[int, int]:
    """``(many, few)`` thresholds that split classes by training-count rank.

    The ``round(C * fractions[0])`` largest classes become many-shot and the
    ``round(C * fractions[1])`` smallest few-shot (C = 10 -> 3 / 4 / 3). Pass the result as
    ``shot_accuracy(..., many=m, few=f)``. Classes tied at a boundary count all fall into medium,
    so a group never holds a class with the same count as a medium class.
    """
    f_many, f_few = fractions
    if f_many < 0 or f_few < 0 or f_many + f_few > 1 + 1e-9:
        raise ConfigError(f"fractions must be >= 0 and sum to at most 1, got {fractions}")
    s = torch.sort(_counts(train_counts), descending=True).values.tolist()
    C = len(s)
    if C == 0:
        raise DataError("train_counts is empty")
    k_many = min(int(math.floor(C * f_many + 0.5)), C)
    k_few = min(int(math.floor(C * f_few + 0.5)), C - k_many)
    many_thr = s[k_many] if k_many < C else s[-1] - 1  # count > many_thr <=> among the top k_many
    few_thr = s[C - k_few - 1] if k_few < C else s[0] + 1  # count < few_thr <=> among the bottom k_few
    return int(many_thr), int(few_thr)


def _per_class(preds: torch.Tensor, labels: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    if preds.numel() != labels.numel():
        raise DataError(f"{preds.numel()} predictions but {labels.numel()} labels")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= C):
        raise DataError(f"label {int(labels.max())} out of range for {C} classes (length of train_counts)")
    test_n = torch.bincount(labels, minlength=C)
    correct = torch.bincount(labels[preds == labels], minlength=C)
    return test_n, correct


def shot_accuracy(predictions: torch.Tensor, labels: torch.Tensor, train_counts: Sequence[int] | torch.Tensor,
                  many: float = 100, few: float = 20) -> dict[str, Any]:
    """Accuracies in percent: ``all`` (over images), ``many``/``medium``/``few`` and ``class_mean``
    (means of per-class accuracies), ``per_class`` (list, NaN for classes absent from ``labels``)
    and ``groups`` (each class's group). ``predictions`` are class ids [N] or scores [N, C]."""
    preds, lab = _predictions(predictions), torch.as_tensor(labels).reshape(-1).long()
    counts = _counts(train_counts)
    C = int(counts.numel())
    test_n, correct = _per_class(preds, lab, C)
    per_class = torch.where(test_n > 0, 100.0 * correct.double() / test_n.clamp_min(1).double(),
                            torch.tensor(float("nan"), dtype=torch.float64))
    groups = shot_groups(counts, many, few)
    out: dict[str, Any] = {"all": 100.0 * float((preds == lab).double().mean()) if lab.numel() else math.nan}
    for g in GROUPS:
        vals = [float(per_class[i]) for i in range(C) if groups[i] == g and test_n[i] > 0]
        out[g] = sum(vals) / len(vals) if vals else math.nan
    present = per_class[test_n > 0]
    out["class_mean"] = float(present.mean()) if present.numel() else math.nan
    out["per_class"] = per_class.tolist()
    out["groups"] = groups
    return out


def per_class_table(predictions: torch.Tensor, labels: torch.Tensor, train_counts: Sequence[int] | torch.Tensor,
                    class_names: Sequence[str] | None = None, many: float = 100,
                    few: float = 20) -> list[dict[str, Any]]:
    """One row per class (sorted by training count, head first): name, counts, accuracy, group."""
    preds, lab = _predictions(predictions), torch.as_tensor(labels).reshape(-1).long()
    counts = _counts(train_counts)
    C = int(counts.numel())
    if class_names is not None and len(class_names) != C:
        raise DataError(f"{len(class_names)} class names for {C} classes")
    test_n, correct = _per_class(preds, lab, C)
    groups = shot_groups(counts, many, few)
    rows = [{"class": i, "name": class_names[i] if class_names is not None else str(i),
             "train_count": int(counts[i]), "test_count": int(test_n[i]), "correct": int(correct[i]),
             "accuracy": 100.0 * int(correct[i]) / int(test_n[i]) if test_n[i] > 0 else math.nan,
             "group": groups[i]} for i in range(C)]
    return sorted(rows, key=lambda r: (-r["train_count"], r["class"]))


def format_per_class_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of ``per_class_table`` rows (for logs and reports)."""
    width = max([len("class")] + [len(str(r["name"])) for r in rows])
    lines = [f"{'class':<{width}}  {'train':>7}  {'test':>6}  {'acc %':>6}  group"]
    for r in rows:
        acc = "-" if math.isnan(r["accuracy"]) else f"{r['accuracy']:.2f}"
        lines.append(f"{r['name']:<{width}}  {r['train_count']:>7}  {r['test_count']:>6}  {acc:>6}  {r['group']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checkpoint metrics and tables

OFFICIAL_THRESHOLDS = (100, 20)
THRESHOLD_RULES = ("auto", "official", "rank")


def shot_thresholds(train_counts: list[int], rule: str = "auto") -> dict[str, Any]:
    """Many/few thresholds and the rule used. ``auto``: the official >100 / <20 when every group
    gets a class, else by rank (top / bottom third of classes by training count)."""
    if rule not in THRESHOLD_RULES:
        raise ConfigError(f"thresholds rule must be one of {', '.join(THRESHOLD_RULES)}, got {rule!r}")
    many, few = OFFICIAL_THRESHOLDS
    groups = set(shot_groups(train_counts, many, few))
    if rule == "rank" or (rule == "auto" and groups != set(GROUPS)):
        many, few = thresholds_by_rank(train_counts)
        used = "rank"
        text = f"by rank (top/bottom third of classes): many > {many}, few < {few} training images"
    else:
        used = "official"
        text = f"official: many > {many}, few < {few} training images"
    return {"rule": used, "requested": rule, "many": many, "few": few, "description": text}


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor, train_counts: list[int],
                    class_names: list[str], thresholds: dict[str, Any]) -> dict[str, Any]:
    """Overall, class-mean, many/medium/few accuracies (percent) and the per-class rows."""
    res = shot_accuracy(logits, labels, train_counts, thresholds["many"], thresholds["few"])
    n_test = torch.bincount(torch.as_tensor(labels).long(), minlength=len(train_counts)).tolist()
    rows = [{"class": i, "name": class_names[i], "train_count": int(train_counts[i]), "test_count": int(n_test[i]),
             "accuracy": res["per_class"][i], "group": res["groups"][i]} for i in range(len(train_counts))]
    rows.sort(key=lambda r: (-r["train_count"], r["class"]))
    return {**{k: res[k] for k in ("all", "class_mean", *GROUPS)}, "per_class": rows}


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def format_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """``[(label, metrics), ...]`` -> overall / class-mean / many / medium / few columns."""
    width = max([len("method")] + [len(label) for label, _ in rows])
    lines = [f"{'method':<{width}}  {'overall':>7}  {'cls-mean':>8}  {'many':>6}  {'medium':>6}  {'few':>6}"]
    for label, m in rows:
        lines.append(f"{label:<{width}}  {_pct(m['all']):>7}  {_pct(m['class_mean']):>8}  {_pct(m['many']):>6}  "
                     f"{_pct(m['medium']):>6}  {_pct(m['few']):>6}")
    return "\n".join(lines)


def format_results(results: dict[str, Any]) -> str:
    """Summary table (joint vs decoupled) and per-class accuracies, as printed by ``decouple``."""
    thr = results["thresholds"]
    title = (f"decouple {results['method']} on {results['dataset']} {results['test_split']} "
             f"(source {results['source']})")
    head = [title, f"groups: {thr['description']}"]
    info = results.get("info") or {}
    if "tau" in info:
        head.append(f"tau = {info['tau']} ({info.get('tau_source')})")
    table = format_table([(f"joint ({results['joint_head']})", results["joint"]),
                          (results["method"], results["metrics"])])
    width = max(len("class"), *(len(str(r["name"])) for r in results["metrics"]["per_class"]))
    per = [f"{'class':<{width}}  {'train':>6}  {'group':<6}  {'joint':>6}  {results['method']:>8}"]
    joint_acc = {r["class"]: r["accuracy"] for r in results["joint"]["per_class"]}
    for r in results["metrics"]["per_class"]:
        per.append(f"{r['name']:<{width}}  {r['train_count']:>6}  {r['group']:<6}  {_pct(joint_acc[r['class']]):>6}  "
                   f"{_pct(r['accuracy']):>8}")
    return "\n".join(head + [table, ""] + per + [f"wrote {results['checkpoint']} (+ .json)"])
