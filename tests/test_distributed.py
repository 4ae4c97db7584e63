"""Multi-process training on CPU (Gloo): helpers in one process, then real ``torchrun`` launches.

Equivalence claim tested here: with SyncBatchNorm (``train.sync_bn=true``) and augmentation off, a
2-process run with global batch B takes the same optimisation step as a 1-process run with batch B.
The processes only sum in a different order, so after ONE step the weights agree to float32
rounding (measured: 1.7e-5 of the update's norm; per-rank BatchNorm statistics, i.e. the bug we
guard against, give 0.30). Over whole epochs this rounding noise is amplified by the training
dynamics themselves (a 1e-7 weight perturbation in a single process grows to ~5e-4 in five steps:
max-pool/ReLU switches), so full runs are compared with loose, stated tolerances only. Resuming a
2-process run is exact, augmentation included (per-rank RNG streams are checkpointed).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lowshot.checkpoint import load_checkpoint
from lowshot.config import load_config
from lowshot.distributed import (CrossRankBatchNorm, all_gather_cat, all_reduce, convert_sync_batchnorm,
                                 rank0_decides, rank0_first, shard_indices)
from lowshot.errors import ConfigError
from lowshot.train import FiniteGuard, TrainingDiverged, rank_seed, train
from lowshot.fileio import read_jsonl

from conftest import ROOT, needs_fmnist

CFG = ROOT / "configs" / "fashion_mnist" / "conv4_neg_cosine.yaml"
# 5 base classes x 40 images = 200 images: 6 steps of 32 per epoch.
BASE = ["data.options={max_per_class: 40}", "train.batch_size=32", "train.progress=false", "val.every=0"]
NO_AUG = ["augment.crop_scale=null", "augment.flip=false"]


def quiet(_msg):
    pass


# ----------------------------------------------------------------------------- single-process helpers

def test_shard_indices_are_contiguous_balanced_and_cover_everything():
    for n, w in [(10, 3), (7, 2), (1, 4), (0, 2), (100, 1)]:
        blocks = [shard_indices(n, r, w) for r in range(w)]
        assert [i for b in blocks for i in b] == list(range(n))  # rank order = dataset order
        sizes = [len(b) for b in blocks]
        assert max(sizes) - min(sizes) <= 1
    assert list(shard_indices(10, 1, 3)) == [3, 4, 5]
    with pytest.raises(ConfigError):
        shard_indices(5, 2, 2)


def test_helpers_are_identities_without_a_process_group():
    t = torch.arange(6.0).view(3, 2)
    assert all_reduce(t) is t and all_gather_cat(t) is t
    assert rank0_decides(lambda: 41 + 1) == 42 and rank0_first(lambda: "x") == "x"
    with pytest.raises(ConfigError, match="boom"):
        rank0_decides(lambda: (_ for _ in ()).throw(ConfigError("boom")))


def test_cross_rank_batchnorm_is_plain_batchnorm_in_one_process():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(4 * 4 * 4))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].running_mean.uniform_(-1, 1)
    ref = nn.Sequential(*[m for m in net])  # same modules, converted copy below
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    conv = convert_sync_batchnorm(nn.Sequential(*[m for m in net]), torch.device("cpu"))
    assert isinstance(conv[1], CrossRankBatchNorm) and isinstance(conv[4], CrossRankBatchNorm)
    assert conv.state_dict().keys() == state.keys()  # checkpoints load into plain models
    for k, v in conv.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(5, 2, 6, 6)
    out = conv(x)
    ref.load_state_dict(state)
    assert torch.allclose(out, ref(x), atol=1e-6)


def test_rank_seeds_differ_per_rank_and_repeat():
    seeds = {rank_seed(0, r) for r in range(8)}
    assert len(seeds) == 8 and rank_seed(3, 1, 10) == rank_seed(3, 1, 10) != rank_seed(3, 1, 11)
    assert rank_seed(0, 1) != rank_seed(1, 0)


def test_finite_guard_names_the_first_bad_step(tmp_path):
    guard = FiniteGuard(tmp_path)
    for step, value in enumerate([1.0, 2.0, float("nan"), float("inf")], start=1):
        guard.record(torch.tensor(value), 1, step)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 1, step 3"):
        guard.check()
    ok = FiniteGuard(tmp_path)
    ok.record(torch.tensor(0.5), 2, 7)
    ok.check()
    assert len(ok) == 0


# ----------------------------------------------------------------------------- torchrun launches

WORKER = textwrap.dedent('''
    """Runs under torchrun: several trainings and helper checks in one process group."""
    import json, sys
    import torch
    from lowshot import distributed as D
    from lowshot.config import load_config
    from lowshot.data import build_dataset
    from lowshot.data.transforms import build_transform
    from lowshot.errors import ConfigError
    from lowshot.inference import extract_features, extract_features_distributed
    from lowshot.models import build_model
    from lowshot.train import train

    cfg_path, out, base, no_aug = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    ctx = D.init_distributed("cpu")  # train() reuses this group
    res = {"rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend}
    quiet = lambda _m: None

    # one optimisation step, SyncBN, no augmentation (compared with a 1-process step by the test)
    cfg = load_config(cfg_path, base + no_aug + ["train.sync_bn=true", "train.epochs=1",
                                                 "train.max_steps_per_epoch=1"])
    train(cfg, out + "/one_step", overwrite=True, log=quiet)

    # with augmentation: full run vs interrupted at step 7 (mid epoch 2) + resumed
    cfg = load_config(cfg_path, base + ["train.sync_bn=true", "train.epochs=2", "train.checkpoint_every=4"])
    res["full"] = train(cfg, out + "/full", overwrite=True, log=quiet)
    res["part"] = train(cfg, out + "/part", overwrite=True, log=quiet, overrides=["train.max_steps=7"])
    res["resumed"] = train(cfg, out + "/part", resume=True, log=quiet)

    # a global batch the processes cannot share stops every rank with the same error
    try:
        train(load_config(cfg_path, base + ["train.batch_size=33"]), out + "/bad", overwrite=True, log=quiet)
    except ConfigError as e:
        res["batch_error"] = str(e)

    # rank 0's user error reaches every rank
    try:
        D.rank0_decides(lambda: (_ for _ in ()).throw(ConfigError("only rank 0 saw this")))
    except ConfigError as e:
        res["rank0_error"] = str(e)

    # sharded feature extraction = single-process extraction, in dataset order (101 = uneven shards)
    ds = build_dataset("fashion_mnist", "novel", max_per_class=21).subset(list(range(101)))
    torch.manual_seed(0)
    backbone = build_model(load_config(cfg_path, []), 5, 1, 28).backbone
    tf = build_transform(False, 28, 1, (0.286,), (0.353,))
    f_all, y_all = extract_features(backbone, ds, tf, batch_size=16)
    f_dist, y_dist = extract_features_distributed(backbone, ds, tf, batch_size=16)
    res["features_equal_labels"] = bool(torch.equal(y_all, y_dist))
    res["features_max_diff"] = float((f_all - f_dist).abs().max())
    res["features_shape"] = list(f_dist.shape)
    # the meta-test split across ranks = the single-process meta-test, episode by episode
    from lowshot.fewshot import evaluate
    for method, kw in (("finetune", {"steps": 20}), ("ncm", {})):
        one = evaluate(f_all, y_all, way=5, shot=1, query=10, episodes=9, method=method, seed=3, shard=False, **kw)
        two = evaluate(f_dist, y_dist, way=5, shot=1, query=10, episodes=9, method=method, seed=3, **kw)
        res[f"meta_{method}"] = [one["accuracies"], two["accuracies"], one["mean"], two["mean"]]
    parts = D.all_gather_cat(torch.full((ctx.rank + 1, 2), float(ctx.rank)))
    res["gather"] = parts.tolist()
    with open(f"{out}/rank{ctx.rank}.json", "w") as f:
        json.dump(res, f)
    D.barrier()
    torch.distributed.destroy_process_group()
''')


def torchrun(args, tmp_path, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _weights(path):
    ck = load_checkpoint(path)
    return {f"{part}.{k}": v.double() for part in ("model", "head") for k, v in ck[part].items()
            if v.is_floating_point()}


@needs_fmnist
@pytest.mark.slow
def test_two_process_training_matches_one_process(tmp_path):
    # the initial weights: one step at a vanishing learning rate (a run of 0 epochs is refused)
    train(load_config(CFG, BASE + NO_AUG + ["train.epochs=1", "train.max_steps_per_epoch=1", "optim.lr=1e-30"]),
          tmp_path / "init", log=quiet)
    train(load_config(CFG, BASE + NO_AUG + ["train.epochs=1", "train.max_steps_per_epoch=1"]),
          tmp_path / "one_step_1p", log=quiet)
    single = train(load_config(CFG, BASE + NO_AUG + ["train.epochs=2"]), tmp_path / "two_epochs_1p", log=quiet)

    # the CLI under torchrun (2 processes, global batch 32 = 16 per process)
    torchrun(["-m", "lowshot.cli", "train", str(CFG), *BASE, *NO_AUG, "train.epochs=2", "train.sync_bn=true",
              "--run-dir", str(tmp_path / "two_epochs_2p")], tmp_path)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    torchrun([str(worker), str(CFG), str(tmp_path), json.dumps(BASE), json.dumps(NO_AUG)], tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world"], r0["backend"], r1["rank"]) == (2, "gloo", 1)

    # one step: the same update up to float32 rounding (running statistics included)
    w0, w1, w2 = (_weights(tmp_path / d / "last.pt") for d in ("init", "one_step_1p", "one_step"))
    update = torch.cat([(w1[k] - w0[k]).flatten() for k in w1 if "running" not in k]).norm()
    diff = torch.cat([(w2[k] - w1[k]).flatten() for k in w1 if "running" not in k]).norm()
    assert update > 0 and diff / update < 1e-3, float(diff / update)
    for k in w1:
        if "running" in k:
            assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6), k

    # two epochs via the CLI: only rank 0 wrote; same schedule; metrics close (rounding is amplified)
    rec2 = read_jsonl(tmp_path / "two_epochs_2p" / "metrics.jsonl")
    rec1 = read_jsonl(tmp_path / "two_epochs_1p" / "metrics.jsonl")
    assert len(rec2) == 2 and [(r["epoch"], r["step"], r["lr"]) for r in rec2] == \
        [(r["epoch"], r["step"], r["lr"]) for r in rec1]
    assert abs(rec2[-1]["train_loss"] - single["train_loss"]) < 0.1 * single["train_loss"]
    assert abs(rec2[-1]["base_acc"] - single["base_acc"]) < 10
    assert load_checkpoint(tmp_path / "two_epochs_2p" / "last.pt")["world_size"] == 2

    # resume under DDP (augmentation on) continues exactly; every rank returned the same record
    drop = lambda r: {k: v for k, v in r.items() if k not in ("epoch_seconds", "run_dir")}
    assert r0["part"]["stopped_at_step"] == 7 and drop(r0["resumed"]) == drop(r0["full"]) == drop(r1["full"])
    wf, wr = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "part" / "last.pt")
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    ck = load_checkpoint(tmp_path / "part" / "last.pt")
    assert len(ck["rng_ranks"]) == 2 and not torch.equal(ck["rng_ranks"][0]["torch"], ck["rng_ranks"][1]["torch"])
    assert len(read_jsonl(tmp_path / "part" / "metrics.jsonl")) == 2

    # errors reach every rank; sharded features equal single-process ones, in order
    for r in (r0, r1):
        assert "divisible by the 2 processes" in r["batch_error"]
        assert r["rank0_error"] == "only rank 0 saw this"
        assert r["features_equal_labels"] and r["features_shape"] == [101, 64] and r["features_max_diff"] < 1e-5
        assert r["gather"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        for method in ("finetune", "ncm"):
            single, split, m1, m2 = r[f"meta_{method}"]
            assert len(split) == 9 and split == pytest.approx(single, abs=1e-9) and m1 == pytest.approx(m2), method
