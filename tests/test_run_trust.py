"""Trust every run: divergence never reaches a checkpoint, one training per run directory, resumes that
check what they continue (and extend a finished run), failed starts that retry, readable files.

Tiny real Fashion-MNIST runs; the CLI is the contract, so most tests go through ``lowshot.cli.main``
(in-process, fast) or a subprocess where a process must be killed or must hold a lock.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from lowshot.checkpoint import load_checkpoint, save_checkpoint
from lowshot.fileio import atomic_write, write_text_atomic
from lowshot.cli import main
from lowshot.config import load_config
from lowshot.train import lr_at, train
from lowshot.fileio import read_jsonl

from conftest import ROOT, needs_fmnist

CFG = str(ROOT / "configs" / "fashion_mnist" / "conv4_neg_cosine.yaml")
LT_CFG = str(ROOT / "configs" / "fashion_mnist_lt" / "conv4_joint.yaml")
TINY = ["data.options={max_per_class: 40}", "train.epochs=1", "train.batch_size=32", "train.progress=false",
        "val.every=0", "train.max_steps_per_epoch=2"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def quiet(_msg: str) -> None:
    pass


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowshot", *args], cwd=ROOT, env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("lowshot: error:"), err
    return err


def finite_everywhere(ck: dict) -> bool:
    tensors = [v for part in ("model", "head") for v in ck[part].values()]
    tensors += [v for st in ck["optimizer"]["state"].values() for v in st.values() if isinstance(v, torch.Tensor)]
    return all(torch.isfinite(v).all() for v in tensors if v.is_floating_point())


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch run (2 steps), trained under umask 022."""
    run = tmp_path_factory.mktemp("trust") / "done"
    old = os.umask(0o022)
    try:
        assert main(["train", CFG, *TINY, "--run-dir", str(run)]) == 0
    finally:
        os.umask(old)
    return run


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(finished, dest)
    return dest


# ----------------------------------------------------------------------------- 1. divergence

@needs_fmnist
@pytest.mark.parametrize("lr", ["1e4", "100"])
def test_divergence_never_reaches_a_checkpoint(tmp_path: Path, lr: str) -> None:
    """lr=1e4: the weights overflow in an update whose loss was still finite; lr=100: the loss stays finite
    (~1e23) while BatchNorm running_var reaches inf. Both stop with exit 2 naming epoch and step, and the
    checkpoint on disk (if any) is finite."""
    run = tmp_path / "div"
    r = cli("train", LT_CFG, f"optim.lr={lr}", "train.epochs=2", "train.max_steps_per_epoch=30",
            "train.checkpoint_every=5", "train.progress=false",
            "data.options={imbalance_factor: 100, val_per_class: 50, seed: 0}", "--run-dir", str(run))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr
    assert re.search(r"(is not finite|loss is (nan|inf|-inf)) at epoch 1, step \d+; stopped", r.stderr), r.stderr
    if (run / "last.pt").exists():
        ck = load_checkpoint(run / "last.pt")
        assert finite_everywhere(ck)
        assert f"(epoch 1, step {ck['step']})" in r.stderr  # names the last good checkpoint
    else:
        assert "No checkpoint was written" in r.stderr
    assert not (run / "best.pt").exists() and read_jsonl(run / "metrics.jsonl") == []


# ----------------------------------------------------------------------------- 4. one training per run dir

@needs_fmnist
def test_second_training_into_a_busy_run_dir_fails_at_once_and_a_dead_owner_does_not_block(tmp_path: Path) -> None:
    run = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-m", "lowshot", "train", CFG, *TINY, "train.epochs=5000",
                               "train.max_steps_per_epoch=1", "data.test_split=null", "--run-dir", str(run)],
                              cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (run / "last.pt").is_file() and holder.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert holder.poll() is None, holder.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
        for extra in (["--overwrite"], []):  # old code: --overwrite deleted the live run and trained into it
            r = cli("train", CFG, *TINY, "--run-dir", str(run), *extra)
            assert r.returncode == 2 and f"in use by another lowshot process (pid {holder.pid})" in r.stderr, r.stderr
        r = cli("train", "--resume", str(run), "train.epochs=6000")
        assert r.returncode == 2 and f"(pid {holder.pid})" in r.stderr, r.stderr
        assert holder.poll() is None  # the owner trains on, undisturbed
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert (run / ".lock").read_text().split() == [str(holder.pid)]  # stale: its owner is dead
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1))  # one writer only
    done = load_checkpoint(run / "last.pt")["epoch"]
    r = cli("train", "--resume", str(run), f"train.epochs={done + 1}")  # a dead owner's lock does not block
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_checkpoint(run / "last.pt")["epoch"] == done + 1 and not (run / ".lock").exists()


# ----------------------------------------------------------------------------- 5. resume checks what it continues

@needs_fmnist
def test_resume_refuses_a_foreign_last_pt(run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    train(load_config(CFG, TINY + ["model.backbone=resnet12", "model.backbone_kwargs={widths: [4, 4, 8, 8]}"]),
          other, log=quiet)
    shutil.copyfile(other / "last.pt", run_copy / "last.pt")
    before = (run_copy / "config.yaml").read_text()
    assert main(["train", "--resume", str(run_copy), "train.epochs=2"]) == 2
    err = one_line_error(capsys)
    assert "model.backbone: config.yaml 'conv4', last.pt 'resnet12'" in err and "describe different runs" in err
    assert (run_copy / "config.yaml").read_text() == before
    assert load_checkpoint(run_copy / "last.pt")["epoch"] == 1  # nothing trained


@needs_fmnist
def test_resume_refuses_a_hand_edited_config_yaml(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edited = (run_copy / "config.yaml").read_text().replace("margin: -0.1", "margin: 0.5")
    assert edited != (run_copy / "config.yaml").read_text()
    (run_copy / "config.yaml").write_text(edited)
    assert main(["train", "--resume", str(run_copy), "train.epochs=2"]) == 2
    assert "head.margin: config.yaml 0.5, last.pt -0.1" in one_line_error(capsys)
    assert (run_copy / "config.yaml").read_text() == edited  # not overwritten


@needs_fmnist
def test_resume_with_weights_of_another_backbone_is_one_line(run_copy: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    ck = load_checkpoint(run_copy / "last.pt")
    ck["config"]["model"]["backbone"] = "resnet12"  # config and config.yaml agree; the weights are conv4's
    save_checkpoint(ck, run_copy / "last.pt")
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    cfg["model"]["backbone"] = "resnet12"
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run_copy / "best.pt").unlink()
    assert main(["train", "--resume", str(run_copy), "train.epochs=2"]) == 2
    assert "model weights in" in (err := one_line_error(capsys)) and "do not fit the backbone 'resnet12'" in err


@needs_fmnist
def test_resume_refuses_another_run_dir(run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(run_copy), "--run-dir", str(tmp_path / "elsewhere")]) == 2
    assert "drop --run-dir" in one_line_error(capsys) and not (tmp_path / "elsewhere").exists()


@needs_fmnist
def test_extend_a_finished_run_with_more_epochs_only(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--resume", str(run_copy), "head.margin=0.1"]) == 2
    err = one_line_error(capsys)
    assert "'head.margin' cannot change on resume" in err and "train.epochs" in err
    assert main(["train", "--resume", str(run_copy), "train.epoch=3"]) == 2
    assert "did you mean 'train.epochs'" in one_line_error(capsys)
    assert main(["train", "--resume", str(run_copy)]) == 0  # finished: says so, changes nothing
    assert "is finished (epoch 1 of 1); nothing to do" in capsys.readouterr().out

    assert main(["train", "--resume", str(run_copy), "train.epochs=2"]) == 0
    assert "train.epochs: 1 -> 2" in capsys.readouterr().out
    recs = read_jsonl(run_copy / "metrics.jsonl")
    assert [(r["epoch"], r["step"]) for r in recs] == [(1, 2), (2, 4)]
    cfg = load_config(CFG, TINY)  # the remaining steps follow the schedule of a 2-epoch run
    assert recs[1]["lr"] == pytest.approx(lr_at(3, 2, 2, cfg.optim.lr, cfg.schedule))
    ck = load_checkpoint(run_copy / "last.pt")
    assert ck["epoch"] == 2 and ck["config"]["train"]["epochs"] == 2
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["train"]["epochs"] == 2
    assert main(["train", "--resume", str(run_copy), "train.epochs=1"]) == 2
    assert "already trained 2 epochs" in one_line_error(capsys)


# ----------------------------------------------------------------------------- 6. validate before creating anything

@needs_fmnist
@pytest.mark.parametrize("bad, named", [
    ("head.name=nope", "head"), ("model.backbone=nope", "backbone"), ("data.name=nope", "dataset"),
    ("head.margin=.nan", "margin"), ("val.way=50", "val.way"), ("eval.way=50", "eval.way"),
    ("val.method=nope", "val.method"), ("val.options={lr_typo: 1}", "lr_typo"),
    ("train.epochs=0", "train.epochs"),  # issue item 12: an untrained best.pt, without a word
])
def test_invalid_run_is_refused_before_the_run_dir_exists(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          bad: str, named: str) -> None:
    run = tmp_path / "r"
    assert main(["train", CFG, *TINY, "val.every=1", "val.episodes=2", "val.method=ncm", bad,
                 "--run-dir", str(run)]) == 2
    assert named in one_line_error(capsys)
    assert not run.exists()


@needs_fmnist
def test_run_killed_before_its_first_checkpoint_is_retried_by_the_same_command(tmp_path: Path) -> None:
    """Killed inside the write of its first last.pt: the same command starts the run again."""
    run = tmp_path / "first"
    args = [sys.executable, "-m", "lowshot", "train", CFG, *TINY, "--run-dir", str(run)]
    proc = subprocess.Popen(args, cwd=ROOT, env={**ENV, "LOWSHOT_TEST_WRITE_PAUSE": "last.pt:60"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_temp(run, ".last.pt.", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (run / "last.pt").exists() and (run / "config.yaml").is_file()
    r = cli(*args[3:])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stopped before its first last.pt; starting it again" in r.stdout
    assert len(read_jsonl(run / "metrics.jsonl")) == 1 and load_checkpoint(run / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.csv",
                                                     "metrics.jsonl"]


def _wait_for_temp(run: Path, prefix: str, proc: subprocess.Popen, timeout: float = 240) -> Path:
    """The temp file of a paused write: present and unchanged for 1 s (an unpaused write takes ms)."""
    deadline = time.time() + timeout
    seen: dict[str, float] = {}
    while time.time() < deadline and proc.poll() is None:
        if run.is_dir():
            now = time.time()
            temps = {p.name for p in run.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")}
            seen = {n: seen.get(n, now) for n in temps}
            for name, since in seen.items():
                if now - since > 1.0:
                    return run / name
        time.sleep(0.02)
    raise AssertionError(f"no {prefix}*.tmp appeared: {proc.stderr.read().decode()[-2000:]}")  # type: ignore


# ----------------------------------------------------------------------------- SIGKILL inside a checkpoint write

CRASH = ["data.options={max_per_class: 100}", "train.epochs=2", "train.batch_size=32", "train.progress=false",
         "val.every=0", "train.checkpoint_every=4"]


@needs_fmnist
def test_sigkill_inside_a_checkpoint_write_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    """15 steps/epoch; last.pt is written at steps 4, 8, 12, 15 (epoch end), 16, ...: the 5th write (step 16,
    epoch 2) is paused with its data in the temp file and killed there. The previous last.pt survives,
    the resume removes the torn temp file and ends exactly where an uninterrupted run ends."""
    run = tmp_path / "crashed"
    proc = subprocess.Popen([sys.executable, "-m", "lowshot", "train", CFG, *CRASH, "--run-dir", str(run)],
                            cwd=ROOT, env={**ENV, "LOWSHOT_TEST_WRITE_PAUSE": "last.pt:60:4"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        temp = _wait_for_temp(run, ".last.pt.", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and temp.exists()
    ck = load_checkpoint(run / "last.pt")
    assert (ck["epoch"], ck["step"], ck["epoch_step"]) == (1, 15, 0)  # the write before the killed one
    r = cli("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]

    ref = train(load_config(CFG, CRASH), tmp_path / "reference", log=quiet)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rs]  # noqa: E731
    assert strip(read_jsonl(run / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "reference" / "metrics.jsonl"))
    a, b = load_checkpoint(run / "last.pt"), load_checkpoint(tmp_path / "reference" / "last.pt")
    assert a["step"] == b["step"] == 30 and ref["base_acc"] == read_jsonl(run / "metrics.jsonl")[-1]["base_acc"]
    for part in ("model", "head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"


# ----------------------------------------------------------------------------- 8. file modes follow the umask

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    from lowshot.report.figures import new_figure, save_figure
    old = os.umask(umask)
    try:
        paths = [write_text_atomic(tmp_path / "config.yaml", "a: 1\n"),
                 save_checkpoint({"x": torch.zeros(2)}, tmp_path / "last.pt"),
                 atomic_write(tmp_path / "result.json", lambda f: f.write(b"{}"))]
        fig = new_figure()
        paths.append(save_figure(fig, tmp_path / "curves.png"))
        import matplotlib.pyplot as plt
        plt.close(fig)
    finally:
        os.umask(old)
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == mode, p.name


def test_safe_extract_creates_folders_and_files_by_the_umask(tmp_path: Path) -> None:
    from lowshot.data.archives import safe_extract
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("top/file.txt", "x")
        info = zipfile.ZipInfo("top/run.sh")
        info.external_attr = 0o755 << 16
        z.writestr(info, "#!/bin/sh\n")
    old = os.umask(0o022)
    try:
        dest = safe_extract(archive, tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.relative_to(dest).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [dest, *dest.rglob("*")]}
    assert modes == {".": 0o755, "top": 0o755, "top/file.txt": 0o644, "top/run.sh": 0o755}


@needs_fmnist
def test_run_dir_files_are_readable_by_colleagues(finished: Path) -> None:
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in finished.iterdir()}
    assert modes == {n: 0o644 for n in ("config.yaml", "metrics.jsonl", "metrics.csv", "last.pt", "best.pt")}
