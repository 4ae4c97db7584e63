"""Sweep grid parsing, and a resumable margin sweep on tiny real Fashion-MNIST runs."""
import json

import pytest

import lowshot.train as train_mod
from lowshot.analysis import expand_grid, parse_axis, parse_sweep_args, point_name, run_sweep, split_values
from lowshot.analysis.sweep import config_difference
from lowshot.cli import main
from lowshot.config import load_config, to_dict
from lowshot.errors import ConfigError

from conftest import ROOT, needs_fmnist

CFG = ROOT / "configs" / "fashion_mnist" / "conv4_neg_cosine.yaml"
# 20 images per class: 2 steps of 32 base images, novel episodes of 5 shots + 15 queries still fit
FIXED = ["data.options={max_per_class: 20}", "train.epochs=1", "train.batch_size=32", "train.max_steps_per_epoch=2",
         "val.every=0", "train.progress=false", "train.checkpoint_every=1"]


def quiet(_msg):
    pass


# ----------------------------------------------------------------------------- parsing

def test_split_values_keeps_bracketed_values_whole():
    assert split_values("-0.3,-0.1,0") == ["-0.3", "-0.1", "0"]
    assert split_values("[0.5,1.0],[0.8,1.0]") == ["[0.5,1.0]", "[0.8,1.0]"]
    assert split_values("{a: 1, b: [2,3]},{}") == ["{a: 1, b: [2,3]}", "{}"]
    assert split_values("'x,y',z") == ["'x,y'", "z"]


def test_parse_axis_parses_values_like_overrides():
    assert parse_axis("head.margin=-0.3,-0.1,0,0.05") == ("head.margin", [-0.3, -0.1, 0, 0.05])
    assert parse_axis("augment.crop_scale=[0.5,1.0],[0.8,1.0]") == ("augment.crop_scale", [[0.5, 1.0], [0.8, 1.0]])
    assert parse_axis("head.name=cosine,linear") == ("head.name", ["cosine", "linear"])
    assert parse_axis("train.compile=true,false") == ("train.compile", [True, False])
    with pytest.raises(ConfigError, match="empty value"):
        parse_axis("head.margin=0,,0.1")


def test_single_valued_keys_are_fixed_overrides():
    grid, fixed = parse_sweep_args(["head.margin=-0.1,0", "train.epochs=1", "optim.lr=0.1,0.05"])
    assert grid == {"head.margin": [-0.1, 0], "optim.lr": [0.1, 0.05]}
    assert fixed == ["train.epochs=1"]
    # the first key is always an axis (a one-point sweep is still named by it)
    assert parse_sweep_args(["head.margin=0", "train.epochs=1"]) == ({"head.margin": [0]}, ["train.epochs=1"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_sweep_args(["head.margin=0,1", "head.margin=2,3"])


def test_expand_grid_order_and_point_names():
    pts = expand_grid({"head.margin": [-0.1, 0], "optim.lr": [0.1, 0.05]})
    assert pts == [{"head.margin": -0.1, "optim.lr": 0.1}, {"head.margin": -0.1, "optim.lr": 0.05},
                   {"head.margin": 0, "optim.lr": 0.1}, {"head.margin": 0, "optim.lr": 0.05}]
    assert point_name(pts[0]) == "head.margin=-0.1,optim.lr=0.1"
    assert point_name({"augment.crop_scale": [0.5, 1.0]}) == "augment.crop_scale=[0.5,1.0]"
    assert point_name({"data.root": "/a b"}) == "data.root=_a_b"  # never a path separator
    with pytest.raises(ConfigError, match="empty sweep grid"):
        expand_grid({})
    with pytest.raises(ConfigError, match="non-empty list"):
        expand_grid({"head.margin": []})


def test_config_difference_ignores_machine_keys_and_new_defaults():
    a = to_dict(load_config(CFG))
    b = to_dict(load_config(CFG, ["train.device=cpu", "train.progress=false", "name=x", "eval.episodes=5"]))
    assert config_difference(a, b) is None
    c = to_dict(load_config(CFG, ["head.margin=0.2"]))
    assert config_difference(a, c) == "head.margin: stored -0.1, requested 0.2"
    old = to_dict(load_config(CFG))
    del old["train"]["grad_clip"]  # a run stored before a key existed: default fills in
    assert config_difference(old, a) is None


def test_bad_grid_fails_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("trained before validating the grid"))
    with pytest.raises(ConfigError, match="head.margn"):
        run_sweep(CFG, {"head.margn": [0, 1]}, tmp_path, log=quiet)
    with pytest.raises(ConfigError, match="train.epochs"):
        run_sweep(CFG, {"head.margin": [0.0], "train.epochs": [1, -1]}, tmp_path, log=quiet)
    with pytest.raises(ConfigError, match="duplicates"):
        run_sweep(CFG, {"head.margin": [0, 0.0]}, tmp_path, log=quiet)
    # a folder in the way that is not a lowshot run is never emptied
    (tmp_path / "head.margin=0.5").mkdir()
    (tmp_path / "head.margin=0.5" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"no last.pt to resume but holds other files \(notes.txt\)"):
        run_sweep(CFG, {"head.margin": [0.5]}, tmp_path, log=quiet)
    assert (tmp_path / "head.margin=0.5" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- end to end

@pytest.fixture
def counted_train(monkeypatch):
    calls = []
    real = train_mod.train

    def spy(cfg, run_dir=None, **kw):
        calls.append((str(run_dir), kw.get("resume", False)))
        return real(cfg, run_dir, **kw)

    monkeypatch.setattr(train_mod, "train", spy)
    return calls


@needs_fmnist
def test_margin_sweep_is_resumable_and_tabulated(tmp_path, counted_train, monkeypatch):
    out = tmp_path / "sweep"
    kw = dict(shots=[1, 5], episodes=20, method="ncm", overrides=FIXED, log=quiet)
    res = run_sweep(CFG, {"head.margin": [-0.1, 0.1]}, out, **kw)
    assert [r["name"] for r in res] == ["head.margin=-0.1", "head.margin=0.1"]
    assert [c[1] for c in counted_train] == [False, False]
    for r in res:
        assert r["point"]["head.margin"] in (-0.1, 0.1) and r["epoch"] == 1
        assert 20 <= r["base_acc"] <= 100  # held-out base images, from metrics.jsonl
        assert set(r["fewshot"]) == {"1", "5"} and r["fewshot"]["5"]["ci95"] > 0
        assert r["phi"]["base"]["split"] == "base_test" and r["phi"]["novel"]["split"] == "novel"
        assert r["phi"]["novel"]["phi"] > 0 and r["phi"]["novel"]["space"] == "l2"
        assert r["protocol"]["episodes"] == 20 and r["protocol"]["method"] == "ncm"
        stored = json.loads((out / r["name"] / "result.json").read_text())
        assert stored["config"]["head"]["margin"] == r["point"]["head.margin"]
        assert stored["fewshot"] == r["fewshot"]

    # summary files: the table shows exactly the per-point numbers
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["axis"] == "head.margin" and summary["grid"] == {"head.margin": [-0.1, 0.1]}
    assert [p["name"] for p in summary["points"]] == ["head.margin=-0.1", "head.margin=0.1"]
    md = (out / "sweep.md").read_text()
    for r in res:
        row = next(line for line in md.splitlines() if line.startswith(f"| {r['name']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == f"{r['base_acc']:.2f}"
        assert cells[3] == f"{r['fewshot']['1']['mean']:.2f} ± {r['fewshot']['1']['ci95']:.2f}"
        assert cells[6] == f"{r['phi']['novel']['phi']:.4g}"
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    # same call again: nothing is trained, same results
    counted_train.clear()
    again = run_sweep(CFG, {"head.margin": [-0.1, 0.1]}, out, **kw)
    assert counted_train == []
    assert [r["fewshot"] for r in again] == [r["fewshot"] for r in res]

    # an interrupted point resumes from last.pt; finished points are untouched
    cfg0 = load_config(CFG, FIXED + ["head.margin=0", "name=head.margin=0"])
    part = train_mod.train(cfg0, out / "head.margin=0", log=quiet, stop_after_steps=1)
    assert part["stopped_at_step"] == 1 and not (out / "head.margin=0" / "result.json").exists()
    counted_train.clear()
    res3 = run_sweep(CFG, {"head.margin": [-0.1, 0, 0.1]}, out, **kw)
    assert counted_train == [(str(out / "head.margin=0"), True)]
    assert [r["name"] for r in res3] == ["head.margin=-0.1", "head.margin=0", "head.margin=0.1"]
    assert res3[1]["epoch"] == 1 and (out / "head.margin=0" / "result.json").is_file()

    # another evaluation protocol re-evaluates without retraining
    counted_train.clear()
    res4 = run_sweep(CFG, {"head.margin": [-0.1]}, out, **{**kw, "shots": [1], "episodes": 10})
    assert counted_train == [] and set(res4[0]["fewshot"]) == {"1"} and res4[0]["protocol"]["episodes"] == 10

    # a different training config for an existing point is refused, naming the key
    with pytest.raises(ConfigError, match=r"train.batch_size: stored 32, requested 16"):
        run_sweep(CFG, {"head.margin": [-0.1]}, out, **{**kw, "overrides": FIXED + ["train.batch_size=16"]})


@needs_fmnist
def test_diverged_point_is_reported_and_the_sweep_goes_on(tmp_path, counted_train):
    out = tmp_path / "d"
    fixed = FIXED + ["head.name=linear", "head.margin=0", "head.scale=null"]
    res = run_sweep(CFG, {"optim.lr": [1e30, 1e31]}, out, shots=[1], episodes=10, method="ncm", overrides=fixed,
                    log=quiet)
    assert len(counted_train) == 2  # the first divergence did not stop the sweep
    assert all("loss is" in r["error"] for r in res) and not (out / "optim.lr=1e+30" / "result.json").exists()
    md = (out / "sweep.md").read_text()
    assert "| optim.lr=1e+30 (diverged) | - | - | - |" in md and "| optim.lr=1e+31 (diverged) |" in md
    counted_train.clear()
    run_sweep(CFG, {"optim.lr": [1e30]}, out, shots=[1], episodes=10, method="ncm", overrides=fixed, log=quiet)
    assert len(counted_train) == 1  # not finished: retried


@needs_fmnist
def test_cli_sweep_reuses_finished_points(tmp_path, counted_train, capsys):
    out = tmp_path / "s"
    args = ["sweep", str(CFG), "head.margin=-0.2", *FIXED, "--out", str(out), "--shots", "1",
            "--episodes", "10", "--method", "ncm"]
    assert main(args) == 0
    assert counted_train == [(str(out / "head.margin=-0.2"), False)]
    assert "| head.margin=-0.2 |" in capsys.readouterr().out
    assert main(args) == 0
    assert len(counted_train) == 1 and "finished earlier" in capsys.readouterr().out
    assert main(["sweep", str(CFG), "head.margn=0,1", "--out", str(out)]) == 2
    assert "did you mean 'head.margin'" in capsys.readouterr().err
