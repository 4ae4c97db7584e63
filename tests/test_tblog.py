"""TensorBoard event files (train.tensorboard): read back with TensorBoard's own readers and
compared with metrics.jsonl; resume, divergence, sweeps, and the missing-package error."""
import math
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lowshot.config import Config, load_config
from lowshot.tblog import TensorBoardLog
from lowshot.train import TrainingDiverged, lr_at, train
from lowshot.fileio import read_jsonl

from conftest import ROOT, needs_fmnist

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer  # noqa: E402

CFG = ROOT / "configs" / "fashion_mnist" / "conv4_neg_cosine.yaml"


def quiet(_msg):
    pass


def f32(x):
    return float(np.float32(x))


def scalars(logdir):
    """{tag: [(step, value)]} as TensorBoard shows them (every point kept, restarts purged)."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_epochs_match_metrics(sc, records):
    """Every numeric metrics.jsonl value is epoch/KEY at the record's step, to float32 precision."""
    keys = {k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert {t for t in sc if t.startswith("epoch/")} == {f"epoch/{k}" for k in keys}
    for key in keys:
        want = [(r["step"], f32(r[key])) for r in records if key in r]
        assert sc[f"epoch/{key}"] == want, key


TINY = ["data.options={max_per_class: 60}", "train.epochs=2", "train.batch_size=32", "train.progress=false",
        "val.episodes=20", "val.every=1", "val.method=ncm", "model.backbone=conv4", "train.checkpoint_every=4",
        "train.tensorboard=true"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A tiny real run (2 epochs x 9 steps, base accuracy and few-shot validation every epoch)."""
    cfg = load_config(CFG, TINY)
    run = tmp_path_factory.mktemp("tb") / "full"
    train(cfg, run, log=quiet)
    return cfg, run


def test_disabled_log_does_nothing_and_needs_no_tensorboard(tmp_path, monkeypatch):
    import torch
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # importing it would now fail
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    tb = TensorBoardLog(False)
    tb.open(tmp_path, 0, resumed=False)
    tb.step(1, torch.tensor(1.0), 0.1)
    tb.epoch({"epoch": 1, "step": 1, "train_loss": 1.0})
    tb.flush()
    tb.close()
    assert list(tmp_path.iterdir()) == []


@needs_fmnist
def test_event_scalars_equal_metrics_jsonl(full_run):
    cfg, run = full_run
    records = read_jsonl(run / "metrics.jsonl")
    sc = scalars(run / "tensorboard")
    assert set(sc) == {"step/loss", "step/lr"} | {t for t in sc if t.startswith("epoch/")}
    assert_epochs_match_metrics(sc, records)
    assert {"epoch/train_loss", "epoch/base_acc", "epoch/val_mean", "epoch/val_ci95", "epoch/lr"} <= set(sc)
    # one point per optimiser step, numbered 1..18; lr is the schedule's rate for that step
    assert [s for s, _ in sc["step/loss"]] == [s for s, _ in sc["step/lr"]] == list(range(1, 19))
    spe = 9
    assert sc["step/lr"] == [(k, f32(lr_at(k - 1, spe, 2, cfg.optim.lr, cfg.schedule))) for k in range(1, 19)]
    losses = dict(sc["step/loss"])
    for r in records:  # equal batches (drop_last): the epoch's train_loss is the mean of its step losses
        steps = range(r["step"] - spe + 1, r["step"] + 1)
        assert np.mean([losses[k] for k in steps]) == pytest.approx(r["train_loss"], rel=1e-6)
        assert dict(sc["step/lr"])[r["step"]] == f32(r["lr"])


@needs_fmnist
def test_resume_appends_without_duplicate_steps(full_run, tmp_path):
    cfg, full = full_run
    part = tmp_path / "part"
    # stop after step 13; the last checkpoint is at step 12 (checkpoint_every=4), so step 13 is logged twice
    assert train(cfg, part, log=quiet, overrides=["train.max_steps=13"])["stopped_at_step"] == 13
    train(Config(), part, resume=True, log=quiet)
    files = sorted((part / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2  # the resumed process appends its own file to the same folder
    raw = [e.step for f in files for e in EventFileLoader(str(f)).Load()
           if e.HasField("summary") and e.summary.value[0].tag == "step/loss"]
    assert raw.count(13) == 2  # on disk twice...
    sc = scalars(part / "tensorboard")
    assert [s for s, _ in sc["step/loss"]] == list(range(1, 19))  # ...shown once (purge_step)
    assert_epochs_match_metrics(sc, read_jsonl(part / "metrics.jsonl"))
    ref = scalars(full / "tensorboard")
    assert sc["step/loss"] == ref["step/loss"] and sc["step/lr"] == ref["step/lr"]  # CPU resume is exact


# trains TINY into argv[1] and SIGKILLs itself right after last.pt of step 12 is on disk
KILLED = """
import os, signal, sys
import lowshot.train as t
import lowshot.training.state as s
from lowshot.config import load_config
save = s.save_checkpoint
def save_then_die(obj, path):
    save(obj, path)
    if path.name == "last.pt" and obj["step"] == 12:
        os.kill(os.getpid(), signal.SIGKILL)
s.save_checkpoint = save_then_die
t.train(load_config(sys.argv[2], sys.argv[3:]), sys.argv[1], log=lambda _m: None)
"""


@needs_fmnist
def test_sigkill_after_a_checkpoint_loses_no_logged_step(full_run, tmp_path):
    """Events are flushed before each checkpoint: a kill right after it loses nothing a resume won't redo."""
    _, full = full_run
    run = tmp_path / "killed"
    r = subprocess.run([sys.executable, "-c", KILLED, str(run), str(CFG), *TINY], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    assert [s for s, _ in scalars(run / "tensorboard")["step/loss"]] == list(range(1, 13))
    train(Config(), run, resume=True, log=quiet)
    sc, ref = scalars(run / "tensorboard"), scalars(full / "tensorboard")
    assert sc["step/loss"] == ref["step/loss"] and sc["step/lr"] == ref["step/lr"]
    assert_epochs_match_metrics(sc, read_jsonl(run / "metrics.jsonl"))


@needs_fmnist
def test_divergence_still_writes_the_steps_up_to_the_bad_one(tmp_path):
    cfg = load_config(CFG, ["data.options={max_per_class: 20}", "train.epochs=1", "train.batch_size=32",
                            "train.max_steps_per_epoch=2", "val.every=0", "train.progress=false",
                            "train.checkpoint_every=1", "optim.lr=1e30", "head.name=linear", "head.margin=0",
                            "head.scale=null", "train.tensorboard=true"])
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, tmp_path / "run", log=quiet)
    bad = int(re.search(r"step (\d+)", str(err.value)).group(1))
    # pending step losses were written and the file closed although training raised
    loss = dict(scalars(tmp_path / "run" / "tensorboard")["step/loss"])
    assert sorted(loss) == list(range(1, bad + 1))
    assert not math.isfinite(loss[bad]) and all(math.isfinite(loss[k]) for k in range(1, bad))


@needs_fmnist
def test_sweep_points_are_separate_tensorboard_runs(tmp_path):
    from lowshot.analysis import run_sweep
    fixed = ["data.options={max_per_class: 20}", "train.epochs=1", "train.batch_size=32",
             "train.max_steps_per_epoch=2", "val.every=0", "train.progress=false", "train.checkpoint_every=1"]
    out = tmp_path / "sweep"
    kw = dict(shots=[1], episodes=10, method="ncm", log=quiet)
    run_sweep(CFG, {"head.margin": [-0.1, 0.1]}, out, overrides=fixed + ["train.tensorboard=true"], **kw)
    mux = EventMultiplexer(size_guidance={"scalars": 0}).AddRunsFromDirectory(str(out))  # = tensorboard --logdir
    mux.Reload()
    names = ["head.margin=-0.1", "head.margin=0.1"]
    assert sorted(mux.Runs()) == [f"{n}/tensorboard" for n in names]
    for n in names:
        acc = mux.GetAccumulator(f"{n}/tensorboard")
        sc = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
        assert_epochs_match_metrics(sc, read_jsonl(out / n / "metrics.jsonl"))
        assert [s for s, _ in sc["step/loss"]] == [1, 2]
    # the logging switch is not part of a point's identity: finished points are reused without it
    again = run_sweep(CFG, {"head.margin": [-0.1, 0.1]}, out, overrides=fixed, **kw)
    assert [r["name"] for r in again] == names
    # a point stopped before its first checkpoint (only config, metrics, tensorboard/) is restarted
    p = out / names[1]
    for name in ("result.json", "last.pt", "best.pt"):
        (p / name).unlink()
    run_sweep(CFG, {"head.margin": [-0.1, 0.1]}, out, overrides=fixed + ["train.tensorboard=true"], **kw)
    assert (p / "result.json").is_file() and len(list((p / "tensorboard").iterdir())) == 1  # folder was emptied


MISSING = "import sys; sys.modules['tensorboard'] = None; from lowshot.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_missing_tensorboard_is_one_line_exit_2(tmp_path, command):
    out = tmp_path / "out"
    args = (["train", str(CFG), "train.tensorboard=true", "--run-dir", str(out)] if command == "train" else
            ["sweep", str(CFG), "head.margin=0,0.1", "train.tensorboard=true", "--out", str(out)])
    r = subprocess.run([sys.executable, "-c", MISSING, *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "train.tensorboard" in r.stderr and "pip install 'lowshot[tensorboard]'" in r.stderr
    assert not out.exists()  # nothing half-written


@needs_fmnist
@pytest.mark.slow
def test_torchrun_writes_one_event_file_from_rank_0(tmp_path):
    import os
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lowshot.cli",
           "train", str(CFG), "data.options={max_per_class: 40}", "train.batch_size=32", "train.progress=false",
           "val.every=0", "train.epochs=1", "train.tensorboard=true", "--run-dir", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert len(list((run / "tensorboard").iterdir())) == 1
    sc = scalars(run / "tensorboard")
    assert [s for s, _ in sc["step/loss"]] == list(range(1, 7))  # 200 images / global batch 32
    assert_epochs_match_metrics(sc, read_jsonl(run / "metrics.jsonl"))  # train_loss over both processes


def test_a_resume_in_the_same_second_still_sorts_after_the_earlier_event_file(tmp_path):
    """TensorBoard reads a folder's files in name order, and names start with the whole second the
    writer opened (then host and pid, which sort arbitrarily): a resume that opens within the same
    second as the killed process must still get a later name, or its steps are read first."""
    first = TensorBoardLog(True, flush_every=1)
    first.open(tmp_path, 0, resumed=False)
    for k in (1, 2, 3):
        first.step(k, torch.tensor(float(k)), 0.1)
    first.close()
    (old,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    # as if written by a pid that sorts after ours, one second ahead: a writer opened at once
    # would have an earlier (or, a moment later, the same) second and sort first
    parts = old.name.split(".")
    parts[3], parts[5] = "%010d" % (int(time.time()) + 1), "9" * 9
    later = old.with_name(".".join(parts))
    old.rename(later)
    resumed = TensorBoardLog(True, flush_every=1)
    resumed.open(tmp_path, 2, resumed=True)  # the checkpoint was at step 2: step 3 is redone
    resumed.step(3, torch.tensor(30.0), 0.1)
    resumed.step(4, torch.tensor(40.0), 0.1)
    resumed.close()
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2 and files[0] == later
    assert scalars(tmp_path / "tensorboard")["step/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
