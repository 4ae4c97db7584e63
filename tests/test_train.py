"""End-to-end training on a tiny real Fashion-MNIST subset: metrics, determinism, resume, divergence."""

import pytest
import torch

from lowshot.checkpoint import load_checkpoint
from lowshot.config import Config, load_config
from lowshot.errors import ConfigError
from lowshot.train import TrainingDiverged, lr_at, train
from lowshot.fileio import read_jsonl

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
    train(cfg, tmp_path / "b", log=quiet)
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
    part = train(cfg, tmp_path / "part", log=quiet, overrides=["train.max_steps=13"])
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


@needs_fmnist
def test_deferred_nan_check_reports_the_same_first_bad_step(tmp_path, tiny_fmnist_overrides):
    """Checking every 5 steps (one GPU sync per check) still names the first diverged step."""
    base = tiny_fmnist_overrides + ["optim.lr=1e30", "head.name=linear", "head.margin=0", "head.scale=null",
                                    "val.every=0"]
    messages = []
    for every in (1, 5):
        with pytest.raises(TrainingDiverged) as err:
            train(_cfg(base + [f"train.nan_check_every={every}"]), tmp_path / f"every{every}", log=quiet)
        messages.append(str(err.value).split(";")[0])
    assert messages[0] == messages[1] and "epoch 1, step" in messages[0]
    assert not (tmp_path / "every5" / "last.pt").exists()  # nothing diverged was ever saved
    with pytest.raises(ConfigError, match="nan_check_every"):
        train(_cfg(tiny_fmnist_overrides + ["train.nan_check_every=0"]), tmp_path / "zero", log=quiet)


def test_progressive_sampler_spans_the_whole_run():
    from lowshot.train import build_train_sampler
    labels = torch.tensor([0] * 90 + [1] * 10)
    cfg = Config()
    cfg.train.sampler, cfg.train.epochs = "progressive", 7
    assert build_train_sampler(cfg, labels).total_epochs == 7
    cfg.train.sampler_kwargs = {"total_epochs": 3}
    assert build_train_sampler(cfg, labels).total_epochs == 3
    cfg.train.sampler_kwargs = {"seed": 1}
    with pytest.raises(ConfigError, match="train.sampler_kwargs"):
        build_train_sampler(cfg, labels)
    cfg.train.sampler, cfg.train.sampler_kwargs = "instance", {}
    s = build_train_sampler(cfg, labels, num_replicas=2, rank=1)
    assert (s.num_replicas, s.rank, len(s)) == (2, 1, 50)


@needs_fmnist
def test_amp_on_cpu_fp16_is_ignored_and_bf16_runs(tmp_path, tiny_fmnist_overrides):
    base = tiny_fmnist_overrides + ["train.epochs=1", "train.max_steps_per_epoch=2", "val.every=0",
                                    "data.test_split=null"]
    logs: list[str] = []
    off = train(_cfg(base), tmp_path / "off", log=quiet)
    fp16 = train(_cfg(base + ["train.amp=fp16"]), tmp_path / "fp16", log=logs.append)
    assert any("train.amp=fp16 is ignored on cpu" in m for m in logs)
    assert fp16["train_loss"] == off["train_loss"]  # plain fp32, not silently half precision
    bf16 = train(_cfg(base + ["train.amp=bf16"]), tmp_path / "bf16", log=quiet)
    assert bf16["train_loss"] != off["train_loss"] and abs(bf16["train_loss"] - off["train_loss"]) < 0.1


@needs_fmnist
def test_best_checkpoint_compares_one_metric_only(tmp_path, tiny_fmnist_overrides):
    """With few-shot validation every 2 epochs, epochs without it never claim best (no mixing with base_acc)."""
    cfg = _cfg(tiny_fmnist_overrides + ["train.epochs=3", "val.every=2"])
    train(cfg, tmp_path / "r", log=quiet)
    recs = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [("val_mean" in r) for r in recs] == [False, True, True]
    assert recs[0]["best"] is False and recs[1]["best"] is True
    best_val = max(r["val_mean"] for r in recs if "val_mean" in r)
    assert load_checkpoint(tmp_path / "r" / "best.pt")["best"] == best_val


@needs_fmnist
def test_dropblock_ramp_counts_global_steps_across_resume(tmp_path, tiny_fmnist_overrides, monkeypatch):
    """The ResNet-12 DropBlock ramp follows the trainer's global step, also after a resume, and only
    DropBlock (blocks 3-4) ramps (bl0 lib/backbone/resnet12.py:62-69)."""
    from lowshot.backbones.resnet12 import ResNet12Block
    rates: list[tuple[float, ...]] = []
    original = ResNet12Block.forward

    def spy(self, x, drop_rate=0.0):
        if self.training:
            rates.append((self.dropblock is not None, float(drop_rate)))
        return original(self, x, drop_rate)

    monkeypatch.setattr(ResNet12Block, "forward", spy)
    kw = ["model.backbone=resnet12", "val.every=0", "train.checkpoint_every=4",
          "model.backbone_kwargs={widths: [4, 4, 8, 8], drop_rate: 0.2, dropblock_ramp_steps: 30}"]
    cfg = _cfg(tiny_fmnist_overrides + kw)
    train(cfg, tmp_path / "part", log=quiet, overrides=["train.max_steps=13"])
    ck = load_checkpoint(tmp_path / "part" / "last.pt")
    assert ck["step"] == 12 and int(ck["model"]["num_steps"]) == 12
    rates.clear()
    train(Config(), tmp_path / "part", resume=True, log=quiet)  # steps 12..17
    drop = [r for db, r in rates if not db]
    block = [r for db, r in rates if db]
    assert drop == pytest.approx([0.2] * len(drop)) and len(drop) == 2 * 6
    assert block[::2] == pytest.approx([0.2 * s / 30 for s in range(12, 18)])
    assert int(load_checkpoint(tmp_path / "part" / "last.pt")["model"]["num_steps"]) == 18


@needs_fmnist
def test_max_steps_caps_one_launch_and_a_plain_resume_finishes_exactly(tmp_path, tiny_fmnist_overrides):
    """train.max_steps stops a launch as if interrupted (nothing saved after the last checkpoint); given
    again on resume it caps that launch too (a cap already reached trains nothing); a plain resume drops
    it and ends where an uninterrupted run ends."""
    import yaml
    cfg = _cfg(tiny_fmnist_overrides + ["val.every=0", "train.checkpoint_every=5"])
    full = train(cfg, tmp_path / "full", log=quiet)
    run = tmp_path / "part"
    assert train(cfg, run, log=quiet, overrides=["train.max_steps=7"]) == {"stopped_at_step": 7, "run_dir": str(run)}
    ck = load_checkpoint(run / "last.pt")
    assert ck["step"] == 5 and ck["config"]["train"]["max_steps"] == 7
    again = train(Config(), run, resume=True, log=quiet, overrides=["train.max_steps=12"])
    assert again["stopped_at_step"] == 12 and load_checkpoint(run / "last.pt")["step"] == 10
    assert train(Config(), run, resume=True, log=quiet, overrides=["train.max_steps=3"])["stopped_at_step"] == 10
    assert load_checkpoint(run / "last.pt")["step"] == 10
    done = train(Config(), run, resume=True, log=quiet)
    drop = lambda r: {k: v for k, v in r.items() if k not in ("epoch_seconds", "run_dir")}  # noqa: E731
    assert drop(done) == drop(full) and "stopped_at_step" not in done
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(run / "last.pt")
    for part in ("model", "head"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert b["config"]["train"]["max_steps"] is None
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] is None
    for bad in ("0", "-3", "1.5", "many"):
        with pytest.raises(ConfigError, match="train.max_steps"):
            _cfg([f"train.max_steps={bad}"])


CHECKPOINT_KEYS = ["kind", "model", "head", "optimizer", "scaler", "rng", "epoch", "step", "epoch_step",
                   "epoch_stats", "best", "config", "class_names", "data", "version"]


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _tiny_state(seed, run_dir):
    import torch.nn.functional as F
    from lowshot.config import to_dict
    from lowshot.models import build_model
    from lowshot.train import build_optimizer
    from lowshot.training.state import EpochMeter, FiniteGuard, TrainState
    cfg = Config()
    torch.manual_seed(seed)
    model = build_model(cfg, 5, 1, 28)
    state = TrainState(model, build_optimizer(cfg, model), torch.amp.GradScaler("cuda", enabled=False),
                       EpochMeter(torch.device("cpu")), FiniteGuard(run_dir),
                       {"config": to_dict(cfg), "class_names": list("abcde"), "data": {"channels": 1}})
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 5
    logits = model(x, y)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    state.optimizer.step()  # the optimiser has state (momentum buffers) to store
    state.meter.add(loss, logits, y, 5)
    return state


def test_train_state_round_trip_keeps_the_checkpoint_layout(tmp_path):
    """state_dict -> save (weights_only loadable) -> restore into another state gives back the same dict."""
    a = _tiny_state(0, tmp_path)
    a.epoch, a.step, a.epoch_step, a.best = 1, 12, 3, 55.0
    a.save([tmp_path / "last.pt"])
    ck = load_checkpoint(tmp_path / "last.pt")  # weights_only=True
    assert list(ck) == CHECKPOINT_KEYS and ck["kind"] == "train" and ck["epoch_stats"]["seen"] == 8
    assert a.guard.saved == (2, 12)
    b = _tiny_state(1, tmp_path)  # other weights, other optimiser state
    b.restore(ck, tmp_path / "last.pt")
    assert (b.epoch, b.step, b.epoch_step, b.best, b.guard.saved) == (1, 12, 3, 55.0, (2, 12))
    got = b.state_dict()
    assert all(_same(ck[k], got[k]) for k in CHECKPOINT_KEYS if k not in ("rng", "version"))


def test_train_state_never_saves_a_non_finite_state(tmp_path):
    from lowshot.errors import CheckpointError
    a = _tiny_state(0, tmp_path)
    a.save([tmp_path / "last.pt"])
    before = (tmp_path / "last.pt").read_bytes()
    with torch.no_grad():
        next(a.model.head.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"^head\..* is not finite"):
        a.save([tmp_path / "last.pt"])
    assert (tmp_path / "last.pt").read_bytes() == before
    ck = load_checkpoint(tmp_path / "last.pt")
    ck["head"] = {}
    with pytest.raises(CheckpointError, match="do not fit the head"):
        _tiny_state(0, tmp_path).restore(ck, tmp_path / "last.pt")
