"""Experiment: the fine-tune solver as one fused CPU kernel (numba) vs lowshot's PyTorch solver.

Not a test, and numba is not a lowshot dependency (``pip install numba`` to run this).  Issue 13
asks for the 5-way 5-shot 600-step fine-tune of 2,000 episodes in under 1 s on a 2-core CPU.
lowshot's solver (``finetune._solve``) runs the SGD trajectory of every episode at once with
one PyTorch op per quantity per step; at this size each op streams ~1 MB, so about 17 such
passes plus ~60 op dispatches per step bound it (~1 s for 600 steps).  This script measures
what fusing every step into one compiled loop nest would buy, on the *same* solver inputs
(captured from ``finetune_scores``), and what the compilation costs:

* solver time, PyTorch vs fused kernel, at 1 and 2 threads (best of ``--repeats``);
* max |difference| of the final head coordinates (the kernel follows the same update order);
* the kernel's cold JIT compile and its cached load, each in a fresh process with its own
  ``NUMBA_CACHE_DIR``: the price every new install / cache directory pays once.

    pip install numba && python benchmarks/finetune_fused_kernel.py
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from lowshot.fewshot import finetune as ft
from lowshot.fewshot.episodes import sample_episodes

try:
    import numba as nb
except ImportError:  # pragma: no cover - depends on the machine
    nb = None


def _kernel_source() -> str:
    return r'''
import math
import numpy as np
import numba as nb


@nb.njit(parallel=True, cache=True, boundscheck=False)
def solve(A, bias, coords, perms, shot, steps, bsz, lr, mom, damp, wd, scale, cosine, use_bias, block):
    """finetune._solve's update, fused: blocks of episodes (unit stride) run all steps in cache."""
    R1, way, E = A.shape
    r, n, _ = coords.shape
    one, zero = np.float32(1.0), np.float32(0.0)
    per_pass = (n + bsz - 1) // bsz
    for blk in nb.prange((E + block - 1) // block):
        e0 = blk * block
        e1 = min(E, e0 + block)
        EB = e1 - e0
        a = np.ascontiguousarray(A[:, :, e0:e1])
        bi = np.ascontiguousarray(bias[:, e0:e1])
        cl = np.ascontiguousarray(coords[:, :, e0:e1])
        buf = np.zeros((R1, way, EB), np.float32)
        bbuf = np.zeros((way, EB), np.float32)
        xb = np.empty((r, bsz, EB), np.float32)
        num = np.empty((bsz, way, EB), np.float32)
        g = np.empty((bsz, way, EB), np.float32)
        y = np.empty((bsz, way, EB), np.float32)
        inv = np.empty((way, EB), np.float32)
        coef = np.empty((way, EB), np.float32)
        dot = np.empty((way, EB), np.float32)
        idx = np.empty((bsz, EB), np.int64)
        mx = np.empty(EB, np.float32)
        sm = np.empty(EB, np.float32)
        for t in range(steps):
            p = t // per_pass
            lo = (t - p * per_pass) * bsz
            b = min(n, lo + bsz) - lo
            first = t == 0
            c = one if (first or mom == zero) else one - damp
            m = zero if first else mom
            for i in range(b):                       # the batch: coordinates and one-hot labels
                for k in range(EB):
                    idx[i, k] = perms[e0 + k, p, lo + i]
                for cc in range(way):
                    for k in range(EB):
                        y[i, cc, k] = one if idx[i, k] // shot == cc else zero
                for q in range(r):
                    for k in range(EB):
                        xb[q, i, k] = cl[q, idx[i, k], k]
            for i in range(b):                       # w_c . x_i
                for cc in range(way):
                    for k in range(EB):
                        num[i, cc, k] = a[0, cc, k] * xb[0, i, k]
                    for q in range(1, r):
                        for k in range(EB):
                            num[i, cc, k] += a[q, cc, k] * xb[q, i, k]
            if cosine:
                for cc in range(way):
                    for k in range(EB):
                        inv[cc, k] = a[0, cc, k] * a[0, cc, k]
                    for q in range(1, R1):
                        for k in range(EB):
                            inv[cc, k] += a[q, cc, k] * a[q, cc, k]
                    for k in range(EB):
                        inv[cc, k] = one / np.sqrt(inv[cc, k])
                for i in range(b):
                    for cc in range(way):
                        for k in range(EB):
                            g[i, cc, k] = num[i, cc, k] * (inv[cc, k] * scale)
            else:
                for i in range(b):
                    for cc in range(way):
                        for k in range(EB):
                            g[i, cc, k] = ((num[i, cc, k] + bi[cc, k]) if use_bias else num[i, cc, k]) * scale
            gs = np.float32(scale / b)
            for i in range(b):                       # softmax - one-hot, batch mean
                for k in range(EB):
                    mx[k] = g[i, 0, k]
                for cc in range(1, way):
                    for k in range(EB):
                        mx[k] = max(mx[k], g[i, cc, k])
                for cc in range(way):
                    for k in range(EB):
                        g[i, cc, k] = np.exp(g[i, cc, k] - mx[k])
                for k in range(EB):
                    sm[k] = g[i, 0, k]
                for cc in range(1, way):
                    for k in range(EB):
                        sm[k] += g[i, cc, k]
                for cc in range(way):
                    for k in range(EB):
                        g[i, cc, k] = (g[i, cc, k] / sm[k] - y[i, cc, k]) * gs
            if cosine:                               # through the weight normalisation
                for cc in range(way):
                    for k in range(EB):
                        dot[cc, k] = g[0, cc, k] * num[0, cc, k]
                    for i in range(1, b):
                        for k in range(EB):
                            dot[cc, k] += g[i, cc, k] * num[i, cc, k]
                    for k in range(EB):
                        iv = inv[cc, k]
                        coef[cc, k] = (wd - dot[cc, k] * iv * iv * iv) * c
                for i in range(b):
                    for cc in range(way):
                        for k in range(EB):
                            g[i, cc, k] *= inv[cc, k] * c
            else:
                for cc in range(way):
                    for k in range(EB):
                        coef[cc, k] = wd * c
                if use_bias:
                    for cc in range(way):
                        for k in range(EB):
                            dot[cc, k] = g[0, cc, k]
                        for i in range(1, b):
                            for k in range(EB):
                                dot[cc, k] += g[i, cc, k]
                        for k in range(EB):
                            gb = (dot[cc, k] + wd * bi[cc, k]) * c
                            if not first:
                                gb += m * bbuf[cc, k]
                            bbuf[cc, k] = gb
                            bi[cc, k] -= lr * gb
                for i in range(b):
                    for cc in range(way):
                        for k in range(EB):
                            g[i, cc, k] *= c
            for q in range(R1):                      # momentum buffer and step
                for cc in range(way):
                    for k in range(EB):
                        buf[q, cc, k] *= m
                    if q < r:
                        for i in range(b):
                            for k in range(EB):
                                buf[q, cc, k] += xb[q, i, k] * g[i, cc, k]
                    for k in range(EB):
                        u = buf[q, cc, k] + a[q, cc, k] * coef[cc, k]
                        buf[q, cc, k] = u
                        a[q, cc, k] -= lr * u
        A[:, :, e0:e1] = a
        bias[:, e0:e1] = bi
'''


def capture_solver_inputs(way: int, shot: int, episodes: int, dim: int, seed: int) -> tuple:
    """The exact arguments ``finetune_scores`` hands its solver, for synthetic class features."""
    gen = torch.Generator().manual_seed(seed)
    classes, per_class = 40, 300
    means = torch.randn(classes, dim, generator=gen)
    feats = (means.repeat_interleave(per_class, 0) + 1.5 * torch.randn(classes * per_class, dim, generator=gen)).relu_()
    labels = torch.arange(classes).repeat_interleave(per_class)
    eps = sample_episodes(labels, way, shot, 15, episodes, seed)
    captured: dict = {}
    original = ft._solve

    def grab(*args):
        captured["args"] = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        original(*args)
    ft._solve = grab
    try:
        ft.finetune_scores(ft.FinetuneConfig(), feats, eps, shot, seed)
    finally:
        ft._solve = original
    return captured["args"]


def _best(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _compile_times(module_dir: str, inputs_file: str) -> tuple[float, float]:
    """Cold compile and cached load of the kernel, each in a fresh process, own cache dir."""
    code = (f"import sys, time, torch, numpy as np; sys.path.insert(0, {module_dir!r}); "
            "t = time.perf_counter(); import fused_solve as m; "
            f"a = torch.load({inputs_file!r}, weights_only=False); cfg, A, b, xc, perms, shot, steps = a; "
            "f = np.float32; m.solve(A[..., :8].contiguous().numpy(), b[:, :8].contiguous().numpy(), "
            "xc[..., :8].contiguous().numpy(), perms[:8].numpy(), shot, 2, 4, f(.01), f(.9), f(.9), "
            "f(.001), f(5), True, False, 8); print(time.perf_counter() - t)")
    out = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for _ in range(2):
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            out.append(float(res.stdout.strip().splitlines()[-1]))
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=2000)
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--shot", type=int, default=5)
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--block", type=int, default=64, help="episodes per kernel block")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if nb is None:
        sys.exit("this experiment needs numba (pip install numba); lowshot itself does not")
    inputs = capture_solver_inputs(args.way, args.shot, args.episodes, args.dim, 0)
    cfg, A, bias, xc, perms, shot, steps = inputs
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "fused_solve.py"), "w") as fh:
            fh.write(_kernel_source())
        inputs_file = os.path.join(tmp, "inputs.pt")
        torch.save(inputs, inputs_file)
        cold, cached = _compile_times(tmp, inputs_file)
        sys.path.insert(0, tmp)
        os.environ["NUMBA_CACHE_DIR"] = os.path.join(tmp, "cache")
        import fused_solve  # type: ignore[import-not-found]

        f32 = np.float32

        def fused():
            a, b = A.clone(), bias.clone()
            fused_solve.solve(a.numpy(), b.numpy(), xc.numpy(), perms.numpy(), shot, steps, cfg.batch_size,
                              f32(cfg.lr), f32(cfg.momentum), f32(cfg.dampening), f32(cfg.weight_decay),
                              f32(cfg.scale), cfg.head == "cosine", cfg.has_bias, args.block)
            return a

        def torch_solver():
            a, b = A.clone(), bias.clone()
            ft._solve(cfg, a, b, xc, perms, shot, steps)
            return a

        diff = (fused() - torch_solver()).abs().max().item()
        print(f"{args.way}-way {args.shot}-shot, {steps} steps, {args.episodes} episodes, dim {args.dim}; "
              f"torch {torch.__version__}, numba {nb.__version__}, block {args.block}")
        print("| solver | threads | seconds |\n|---|---|---|")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            nb.set_num_threads(min(threads, nb.config.NUMBA_NUM_THREADS))
            print(f"| lowshot (PyTorch ops) | {threads} | {_best(torch_solver, args.repeats):.3f} |")
            print(f"| fused kernel (numba) | {threads} | {_best(fused, args.repeats):.3f} |")
        print(f"\nmax |coordinate difference| fused vs PyTorch: {diff:.1e}")
        print(f"fused kernel JIT: cold compile + first call {cold:.1f} s; cached load + first call {cached:.2f} s")


if __name__ == "__main__":
    main()
