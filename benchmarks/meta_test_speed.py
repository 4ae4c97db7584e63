"""Batched few-shot evaluators vs their per-episode references, way x shot grid, one run.

Not a test.  For every method (finetune, logreg, ncm) and every (way, shot) it times
``lowshot``'s batched evaluator on all ``--episodes`` episodes (best of ``--repeats``) and the
per-episode reference on the first ``--ref-episodes`` of the *same* episodes, scaled linearly to
all episodes (the per-episode cost is constant), and checks on that subset that predictions
agree (asserted):

* finetune: the per-episode ``torch.optim.SGD`` loop (``Finetune(batched=False)``, the same
  initial weights and shuffles), mmfewshot protocol (600 steps 5-shot, 150 steps 1-shot);
* logreg: a scikit-learn ``LogisticRegression`` loop on the same L2-normalised supports at
  ``tol=1e-10`` (decision values must agree within 1e-4); the time of the same loop at
  scikit-learn's default ``tol=1e-4`` is printed too;
* ncm: SimpleShot's per-episode NumPy code (CL2N: subtract the mean feature, L2-normalise,
  class means, ``np.linalg.norm`` of the broadcast differences).

Both sides run with the same thread count (``--threads``, default 1; BLAS threads of NumPy /
scikit-learn limited with threadpoolctl).  Peak memory is the resident-set growth during the
batched call, sampled every millisecond.

    python benchmarks/meta_test_speed.py                  # full grid, synthetic 640-d features
    python benchmarks/meta_test_speed.py --quick          # smoke run (seconds)
    python benchmarks/meta_test_speed.py --features feats.npz  # keys: features [N, D], labels [N]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import threading
import time
import warnings
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch

from lowshot.fewshot import Finetune, LogisticRegression, NearestClassMean, episode_labels, sample_episodes


def synthetic(classes: int, per_class: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nonnegative "ReLU-like" features: sparse class prototypes plus per-sample noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g).clamp_min(0) * 0.4
    noise = torch.randn(classes * per_class, dim, generator=g)
    x = (means.repeat_interleave(per_class, 0) + noise).clamp_min(0)
    return x, torch.arange(classes).repeat_interleave(per_class)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    """Return freed heap memory to the OS so that RSS growth shows a call's own peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def timed(fn, repeats: int = 1) -> tuple[float, float, object]:
    """(best wall seconds, peak RSS growth in bytes over all runs, result of the best run)."""
    best, peak, out = float("inf"), 0, None
    for _ in range(repeats):
        gc.collect()
        _trim()
        base, top, stop = _rss(), [0], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                top[0] = max(top[0], _rss())
                time.sleep(0.001)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        t = time.perf_counter()
        res = fn()
        t = time.perf_counter() - t
        stop.set()
        th.join()
        peak = max(peak, max(top[0], _rss()) - base)
        if t < best:
            best, out = t, res
    return best, peak, out


def sklearn_loop(xn: np.ndarray, eps: np.ndarray, shot: int, tol: float) -> np.ndarray:
    """scikit-learn LogisticRegression per episode on normalised rows: decision values."""
    from sklearn.linear_model import LogisticRegression as SkLR
    way = eps.shape[1]
    lab = np.repeat(np.arange(way), shot)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ep in eps:
            clf = SkLR(C=1.0, tol=tol, max_iter=100 if tol >= 1e-4 else 10000)
            clf.fit(xn[ep[:, :shot].ravel()], lab)
            out.append(clf.decision_function(xn[ep[:, shot:].ravel()]))
    return np.stack(out)


def simpleshot_loop(x: np.ndarray, eps: np.ndarray, shot: int, centre: np.ndarray) -> np.ndarray:
    """SimpleShot's per-episode CL2N nearest-centroid code; returns -distance^2 per class."""
    way, dim = eps.shape[1], x.shape[1]
    out = []
    for ep in eps:
        sup = x[ep[:, :shot].ravel()] - centre
        qry = x[ep[:, shot:].ravel()] - centre
        sup = sup / np.linalg.norm(sup, 2, 1)[:, None]
        qry = qry / np.linalg.norm(qry, 2, 1)[:, None]
        proto = sup.reshape(way, shot, dim).mean(1)
        dist = np.linalg.norm(proto[:, None, :] - qry, 2, axis=-1)          # [way, queries]
        out.append(-(dist.T ** 2))
    return np.stack(out)


def gather_floor(x: torch.Tensor, eps: torch.Tensor, block_rows: int = 1024) -> None:
    """Only the memory traffic NCM cannot avoid: every episode's rows gathered once, into a
    reused buffer (the fastest block size measured on this machine), nothing computed."""
    flat = eps.reshape(-1)
    buf = x.new_empty(block_rows, x.shape[1])
    for s in range(0, flat.numel(), block_rows):
        idx = flat[s:s + block_rows]
        torch.index_select(x, 0, idx, out=buf[:idx.numel()])


def centred(a: np.ndarray) -> np.ndarray:
    return a - a.mean(-1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", help=".npz with 'features' and 'labels' (default: synthetic)")
    ap.add_argument("--episodes", type=int, default=2000)
    ap.add_argument("--ref-episodes", type=int, default=100, help="episodes the per-episode references run")
    ap.add_argument("--finetune-ref-episodes", type=int, default=10,
                    help="episodes of the (slow) per-episode SGD loop")
    ap.add_argument("--ways", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--methods", nargs="+", default=["finetune", "logreg", "ncm"])
    ap.add_argument("--query", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="threads for both sides (torch and BLAS)")
    ap.add_argument("--repeats", type=int, default=3, help="batched runs; the fastest is reported")
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 100 episodes, 5-way, few references")
    args = ap.parse_args()
    if args.quick:
        args.episodes, args.ref_episodes, args.finetune_ref_episodes = 100, 5, 2
        args.ways, args.repeats = [5], 1

    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(args.threads)
    except ImportError:
        limits = nullcontext()
    torch.set_num_threads(args.threads)
    if args.features:
        data = np.load(args.features)
        x = torch.as_tensor(data["features"]).float()
        y = torch.as_tensor(data["labels"]).long()
        source = args.features
    else:
        x, y = synthetic(40, 300, args.dim, args.seed)
        source = f"synthetic: 40 classes x 300, {args.dim}-d, nonnegative"
    x_np = x.numpy()
    xn_np = torch.nn.functional.normalize(x.double(), dim=-1).numpy()
    centre = x.mean(0)
    load0 = os.getloadavg()
    print(f"features: {source}; {x.shape[0]} x {x.shape[1]} float32; torch {torch.__version__}; "
          f"threads {args.threads} (both sides); episodes {args.episodes}; query {args.query}; "
          f"load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    rows, ft5 = [], None
    with limits:
        for method in args.methods:
            for way in args.ways:
                for shot in args.shots:
                    eps = sample_episodes(y, way, shot, args.query, args.episodes, seed=args.seed)
                    truth = episode_labels(way, args.query)
                    k = args.finetune_ref_episodes if method == "finetune" else args.ref_episodes
                    k = min(k, args.episodes)
                    extra = ""
                    if method == "finetune":
                        fast = Finetune()
                        steps = fast.config.num_steps(way * shot, shot)
                        ref_fn = partial(Finetune(batched=False).scores, x, eps[:k], shot, args.seed)
                    elif method == "logreg":
                        fast = LogisticRegression()
                        ref_fn = partial(sklearn_loop, xn_np, eps[:k].numpy(), shot, 1e-10)
                    else:
                        fast = NearestClassMean(metric="l2", center_vector=centre, normalize=True)
                        ref_fn = partial(simpleshot_loop, x_np, eps[:k].numpy(), shot, centre.numpy())
                    fast.scores(x, eps[:32], shot, args.seed)                   # warm-up
                    bt, peak, scores = timed(partial(fast.scores, x, eps, shot, args.seed), args.repeats)
                    warm = {"finetune": partial(Finetune(batched=False).scores, x, eps[:1], shot, args.seed),
                            "logreg": partial(sklearn_loop, xn_np, eps[:1].numpy(), shot, 1e-10),
                            "ncm": partial(simpleshot_loop, x_np, eps[:1].numpy(), shot, centre.numpy())}
                    warm[method]()                                              # imports, first-call costs
                    rt, _, ref = timed(ref_fn)
                    ref = torch.as_tensor(np.asarray(ref)).to(torch.float64)
                    sub = scores[:k].to(torch.float64)
                    if method == "logreg":
                        diff = float(np.abs(centred(sub.numpy()) - centred(ref.numpy())).max())
                        assert diff < 1e-4, f"logreg {way}w{shot}s: decision values differ by {diff:.2e}"
                        dt, _, _ = timed(partial(sklearn_loop, xn_np, eps[:k].numpy(), shot, 1e-4))
                        extra = f"sklearn tol=1e-4: {dt / k * 1e3:.2f} ms/ep ({dt / k * args.episodes / bt:.0f}x)"
                    else:
                        diff = float((sub - ref).abs().max())
                    if method == "ncm":
                        ft_, _, _ = timed(partial(gather_floor, x, eps), args.repeats)
                        extra = (f"row gathers alone: {ft_:.3f} s ({rt / k * args.episodes / ft_:.0f}x the reference: "
                                 f"the most any method reading the rows can reach)")
                    same = int((sub.argmax(-1) == ref.argmax(-1)).sum())
                    total = ref.shape[0] * ref.shape[1]
                    # A disagreement is only allowed at a near-tie of the reference.
                    top2 = ref.topk(2, -1).values
                    flips = (sub.argmax(-1) != ref.argmax(-1)) & ((top2[..., 0] - top2[..., 1]) > 1e-4)
                    assert not bool(flips.any()), f"{method} {way}w{shot}s: {int(flips.sum())} predictions differ"
                    acc = float((scores.argmax(-1) == truth).double().mean() * 100)
                    ref_all = rt / k * args.episodes
                    name = method + (f" ({steps} steps)" if method == "finetune" else "")
                    rows.append((name, way, shot, bt, rt / k * 1e3, k, ref_all, ref_all / bt, same, total,
                                 diff, peak / 2 ** 20, acc, extra))
                    if method == "finetune" and way == 5 and shot == 5:
                        ft5 = bt
                    print(f"  {name} {way}-way {shot}-shot: {bt:.3f} s vs {ref_all:.1f} s "
                          f"({ref_all / bt:.0f}x) {extra}", flush=True)
    load1 = os.getloadavg()
    print()
    print("| method | setting | lowshot s | reference ms/episode (timed on) | reference s (scaled) | "
          "speed-up | same predictions | max score diff | peak MB | acc % | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, way, shot, bt, per, k, ra, ratio, same, total, diff, peak, acc, extra) in rows:
        print(f"| {name} | {way}-way {shot}-shot | {bt:.3f} | {per:.2f} ({k} eps) | {ra:.1f} | {ratio:.0f}x | "
              f"{same}/{total} | {diff:.1e} | {peak:.0f} | {acc:.2f} | {extra} |")
    print(f"\nload average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; "
          f"logreg max score diff: centred decision values vs scikit-learn tol=1e-10.")
    if ft5 is not None:
        print(f"5-way 5-shot 600-step fine-tune of {args.episodes} episodes: {ft5:.3f} s "
              f"(target < 1 s for 2000: {'met' if ft5 < 1 and args.episodes >= 2000 else 'see above'})")


if __name__ == "__main__":
    main()
