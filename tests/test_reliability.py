"""Reliability: SIGKILL mid-epoch + --resume equals an uninterrupted run; corrupt files; property tests."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from lowshot.checkpoint import load_checkpoint
from lowshot.config import load_config
from lowshot.data import build_dataset
from lowshot.data.base import TensorImageDataset
from lowshot.errors import DataError
from lowshot.fewshot import sample_episodes
from lowshot.longtail import build_sampler
from lowshot.train import train
from lowshot.fileio import read_jsonl

from conftest import ROOT, needs_fmnist

CFG = ROOT / "configs" / "fashion_mnist" / "conv4_neg_cosine.yaml"
CRASH = ["data.options={max_per_class: 200}", "train.epochs=2", "train.batch_size=32", "train.progress=false",
         "val.every=0", "train.checkpoint_every=4"]


@needs_fmnist
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    run = tmp_path / "crashed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lowshot", "train", str(CFG), *CRASH, "--run-dir", str(run)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if (run / "last.pt").is_file():
                try:
                    ck = load_checkpoint(run / "last.pt")
                except Exception:  # never happens with atomic writes, but do not mask a real failure
                    raise
                if ck["epoch"] == 1 and ck["epoch_step"] > 0:  # second epoch under way
                    proc.send_signal(signal.SIGKILL)
                    killed_at = ck["step"]
                    break
            time.sleep(0.01)
    finally:
        proc.wait(timeout=60)
    assert killed_at is not None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert len(read_jsonl(run / "metrics.jsonl")) == 1  # only epoch 1 finished
    r = subprocess.run([sys.executable, "-m", "lowshot", "train", "--resume", str(run)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    ref = train(load_config(CFG, CRASH), tmp_path / "reference", log=lambda *_: None)
    got = read_jsonl(run / "metrics.jsonl")
    want = read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rs]
    assert strip(got) == strip(want)
    assert got[-1]["base_acc"] == ref["base_acc"]
    a, b = load_checkpoint(run / "last.pt"), load_checkpoint(tmp_path / "reference" / "last.pt")
    for part in ("model", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(state_a["momentum_buffer"], state_b["momentum_buffer"])


def _png_tree(root, n_per_class=3, corrupt=None):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    if corrupt:
        p = root / corrupt
        p.write_bytes(p.read_bytes()[:40])
    return root


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    root = _png_tree(tmp_path / "imgs", corrupt="dog/1.png")
    ds = build_dataset("image_folder", "train", root=str(root), image_size=8)
    idx = [i for i, p in enumerate(ds.paths) if p.endswith("dog/1.png")][0]
    with pytest.raises(DataError, match=r"dog/1\.png"):
        ds[idx]
    with pytest.warns(UserWarning, match="skipped 1 corrupt"):
        ok = build_dataset("image_folder", "train", root=str(root), image_size=8, skip_corrupt=True)
    assert len(ok) == 5 and len(ok.skipped) == 1 and ok.skipped[0].endswith("dog/1.png")
    assert all(ok[i][0].shape == (3, 8, 8) for i in range(len(ok)))
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\nimgs/cat/0.png,cat\nimgs/dog/1.png,dog\nimgs/dog/0.png,dog\n")
    with pytest.warns(UserWarning):
        lst = build_dataset("csv_list", "train", root=str(csv), image_size=8, skip_corrupt=True)
    assert len(lst) == 2 and lst.class_names == ["cat", "dog"]


def test_labels_out_of_range_and_bad_class_ids():
    imgs = torch.zeros(4, 1, 5, 5, dtype=torch.uint8)
    with pytest.raises(DataError, match="out of range"):
        TensorImageDataset(imgs, torch.tensor([0, 1, 2, 3]), ["a", "b", "c"])
    ds = TensorImageDataset(imgs, torch.tensor([0, 1, 2, 2]), ["a", "b", "c"])
    with pytest.raises(DataError, match="class id 7"):
        ds.select_classes([0, 7])
    sub = ds.select_classes([2, 0])
    assert sub.class_names == ["c", "a"] and sub.labels.tolist() == [1, 0, 0]


def test_way_larger_than_classes_and_too_few_images_name_the_problem():
    labels = torch.tensor([0] * 20 + [1] * 20 + [2] * 3)
    with pytest.raises(DataError, match="way"):
        sample_episodes(labels[:40], way=5, shot=1, query=15, episodes=2, seed=0)
    with pytest.raises(DataError, match="Ankle boot"):
        sample_episodes(labels, way=3, shot=1, query=5, episodes=2, seed=0,
                        class_names=["T-shirt", "Bag", "Ankle boot"])


# ----------------------------------------------------------------------------- property tests

label_lists = st.lists(st.integers(0, 5), min_size=30, max_size=200)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(counts=st.lists(st.integers(6, 30), min_size=3, max_size=8), way=st.integers(2, 3),
       shot=st.integers(1, 3), query=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_episodes_disjoint_and_seed_stable(counts, way, shot, query, seed):
    labels = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    ep = sample_episodes(labels, way=way, shot=shot, query=query, episodes=5, seed=seed)
    assert ep.shape == (5, way, shot + query)
    assert torch.equal(ep, sample_episodes(labels, way=way, shot=shot, query=query, episodes=5, seed=seed))
    for e in ep:
        flat = e.reshape(-1)
        assert flat.unique().numel() == flat.numel()  # support and query disjoint, no repeats
        cls = labels[e]
        assert (cls == cls[:, :1]).all()  # one class per row
        assert cls[:, 0].unique().numel() == way  # distinct classes


@settings(max_examples=30, deadline=None)
@given(labels=label_lists, replicas=st.integers(1, 4), seed=st.integers(0, 1000), epoch=st.integers(0, 5))
def test_instance_sampler_shards_cover_each_index_once(labels, replicas, seed, epoch):
    y = torch.tensor(labels)
    seen = []
    for rank in range(replicas):
        s = build_sampler("instance", y, seed=seed, num_replicas=replicas, rank=rank)
        s.set_epoch(epoch)
        seen.append(list(s))
    assert len({len(x) for x in seen}) == 1  # equal lengths on every rank
    flat = [i for x in seen for i in x]
    pad = len(flat) - len(labels)
    assert 0 <= pad < replicas
    assert sorted(set(flat)) == list(range(len(labels)))  # every index at least once
    counts = torch.bincount(torch.tensor(flat), minlength=len(labels))
    assert int((counts > 1).sum()) == pad  # only the wrap-around padding repeats


@settings(max_examples=15, deadline=None)
@given(counts=st.lists(st.integers(1, 200), min_size=2, max_size=6), name=st.sampled_from(
    ["class_balanced", "sqrt", "instance"]), seed=st.integers(0, 100))
def test_sampler_class_frequencies_follow_theory(counts, name, seed):
    y = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    n = 20000
    s = build_sampler(name, y, seed=seed, num_samples=n if name != "instance" else None)
    drawn = torch.bincount(y[torch.tensor(list(s))], minlength=len(counts)).double()
    c = torch.tensor(counts, dtype=torch.float64)
    q = {"class_balanced": 0.0, "sqrt": 0.5, "instance": 1.0}[name]
    p = c ** q / (c ** q).sum()
    total = drawn.sum()
    assert torch.all((drawn / total - p).abs() <= 5 * torch.sqrt(p * (1 - p) / total) + 1e-9)
    s2 = build_sampler(name, y, seed=seed, num_samples=n if name != "instance" else None)
    assert list(s2) == list(build_sampler(name, y, seed=seed, num_samples=n if name != "instance" else None))
