"""``lowshot decouple`` through ``lowshot.cli.main``: exit codes, messages, files written."""
from __future__ import annotations

import json

import pytest
from conftest import ROOT, needs_fmnist

from lowshot import cli
from lowshot.checkpoint import load_checkpoint
from lowshot.config import load_config
from lowshot.train import train

OPTIONS = "data.options={max_per_class: 60, val_per_class: 10, imbalance_factor: 5}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A barely trained (one step) but complete Fashion-MNIST-LT checkpoint: the CLI plumbing is under test."""
    cfg = load_config(ROOT / "configs/fashion_mnist_lt/conv4_joint.yaml",
                      [OPTIONS, "train.epochs=1", "train.max_steps_per_epoch=1", "train.progress=false",
                       "data.test_split=null"])
    run_dir = tmp_path_factory.mktemp("cli_run")
    train(cfg, run_dir, overwrite=True, log=lambda _m: None)
    return run_dir / "last.pt"


@needs_fmnist
def test_decouple_writes_checkpoint_json_and_prints_table(ckpt, capsys):
    assert cli.main(["decouple", "--checkpoint", str(ckpt), "--method", "ncm", "metric=cosine"]) == 0
    out = capsys.readouterr().out
    assert "cls-mean" in out and "joint (linear)" in out and "by rank" in out and "Ankle boot" in out
    ck = load_checkpoint(ckpt.parent / "decouple_ncm.pt")
    assert ck["kind"] == "decouple" and ck["config"]["head"]["kwargs"] == {"metric": "cosine"}
    res = json.loads((ckpt.parent / "decouple_ncm.json").read_text())
    assert res["options"]["metric"] == "cosine" and len(res["metrics"]["per_class"]) == 10


@needs_fmnist
def test_out_path_alias_and_run_directory(ckpt, tmp_path):
    dest = tmp_path / "tau.pt"
    argv = ["decouple", "--checkpoint", str(ckpt.parent), "--method", "tau", "tau=0.5", "--out", str(dest)]
    assert cli.main(argv) == 0  # a run directory resolves to its best.pt
    res = json.loads(dest.with_suffix(".json").read_text())
    assert res["method"] == "tau_norm" and res["info"]["tau"] == 0.5
    assert res["source"].endswith("best.pt")


@needs_fmnist
def test_user_errors_exit_2_with_one_clear_line(ckpt, capsys):
    base = ["decouple", "--checkpoint", str(ckpt)]
    assert cli.main(base + ["--method", "crt", "epochz=3"]) == 2
    err = capsys.readouterr().err
    assert "no option 'epochz'" in err and "epochs" in err and err.count("\n") == 1
    assert cli.main(base + ["--method", "crtt"]) == 2
    assert "did you mean 'crt'" in capsys.readouterr().err
    assert cli.main(base + ["--method", "lws", "epochs"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert cli.main(base + ["--method", "lws", "epochs=two"]) == 2
    assert "expects an integer" in capsys.readouterr().err
    assert cli.main(["decouple", "--checkpoint", str(ckpt.parent / "nope.pt"), "--method", "ncm"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_list_options(capsys):
    assert cli.main(["decouple", "--method", "lws", "--list-options"]) == 0
    out = capsys.readouterr().out
    assert "epochs=5" in out and "sampler='class_balanced'" in out and "thresholds=" in out
    assert cli.main(["decouple", "--method", "crt", "--list-options"]) == 0
    assert "freeze_bn=True" in capsys.readouterr().out
