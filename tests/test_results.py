"""The result dataclasses (lowshot.results) are the contract between the tools that write JSON and
the report that reads it: every writer's file, from a tiny real run, round-trips through its class."""
import json

import numpy as np
import pytest

from lowshot.config import load_config
from lowshot.errors import DataError
from lowshot.results import (DecoupleResult, EvalResult, PhiAnalysis, Protocol, SweepPoint, SweepSummary,
                             fewshot_items)

from conftest import ROOT, needs_fmnist

CFG = ROOT / "configs" / "fashion_mnist" / "conv4_neg_cosine.yaml"
LT_CFG = ROOT / "configs" / "fashion_mnist_lt" / "conv4_joint.yaml"
TINY = ["data.options={max_per_class: 20}", "train.epochs=1", "train.batch_size=32", "train.max_steps_per_epoch=2",
        "val.every=0", "train.progress=false", "head.name=linear", "head.margin=0", "head.scale=null"]

pytestmark = pytest.mark.usefixtures("single_thread")


def quiet(_msg):
    pass


def _round_trip(cls, path):
    data = json.loads(path.read_text())
    record = cls.from_dict(data, str(path))
    assert record.to_dict() == data  # exactly the JSON on disk: nothing lost, nothing guessed
    return record


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import have_fmnist
    if not have_fmnist():
        pytest.skip("Fashion-MNIST not installed")
    from lowshot.train import train
    run = tmp_path_factory.mktemp("results") / "run"
    train(load_config(CFG, TINY), run, log=quiet)
    return run


# ----------------------------------------------------------------------------- one test per writer

@needs_fmnist
def test_eval_on_a_checkpoint_round_trips(tiny_run, tmp_path):
    from lowshot.fewshot.cli import run_eval
    run_eval(tiny_run / "best.pt", shots=[1, 5], episodes=5, method="ncm", device="cpu", out=tmp_path / "e.json",
             log=quiet)
    ev = _round_trip(EvalResult, tmp_path / "e.json")
    assert [r.shot for r in ev.results] == [1, 5] and ev.checkpoint and ev.features is None
    assert len(ev.results[0].accuracies) == 5


def test_eval_on_a_features_file_round_trips(tmp_path):
    from lowshot.fewshot.feature_files import run_features_eval
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 10)
    x = rng.normal(size=(60, 8)).astype(np.float32) + 5 * np.eye(8, dtype=np.float32)[y]
    np.savez(tmp_path / "f.npz", features=x, labels=y)
    run_features_eval(tmp_path / "f.npz", method="ncm", shots=[1], query=4, episodes=3, device="cpu",
                      out=tmp_path / "eval_f.json", log=quiet)
    ev = _round_trip(EvalResult, tmp_path / "eval_f.json")
    assert ev.features and ev.checkpoint is None and ev.results[0].method == "ncm"


@needs_fmnist
def test_analysis_json_round_trips(tiny_run, tmp_path):
    from lowshot.analysis import analyze_checkpoint
    from lowshot.pipelines import analyze_with_figures
    analyze_checkpoint(tiny_run / "best.pt", ["base"], out_dir=tmp_path / "a", device="cpu", log=quiet)
    a = _round_trip(PhiAnalysis, tmp_path / "a" / "analysis.json")
    assert set(a.splits) == {"base"} and a.splits["base"].split == "base_test" and a.projections == {}
    analyze_with_figures(tiny_run / "best.pt", ["novel"], out_dir=tmp_path / "p", projection="pca", classes=2,
                         per_class=5, device="cpu", log=quiet)
    p = _round_trip(PhiAnalysis, tmp_path / "p" / "analysis.json")
    assert p.projections == {"novel": "projection_novel.png"} and (tmp_path / "p" / "projection_novel.png").is_file()


@needs_fmnist
def test_decouple_json_round_trips(tiny_run, tmp_path):
    from lowshot.longtail import decouple_checkpoint
    path, _ = decouple_checkpoint(tiny_run / "best.pt", "ncm", out=tmp_path / "decouple_ncm.pt",
                                  test_split="base_test", log=quiet)
    d = _round_trip(DecoupleResult, path.with_suffix(".json"))
    assert d.method == "ncm" and d.joint is not None and d.joint_head == "linear" and d.metrics.per_class


@needs_fmnist
def test_generalized_json_round_trips(tiny_run, tmp_path):
    from lowshot.fewshot.generalized import GeneralizedReport
    from lowshot.fewshot.protocol import run_generalized_eval
    run_generalized_eval(tiny_run / "best.pt", way=3, shots=[1], query=2, episodes=3, device="cpu",
                         out=tmp_path / "generalized.json", log=quiet)
    data = json.loads((tmp_path / "generalized.json").read_text())
    assert GeneralizedReport.from_dict(data).to_dict() == data


@needs_fmnist
def test_sweep_result_and_summary_round_trip(tmp_path):
    from lowshot.analysis import run_sweep
    from lowshot.report.sweep import write_summary
    out = tmp_path / "s"
    fixed = [o for o in TINY if not o.startswith("head.")]
    run_sweep(CFG, {"head.margin": [0.0]}, out, seeds=[0], protocols=["5x1"], episodes=4, method="ncm",
              overrides=fixed, log=quiet)
    (name,) = [p.name for p in out.iterdir() if p.is_dir()]
    point = _round_trip(SweepPoint, out / name / "result.json")
    assert point.config["head"]["margin"] == 0.0 and point.held_out_split == "base_test"
    assert point.held_out_acc == point.base_acc is not None
    summary = _round_trip(SweepSummary, out / "sweep.json")
    assert summary.aggregate is None and summary.seeds == [0]
    write_summary(out)  # the report layer adds the seed aggregate to the same file
    assert _round_trip(SweepSummary, out / "sweep.json").aggregate[0]["n"] == 1


@needs_fmnist
def test_long_tail_sweep_shows_the_held_out_accuracy(tmp_path):
    """A long-tail config has no base split: the table shows the accuracy on its test split (val), not '-'."""
    from lowshot.pipelines import sweep_with_summary
    from lowshot.fileio import read_jsonl
    out = tmp_path / "lt"
    res = sweep_with_summary(LT_CFG, {"optim.lr": [0.05]}, out, overrides=["train.epochs=1",
                             "train.max_steps_per_epoch=2", "train.batch_size=32", "train.progress=false"], log=quiet)
    (r,) = res
    val_acc = read_jsonl(out / r["name"] / "metrics.jsonl")[-1]["val_acc"]
    assert r["base_acc"] is None and r["held_out_split"] == "val" and r["held_out_acc"] == val_acc
    lines = (out / "sweep.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| point |"))
    row = next(line for line in lines if line.startswith(f"| {r['name']} |"))
    assert "| val acc % |" in header and f"| {val_acc:.2f} |" in row


# ----------------------------------------------------------------------------- strict readers

def test_malformed_records_name_the_file_and_key():
    with pytest.raises(DataError, match=r"r.json: missing key 'fewshot'"):
        SweepPoint.from_dict({"name": "a", "point": {}, "phi": {}}, "r.json")
    with pytest.raises(DataError, match=r"r.json fewshot.5x1: key 'ci95' should be int/float"):
        SweepPoint.from_dict({"name": "a", "point": {}, "phi": {}, "fewshot": {"5x1": {"mean": 1, "ci95": "x"}}},
                             "r.json")
    with pytest.raises(DataError, match=r"sweep.json points\[0\]: missing key 'name'"):
        SweepSummary.from_dict({"grid": {}, "axis": None, "points": [{}]}, "sweep.json")
    with pytest.raises(DataError, match=r"analysis.json splits.base: missing key 'space'"):
        PhiAnalysis.from_dict({"splits": {"base": {"phi": 1.0}}}, "analysis.json")
    with pytest.raises(DataError, match=r"x.json: expected a JSON object, got list"):
        EvalResult.from_dict([], "x.json")
    with pytest.raises(DataError, match=r"e.json results\[0\]: key 'way' should be int, got bool"):
        EvalResult.from_dict({"checkpoint": "c", "results": [{"way": True}]}, "e.json")


def test_sweep_points_written_before_protocols_still_read():
    old = {"name": "head.margin=0.1", "point": {"head.margin": 0.1}, "epoch": 2, "base_acc": 80.0,
           "fewshot": {"1": {"mean": 50.0, "ci95": 1.0}}, "phi": {"base": {"phi": 2.0, "space": "l2"}},
           "protocol": {"way": 10, "shots": [1], "episodes": 100, "method": "finetune"}}
    p = SweepPoint.from_dict(old)
    assert p.held_out_acc is None and p.phi["base"].phi == 2.0
    assert [(k, proto) for k, proto, _ in fewshot_items(p.to_dict())] == [("1", Protocol(10, 1))]


def test_tables_use_the_held_out_split_when_there_is_no_base_accuracy():
    from lowshot.report.seeds import aggregate_seeds
    from lowshot.report.sweep import seed_table, sweep_table
    rows = [{"name": f"optim.lr={lr}", "point": {"optim.lr": lr}, "epoch": 1, "base_acc": None,
             "held_out_split": "val", "held_out_acc": acc, "fewshot": {}, "phi": {}} for lr, acc in ((0.1, 40.0),)]
    header, table = sweep_table(rows)
    assert header[2] == "val acc %" and table[0][2] == "40.00"
    seeded = [{**rows[0], "name": f"optim.lr=0.1,train.seed={s}", "point": {"optim.lr": 0.1, "train.seed": s},
               "held_out_acc": 40.0 + 2 * s} for s in (0, 1)]
    header, table = seed_table(aggregate_seeds(seeded))
    assert header[2] == "val acc %" and table[0][2] == "41.00 ± 1.41"
    # few-shot sweeps keep their column
    assert sweep_table([{**rows[0], "base_acc": 50.0}])[0][2] == "base acc %"
