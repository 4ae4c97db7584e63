"""End-to-end training on a tiny real Fashion-MNIST subset: metrics, determinism, resume, divergence."""
import json

import pytest
import torch

from lowshot.checkpoint import load_checkpoint
from lowshot.config import Config, apply_overrides, load_config
from lowshot.errors import ConfigError
from lowshot.train import TrainingDiverged, lr_at, train
from lowshot.utils import read_jsonl

from conftest import ROOT, needs_fmnist

CFG = ROOT / "configs" / "fashion_mnist" / "conv4_neg_cosine.yaml"


def quiet(_msg):
    pass


def _cfg(overrides):
    return load_config(CFG, overrides)


def test_lr_schedule_hand_values():
    s = Config().schedule
    s.warmup_epochs, s.warmup_start = 1.0, 0.0
    assert lr_at(0, 10, 5, 0.1, s) == 0.0
    assert lr_at(5, 10, 5, 0.1, s) == pytest.approx(0.05)
    assert lr_at(10, 10, 5, 0.1, s) == pytest.approx(0.1)  # cosine starts after warmup
    assert lr_at(30, 10, 5, 0.1, s) == pytest.approx(0.05)  # half way through the cosine part
    s.name, s.warmup_epochs, s.milestones, s.gamma = "multistep", 0.0, [2, 4], 0.1
    assert [round(lr_at(k * 10, 10, 5, 1.0, s), 6) for k in range(5)] == [1.0, 1.0, 0.1, 0.1, 0.01]


@needs_fmnist
def test_train_writes_run_dir_and_is_deterministic(tmp_path, tiny_fmnist_overrides):
    cfg = _cfg(tiny_fmnist_overrides)
    a = train(cfg, tmp_path / "a", log=quiet)
    b = train(cfg, tmp_path / "b", log=quiet)
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "last.pt", "best.pt"):
        assert (tmp_path / "a" / name).is_file(), name
    ra, rb = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert len(ra) == 2
    strip = lambda rs: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rs]
    assert strip(ra) == strip(rb)  # same seed on CPU -> identical metrics
    assert a["base_acc"] > 40  # 5 balanced classes: chance is 20 %
    ck = load_checkpoint(tmp_path / "a" / "last.pt")
    assert ck["config"]["head"]["margin"] == cfg.head.margin and ck["epoch"] == 2
    assert ck["class_names"][:2] == ["T-shirt/top", "Trouser"]
    for k in ck["model"]:
        assert torch.equal(ck["model"][k], load_checkpoint(tmp_path / "b" / "last.pt")["model"][k])


@needs_fmnist
def test_resume_equals_uninterrupted(tmp_path, tiny_fmnist_overrides):
    cfg = _cfg(tiny_fmnist_overrides + ["train.checkpoint_every=4"])
    full = train(cfg, tmp_path / "full", log=quiet)
    # stop mid-epoch 2 (9 steps/epoch with 300 images / 32), right after the checkpoint at step 12
    part = train(cfg, tmp_path / "part", log=quiet, stop_after_steps=13)
    assert part["stopped_at_step"] == 13
    ck = load_checkpoint(tmp_path / "part" / "last.pt")
    assert (ck["epoch"], ck["step"], ck["epoch_step"]) == (1, 12, 3)
    resumed = train(Config(), tmp_path / "part", resume=True, log=quiet)
    drop = lambda r: {k: v for k, v in r.items() if k not in ("epoch_seconds", "run_dir")}
    assert drop(resumed) == drop(full)
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    for part_name in ("model", "head"):
        for k in a[part_name]:
            assert torch.equal(a[part_name][k], b[part_name][k]), k
    assert len(read_jsonl(tmp_path / "part" / "metrics.jsonl")) == 2


@needs_fmnist
def test_nan_loss_stops_with_epoch_and_step(tmp_path, tiny_fmnist_overrides):
    cfg = _cfg(tiny_fmnist_overrides + ["optim.lr=1e30", "head.name=linear", "head.margin=0", "head.scale=null",
                                        "train.checkpoint_every=1"])
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step \d+"):
        train(cfg, tmp_path / "run", log=quiet)
    ck = load_checkpoint(tmp_path / "run" / "last.pt")  # last good checkpoint intact
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_run_dir_not_overwritten_without_flag(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("x")
    with pytest.raises(ConfigError, match="--resume"):
        train(Config(), tmp_path / "run", log=quiet)
    with pytest.raises(ConfigError, match="cannot resume"):
        train(Config(), tmp_path / "nothing", resume=True, log=quiet)
