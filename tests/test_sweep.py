"""Sweep grid parsing, and a resumable margin sweep on tiny real Fashion-MNIST runs."""
import json

import pytest

import lowshot.train as train_mod
from lowshot.analysis import expand_grid, parse_axis, parse_sweep_args, point_name, run_sweep, split_values
from lowshot.analysis.grid import config_difference
from lowshot.cli import main
from lowshot.config import load_config, to_dict
from lowshot.errors import ConfigError
from lowshot.pipelines import sweep_with_summary

from conftest import OMNIGLOT_DIR, ROOT, needs_fmnist, needs_omniglot

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
    res = sweep_with_summary(CFG, {"head.margin": [-0.1, 0.1]}, out, **kw)
    assert [r["name"] for r in res] == ["head.margin=-0.1", "head.margin=0.1"]
    assert [c[1] for c in counted_train] == [False, False]
    for r in res:
        assert r["point"]["head.margin"] in (-0.1, 0.1) and r["epoch"] == 1
        assert 20 <= r["base_acc"] <= 100  # held-out base images, from metrics.jsonl
        assert set(r["fewshot"]) == {"5x1", "5x5"} and r["fewshot"]["5x5"]["ci95"] > 0
        assert r["fewshot"]["5x1"]["way"] == 5 and r["fewshot"]["5x1"]["within"] is None
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
        assert cells[3] == f"{r['fewshot']['5x1']['mean']:.2f} ± {r['fewshot']['5x1']['ci95']:.2f}"
        assert cells[6] == f"{r['phi']['novel']['phi']:.4g}"
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    # same call again: nothing is trained, same results
    counted_train.clear()
    again = run_sweep(CFG, {"head.margin": [-0.1, 0.1]}, out, **kw)
    assert counted_train == []
    assert [r["fewshot"] for r in again] == [r["fewshot"] for r in res]

    # an interrupted point resumes from last.pt; finished points are untouched
    cfg0 = load_config(CFG, FIXED + ["head.margin=0", "name=head.margin=0"])
    part = train_mod.train(cfg0, out / "head.margin=0", log=quiet, overrides=["train.max_steps=1"])
    assert part["stopped_at_step"] == 1 and not (out / "head.margin=0" / "result.json").exists()
    counted_train.clear()
    res3 = run_sweep(CFG, {"head.margin": [-0.1, 0, 0.1]}, out, **kw)
    assert counted_train == [(str(out / "head.margin=0"), True)]
    assert [r["name"] for r in res3] == ["head.margin=-0.1", "head.margin=0", "head.margin=0.1"]
    assert res3[1]["epoch"] == 1 and (out / "head.margin=0" / "result.json").is_file()

    # another evaluation protocol re-evaluates without retraining
    counted_train.clear()
    res4 = run_sweep(CFG, {"head.margin": [-0.1]}, out, **{**kw, "shots": [1], "episodes": 10})
    assert counted_train == [] and set(res4[0]["fewshot"]) == {"5x1"} and res4[0]["protocol"]["episodes"] == 10

    # a different training config for an existing point is refused, naming the key
    with pytest.raises(ConfigError, match=r"train.batch_size: stored 32, requested 16"):
        run_sweep(CFG, {"head.margin": [-0.1]}, out, **{**kw, "overrides": FIXED + ["train.batch_size=16"]})


@needs_fmnist
def test_diverged_point_is_reported_and_the_sweep_goes_on(tmp_path, counted_train):
    out = tmp_path / "d"
    fixed = FIXED + ["head.name=linear", "head.margin=0", "head.scale=null"]
    res = sweep_with_summary(CFG, {"optim.lr": [1e30, 1e31]}, out, shots=[1], episodes=10, method="ncm",
                             overrides=fixed, log=quiet)
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


# ----------------------------------------------------------------------------- protocols and seeds

from lowshot.report.seeds import aggregate_seeds, margin_effect, stat  # noqa: E402
from lowshot.report.sweep import seed_table  # noqa: E402
from lowshot.results import Protocol, fewshot_items, parse_protocol  # noqa: E402


def test_parse_protocol_and_legacy_keys():
    assert parse_protocol("5x1") == Protocol(5, 1, None)
    assert parse_protocol("20x1@alphabet") == Protocol(20, 1, "alphabet")
    assert parse_protocol("20x1@alphabet").label == "20x1@alphabet"
    assert parse_protocol("20x1@alphabet").title == "20-way 1-shot within alphabet"
    for bad in ("5", "5-1", "1x1", "5x0", "5x1@", "5x1@a b"):
        with pytest.raises(ConfigError, match="WAYxSHOT"):
            parse_protocol(bad)
    # sweeps written before protocols existed keyed results by shot; their way is the protocol's
    old = {"protocol": {"way": 10}, "fewshot": {"1": {"mean": 50.0, "ci95": 1.0}, "5x5@alphabet": {"mean": 1}}}
    assert [(k, p) for k, p, _ in fewshot_items(old)] == [("1", Protocol(10, 1)), ("5x5@alphabet",
                                                                                   Protocol(5, 5, "alphabet"))]


def _run(m, seed, base, fs1, ci1, phi_novel, val=None, error=None):
    r = {"name": f"head.margin={m},train.seed={seed}", "point": {"head.margin": m, "train.seed": seed},
         "base_acc": base, "val_mean": val, "fewshot": {"5x1": {"mean": fs1, "ci95": ci1}},
         "phi": {"base": {"phi": 2.0, "space": "l2"}, "novel": {"phi": phi_novel, "space": "l2"}}}
    if error:
        r.update(error=error, fewshot={}, phi={})
    return r


def test_seed_aggregation_matches_hand_computed_values():
    runs = [_run(-0.1, 0, 80.0, 60.0, 1.0, 1.0, val=70.0), _run(-0.1, 1, 82.0, 64.0, 2.0, 1.5, val=72.0),
            _run(-0.1, 2, 84.0, 62.0, 3.0, 2.0, val=71.0), _run(-0.1, 3, None, None, None, None, error="loss is nan"),
            _run(0, 0, 90.0, 50.0, 1.0, None, val=60.0), _run(0, 1, 91.0, 52.0, 1.0, 3.0, val=61.0)]
    agg = aggregate_seeds(runs)
    assert [a["name"] for a in agg] == ["head.margin=-0.1", "head.margin=0"]
    a, b = agg
    assert a["point"] == {"head.margin": -0.1} and a["seeds"] == [0, 1, 2] and a["diverged"] == [3] and a["n"] == 3
    # mean 82, sample std sqrt(((-2)^2 + 0 + 2^2) / 2) = 2
    assert a["base_acc"]["mean"] == pytest.approx(82.0) and a["base_acc"]["std"] == pytest.approx(2.0)
    f = a["fewshot"]["5x1"]
    assert f["mean"] == pytest.approx(62.0) and f["std"] == pytest.approx(2.0)
    assert f["ci95"] == pytest.approx(2.0) and (f["way"], f["shot"], f["within"]) == (5, 1, None)
    assert a["phi"]["novel"]["mean"] == pytest.approx(1.5) and a["phi"]["novel"]["std"] == pytest.approx(0.5)
    # two seeds: std = |x1 - x2| / sqrt(2); an infinite phi (None) makes the mean undefined, not 3.0
    assert b["base_acc"]["std"] == pytest.approx(1 / 2 ** 0.5)
    assert b["phi"]["novel"]["mean"] is None
    assert stat([5.0]) == {"mean": 5.0, "std": None, "n": 1, "values": [5.0]}

    header, rows = seed_table(agg)
    assert header[:4] == ["point", "seeds", "base acc %", "novel 5-way 1-shot %"]
    assert rows[0] == ["head.margin=-0.1", "0,1,2 (1 diverged)", "82.00 ± 2.00", "62.00 ± 2.00 [2.00]",
                       "2 ± 0", "1.5 ± 0.5"]
    assert rows[1][5] == "inf"

    # differences to margin 0: 62 - 51 = +11, SE = sqrt(2^2/3 + 2/2) (std at 0: sqrt(2))
    lines = margin_effect(agg, "head.margin")
    assert lines[0].startswith("chosen on validation (highest mean val accuracy over seeds): head.margin=-0.1")
    novel = next(line for line in lines if line.startswith("novel 5-way 1-shot"))
    assert f"-0.1*: +11.00 (SE {(4 / 3 + 1) ** 0.5:.2f})" in novel
    base = next(line for line in lines if line.startswith("base acc"))
    assert "-0.1*: -8.50" in base
    # same seeds at both margins: paired differences 60-50, 64-52 -> mean +11, SE = stdev(10, 12)/sqrt(2) = 1
    paired = aggregate_seeds(runs[:2] + runs[4:])
    novel = next(line for line in margin_effect(paired, "head.margin") if line.startswith("novel"))
    assert "-0.1*: +11.00 (paired SE 1.00)" in novel


def test_sweep_figure_error_bars_are_the_seed_std(tmp_path, monkeypatch):
    import lowshot.report.figures as figures
    captured = {}
    real_save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure",
                        lambda fig, path: captured.setdefault("fig", fig) and real_save(fig, path))
    runs = [_run(m, s, 80.0 + s + 10 * m, 60.0 - 2 * s - 10 * m, 1.0, 1.0 + s) for m in (-0.1, 0.1) for s in (0, 1, 2)]
    path = figures.plot_sweep(runs, "head.margin", tmp_path / "f.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    ax_acc, ax_phi = captured["fig"].axes
    from matplotlib.container import ErrorbarContainer
    bars = {c.get_label(): c for c in ax_acc.containers if isinstance(c, ErrorbarContainer)}
    assert set(bars) == {"base classes", "novel 5-way 1-shot"}
    # base at margin -0.1: values 79, 80, 81 -> mean 80, std 1: the bar spans 79..81
    seg = bars["base classes"].lines[2][0].get_segments()[0]
    assert seg[0][0] == pytest.approx(-0.1) and (seg[0][1], seg[1][1]) == (pytest.approx(79.0), pytest.approx(81.0))
    # novel: 61, 59, 57 -> mean 59, std 2 (not the per-episode CI of 1.0)
    seg = bars["novel 5-way 1-shot"].lines[2][0].get_segments()[0]
    assert (seg[0][1], seg[1][1]) == (pytest.approx(57.0), pytest.approx(61.0))
    phi = {c.get_label(): c for c in ax_phi.containers if isinstance(c, ErrorbarContainer)}
    seg = phi["novel"].lines[2][0].get_segments()[0]  # 1, 2, 3 -> 2 ± 1
    assert (seg[0][1], seg[1][1]) == (pytest.approx(1.0), pytest.approx(3.0))
    assert "std over 3 seeds" in ax_acc.get_title()


def test_bad_seeds_and_protocols_fail_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("trained before validating"))
    with pytest.raises(ConfigError, match="seed 0 is given twice"):
        run_sweep(CFG, {"head.margin": [0.0]}, tmp_path, seeds=[0, 0], log=quiet)
    with pytest.raises(ConfigError, match="not both"):
        run_sweep(CFG, {"head.margin": [0.0], "train.seed": [0, 1]}, tmp_path, seeds=[2], log=quiet)
    with pytest.raises(ConfigError, match="--shots .* or as --protocols, not both"):
        run_sweep(CFG, {"head.margin": [0.0]}, tmp_path, shots=[1], protocols=["5x1"], log=quiet)
    with pytest.raises(ConfigError, match="bad few-shot protocol '5-1'"):
        run_sweep(CFG, {"head.margin": [0.0]}, tmp_path, protocols=["5-1"], log=quiet)
    assert main(["sweep", str(CFG), "head.margin=0", "--seeds", "1", "1", "--out", str(tmp_path)]) == 2
    assert "seed 1 is given twice" in capsys.readouterr().err


@needs_fmnist
def test_group_protocol_needs_class_metadata_before_training(tmp_path, monkeypatch):
    from lowshot.errors import DataError
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("trained before validating"))
    with pytest.raises(DataError, match="no class metadata 'alphabet'"):
        run_sweep(CFG, {"head.margin": [0.0]}, tmp_path, protocols=["5x1@alphabet"], overrides=FIXED, log=quiet)


@needs_fmnist
def test_seeded_sweep_runs_each_point_seed_resumably(tmp_path, counted_train):
    out = tmp_path / "seeds"
    kw = dict(protocols=["5x1"], episodes=10, method="ncm", overrides=FIXED, log=quiet)
    res = run_sweep(CFG, {"head.margin": [0.0]}, out, seeds=[0], **kw)
    assert [r["name"] for r in res] == ["head.margin=0.0,train.seed=0"]
    assert counted_train == [(str(out / "head.margin=0.0,train.seed=0"), False)]
    # seed 1 interrupted after one step, then the same sweep with seeds 0 1 2: seed 0 is reused,
    # seed 1 resumes from its last.pt, seed 2 trains from scratch
    cfg1 = load_config(CFG, FIXED + ["head.margin=0.0", "train.seed=1", "name=head.margin=0.0,train.seed=1"])
    train_mod.train(cfg1, out / "head.margin=0.0,train.seed=1", log=quiet, overrides=["train.max_steps=1"])
    counted_train.clear()
    res = sweep_with_summary(CFG, {"head.margin": [0.0]}, out, seeds=[0, 1, 2], **kw)
    assert counted_train == [(str(out / "head.margin=0.0,train.seed=1"), True),
                             (str(out / "head.margin=0.0,train.seed=2"), False)]
    stored = [json.loads((out / r["name"] / "result.json").read_text()) for r in res]
    assert [s["config"]["train"]["seed"] for s in stored] == [0, 1, 2]
    assert len({s["fewshot"]["5x1"]["mean"] for s in stored}) > 1  # the seeds train different models
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["seeds"] == [0, 1, 2]
    (agg,) = summary["aggregate"]
    vals = [s["fewshot"]["5x1"]["mean"] for s in stored]
    import statistics
    assert agg["n"] == 3 and agg["fewshot"]["5x1"]["mean"] == pytest.approx(statistics.fmean(vals))
    assert agg["fewshot"]["5x1"]["std"] == pytest.approx(statistics.stdev(vals))
    md = (out / "sweep.md").read_text()
    assert "| head.margin=0.0 | 0,1,2 |" in md and "mean ± sample std over seeds" in md
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    counted_train.clear()
    run_sweep(CFG, {"head.margin": [0.0]}, out, seeds=[0, 1, 2], **kw)
    assert counted_train == []


@needs_omniglot
def test_within_alphabet_protocol_groups_episodes_by_the_novel_alphabets(tmp_path, monkeypatch):
    import lowshot.fewshot.protocol as protocol   # the one checkpoint-level meta-test (eval and sweep)
    seen = []
    real = protocol.evaluate

    def spy(features, labels, **kw):
        seen.append((kw["way"], kw["shot"], kw.get("groups"), labels, kw["class_names"]))
        return real(features, labels, **kw)

    monkeypatch.setattr(protocol, "evaluate", spy)
    cfg = ROOT / "configs" / "omniglot" / "margin_study.yaml"
    res = run_sweep(cfg, {"head.margin": [0.0]}, tmp_path / "om", seeds=[0], protocols=["5x1", "20x1@alphabet"],
                    episodes=10, overrides=[f"data.root={OMNIGLOT_DIR}", "train.epochs=1",
                                            "train.max_steps_per_epoch=1", "val.every=0", "train.progress=false"], log=quiet)
    (r,) = res
    assert set(r["fewshot"]) == {"5x1", "20x1@alphabet"} and r["fewshot"]["20x1@alphabet"]["within"] == "alphabet"
    (way5, _, g5, _, _), (way20, shot, groups, labels, names) = seen
    assert (way5, g5) == (5, None) and (way20, shot) == (20, 1)
    # one alphabet per sample, lined up with the features: the alphabet of the sample's own class
    assert groups == [names[int(y)].split("/")[0] for y in labels]
    assert len(set(groups)) >= 2  # the novel split holds several alphabets, episodes stay inside one
