"""``evaluate``: few-shot accuracy of frozen features, reported the way the papers do.

Accuracy is in percent everywhere: each episode's accuracy is 100 * (correct queries /
queries); ``mean`` is the mean over episodes and ``ci95 = 1.96 * std / sqrt(episodes)`` with
the population std (``ddof=0``, ``np.std``'s default), as in mmfewshot's ``single_gpu_meta_test``
and the negative-margin repo's ``test_few_shot``.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..distributed import all_gather_cat, is_distributed, rank0_decides, shard_indices
from ..errors import ConfigError, DataError
from .episodes import as_label_tensor, episode_labels, sample_episodes
from .evaluators import EVALUATORS, FewShotMethod, create_evaluator

Z95 = 1.96


def as_feature_tensor(features: Any, device: torch.device | str | None = None) -> Tensor:
    """Features as a 2-D floating tensor (float16/bfloat16/ints promoted to float32)."""
    t = features.detach() if isinstance(features, Tensor) else torch.as_tensor(np.asarray(features))
    if t.dim() != 2:
        raise DataError(f"features must be a 2-D array [samples, dims], got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    if device is not None:
        t = t.to(device)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(1).nonzero()[0])
        raise DataError(f"features contain NaN/inf (first at sample {bad})")
    return t.contiguous()


def summarize(accuracies: Tensor | np.ndarray) -> tuple[float, float, float]:
    """``(mean, std, ci95)`` of per-episode accuracies (percent; std with ddof=0)."""
    acc = np.asarray(accuracies, dtype=np.float64)
    std = float(acc.std())
    return float(acc.mean()), std, Z95 * std / math.sqrt(acc.size)


def _method(method: str | FewShotMethod, kw: dict[str, Any]) -> tuple[str, FewShotMethod]:
    if isinstance(method, FewShotMethod):
        if kw:
            raise ConfigError(f"options {sorted(kw)} given with a method instance; set them on it")
        return method.name, method
    if not isinstance(method, str):
        raise ConfigError(f"method must be a name or a FewShotMethod, got {type(method).__name__}")
    return EVALUATORS.canonical(method), create_evaluator(method, **kw)


def evaluate(features: Any, labels: Any, *, way: int = 5, shot: int = 1, query: int = 15,
             episodes: int = 2000, method: str | FewShotMethod = "finetune", seed: int = 0,
             device: torch.device | str | None = None, class_names: Sequence[str] | None = None,
             groups: Any = None, shard: bool | None = None, **method_kw: Any) -> dict[str, Any]:
    """Meta-test ``features`` [N, D] with integer ``labels`` [N] on sampled episodes.

    Returns a plain dict: ``mean``, ``ci95``, ``std`` (percent), ``accuracies`` (list of
    per-episode percents), ``way``, ``shot``, ``query``, ``episodes``, ``method``, ``seed``,
    ``seconds`` (sampling + solving).  The same ``seed`` gives the same episodes for every
    method, so methods are compared on identical tasks.  ``device`` e.g. "cuda" moves the work.
    ``groups`` (one id per sample) draws each episode's classes from one group
    (see ``sample_episodes``); the result then has ``within: True``. ``shard``: split the episodes
    across the ranks of a torchrun process group (default: whenever one is initialised); every rank
    then returns the same result, equal to the single-process one episode by episode.
    """
    if isinstance(query, bool) or not isinstance(query, (int, np.integer)) or query < 1:
        raise ConfigError(f"query must be an integer >= 1, got {query!r}")
    if isinstance(way, (int, np.integer)) and not isinstance(way, bool) and way < 2:
        raise ConfigError(f"way must be >= 2 (a 1-way episode is always 100 % correct), got {way}")
    t0 = time.perf_counter()
    x = as_feature_tensor(features, device)
    y = as_label_tensor(labels)
    if y.numel() != x.shape[0]:
        raise DataError(f"{x.shape[0]} feature rows but {y.numel()} labels")
    name, solver = _method(method, method_kw)
    eps = sample_episodes(y, way, shot, query, episodes, seed, groups=groups, class_names=class_names)
    if is_distributed() if shard is None else shard:
        acc = _sharded_accuracies(solver, x, eps, way, shot, query, seed)
    else:
        scores = solver.scores(x, eps, shot, seed)
        truth = episode_labels(way, query, scores.device)
        acc = (scores.argmax(-1) == truth).to(torch.float64).mean(1).mul_(100).cpu()
    mean, std, ci95 = summarize(acc.numpy())
    return {"mean": mean, "ci95": ci95, "std": std, "accuracies": acc.tolist(), "way": way,
            "shot": shot, "query": query, "episodes": episodes, "method": name, "seed": seed,
            "within": groups is not None, "seconds": time.perf_counter() - t0}


def _sharded_accuracies(solver: FewShotMethod, x: Tensor, eps: Tensor, way: int, shot: int, query: int,
                        seed: int) -> Tensor:
    """Per-episode accuracies with the episodes split across ranks (under torchrun); every rank gets all.

    Every rank drew the same episodes from ``seed``; rank r solves a contiguous block of them
    through ``chunk_scores`` with their global episode indices (so each episode's seeded draws are
    the single-process ones), and the accuracies are gathered in episode order. A method without
    ``chunk_scores`` is solved on rank 0 and broadcast.
    """
    if not hasattr(solver, "chunk_scores") or not hasattr(solver, "chunk_size"):
        def whole() -> Tensor:
            scores = solver.scores(x, eps, shot, seed)
            return (scores.argmax(-1) == episode_labels(way, query, scores.device)).to(torch.float64).mean(1).mul_(100).cpu()
        return rank0_decides(whole)
    block, step = shard_indices(eps.shape[0]), solver.chunk_size
    truth = episode_labels(way, query, x.device)
    correct = []
    for s in range(block.start, block.stop, step):
        scores = solver.chunk_scores(x, eps[s:min(s + step, block.stop)], shot, seed, s)
        correct.append((scores.argmax(-1) == truth).to(torch.float64).mean(1).mul_(100).cpu())
    mine = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.float64)
    return all_gather_cat(mine)


def evaluate_many(features: Any, labels: Any, *, shots: Sequence[int] = (1, 5),
                  ways: Sequence[int] = (5,),
                  methods: Sequence[str | tuple[str, dict[str, Any]] | FewShotMethod] = ("finetune",),
                  query: int = 15, episodes: int = 2000, seed: int = 0,
                  device: torch.device | str | None = None,
                  class_names: Sequence[str] | None = None, groups: Any = None,
                  **common_kw: Any) -> list[dict[str, Any]]:
    """``evaluate`` for every method x way x shot; returns the result dicts in that order.

    ``methods`` entries are names, ``(name, options)`` pairs or method instances;
    ``common_kw`` (e.g. ``chunk_size``) go to every named method.  Each result gets a
    ``label`` (method name plus its options) for ``format_table``.
    """
    x = as_feature_tensor(features, device)
    out = []
    for entry in methods:
        own: dict[str, Any] = {}
        if isinstance(entry, tuple):
            name, own = entry[0], dict(entry[1])
            kw = {**common_kw, **own}
        else:
            name, kw = entry, (dict(common_kw) if isinstance(entry, str) else {})
        label = (name if isinstance(name, str) else name.name) + (
            "(" + ", ".join(f"{k}={v}" for k, v in own.items()) + ")" if own else "")
        for w in ways:
            for s in shots:
                res = evaluate(x, labels, way=w, shot=s, query=query, episodes=episodes,
                               method=name, seed=seed, class_names=class_names, groups=groups, **kw)
                res["label"] = label
                out.append(res)
    return out


def format_table(results: Sequence[dict[str, Any]], digits: int = 2) -> str:
    """Markdown table, one row per method label, one column per way/shot: ``mean ± ci95``."""
    cols: list[tuple[int, int]] = []
    rows: dict[str, dict[tuple[int, int], str]] = {}
    for r in results:
        key = (int(r["way"]), int(r["shot"]))
        if key not in cols:
            cols.append(key)
        label = str(r.get("label", r["method"]))
        rows.setdefault(label, {})[key] = f"{r['mean']:.{digits}f} ± {r['ci95']:.{digits}f}"
    head = "| method | " + " | ".join(f"{w}-way {s}-shot" for w, s in cols) + " |"
    rule = "|" + "---|" * (len(cols) + 1)
    body = ["| " + label + " | " + " | ".join(cells.get(c, "-") for c in cols) + " |"
            for label, cells in rows.items()]
    return "\n".join([head, rule, *body])


def method_kwargs_for_head(train_head: str, method: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Method options for features of a model trained with ``train_head``.

    The Negative-Margin protocol fine-tunes a fresh head of the training head's family with margin 0;
    the family is what the head declared at registration (``lowshot.heads.head_family``) and fixes the
    fine-tune head, bias and scale (``lowshot.heads.finetune_head_options``: the family's entry of
    ``FAMILY_FINETUNE``, e.g. neg_softmax -> linear without bias at scale 5, or the head's own
    ``finetune=`` metadata). An explicit ``head`` in ``options`` wins and gets no family defaults.
    """
    from ..heads import finetune_head_options
    kw = dict(options or {})
    if method == "finetune" and "head" not in kw:
        for key, value in finetune_head_options(train_head).items():
            kw.setdefault(key, value)
    return kw


def given(value: Any, default: Any) -> Any:
    """``value`` when one was given (0 stays 0, to be rejected by the evaluator), else ``default``: never ``x or default``."""
    return default if value is None else value


def default_eval_name(stem: str, split: str, method: str, *, way: int, shots: list[int], query: int,
                      episodes: int, seed: int, dataset: str | None = None,
                      options: dict[str, Any] | None = None, within: str | None = None) -> str:
    """``eval_<ckpt>_<split>_<method>_<protocol>.json``: another protocol never overwrites a result."""
    where = f"{dataset}-{split}" if dataset else split
    name = (f"eval_{stem}_{where}_{method}_{way}way_{'-'.join(map(str, shots))}shot_{query}q_{episodes}ep"
            f"_seed{seed}" + (f"_within-{within}" if within else ""))
    if options:
        digest = hashlib.sha1(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:8]
        name += f"_opt{digest}"
    return name + ".json"
