"""`lowshot report`: discovery, strict readers (bad files become notes), escaping, self-contained HTML in Chromium."""
import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lowshot.cli import main
from lowshot.config import load_config, to_dict
from lowshot.errors import DataError
from lowshot.report import build_report
from lowshot.results import DecoupleResult, EvalResult

from conftest import ROOT, needs_fmnist

CFG = ROOT / "configs" / "fashion_mnist" / "conv4_neg_cosine.yaml"
CHROMIUM = Path("/usr/bin/chromium")
EVIL = "run <b>&amp;"  # a directory name that must be escaped everywhere


def _png() -> bytes:
    from lowshot.report.figures import new_figure
    import io
    fig = new_figure(2, 2)
    fig.add_subplot().plot([0, 1], [1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _metrics(path: Path, epochs: int = 3) -> None:
    with open(path, "w") as f:
        for e in range(1, epochs + 1):
            f.write(json.dumps({"epoch": e, "step": 10 * e, "train_loss": 2.0 / e, "train_acc": 30.0 + 10 * e,
                                "base_acc": 35.0 + 9 * e, "val_mean": 40.0 + 5 * e, "val_ci95": 1.5,
                                "best": True}) + "\n")


def make_tree(root: Path) -> Path:
    """A demo folder: one training run with every kind of result file, and a 2-point sweep."""
    demo = root / "demo"
    run = demo / EVIL
    (run / "analysis").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config(CFG))))
    _metrics(run / "metrics.jsonl")
    (run / "eval_best_novel_finetune.json").write_text(json.dumps({
        "checkpoint": "best.pt", "split": "novel", "results": [
            {"way": 5, "shot": 1, "method": "finetune", "episodes": 600, "mean": 55.0, "ci95": 0.8,
             "accuracies": [50.0, 60.0]},
            {"way": 5, "shot": 5, "method": "finetune", "episodes": 600, "mean": 77.25, "ci95": 0.61}]}))
    (run / "eval_other.json").write_text(json.dumps({  # the layout of `lowshot eval --features`
        "features": "feats.npz", "head": "cosine", "within": None, "options": {}, "results": [
            {"way": 5, "shot": 5, "method": "ncm", "episodes": 100, "mean": 70.0, "ci95": 1.0}]}))
    (run / "eval_bad.json").write_text("{not json")
    (run / "eval_guessed.json").write_text(json.dumps({"5-shot": {"mean": 71.37, "ci95": 1.0}}))  # no writer's
    per_class = [{"class": i, "name": f"c{i}", "train_count": n, "accuracy": a} for i, (n, a) in
                 enumerate(zip([500, 300, 120, 60, 30, 10, 5], [80, 75, 60, 50, 40, 20, None]))]
    (run / "decouple_tau_norm.json").write_text(json.dumps({
        "method": "tau_norm", "info": {"tau": 0.7, "tau_curve": [[0.0, 50.0], [0.5, 58.0], [1.0, 57.0]]},
        "metrics": {"all": 60.0, "class_mean": 58.0, "many": 71.5, "medium": 55.0, "few": 30.0,
                    "per_class": per_class}}))
    (run / "decouple_crt.json").write_text(json.dumps({"method": "crt", "metrics": {
        "all": 61.0, "many": 66.0, "medium": 60.0, "few": 44.0, "class_mean": 59.0}}))
    (run / "decouple_guessed.json").write_text(json.dumps({"test": {"all": 62.34}}))  # no method / metrics
    rows = [{"class": 0, "name": "a", "train_count": 900, "accuracy": 90.0},
            {"class": 1, "name": "b", "train_count": 9, "accuracy": None}]
    (run / "decouple_lws.json").write_text(json.dumps({  # the layout `lowshot decouple` writes
        "method": "lws", "train_counts": [900, 9], "thresholds": {"many": 100, "few": 20},
        "info": {"tau": 9.9, "scales": [1.0, 2.0]},
        "metrics": {"all": 63.0, "class_mean": 62.0, "many": 80.0, "medium": None, "few": 44.5, "per_class": rows},
        "joint": {"all": 50.0, "class_mean": 45.0, "many": 85.0, "medium": None, "few": 5.0, "per_class": rows},
        "joint_head": "linear"}))
    (run / "analysis" / "projection_novel.png").write_bytes(_png())
    (run / "analysis" / "analysis.json").write_text(json.dumps({
        "head": "cosine", "projections": {"novel": "projection_novel.png"},
        "splits": {"novel": {"phi": 1.75, "space": "l2", "split": "novel",
                             "raw": {"phi": 1.5, "inter": 3.0, "intra": 2.0, "num_classes": 5, "num_samples": 200},
                             "l2": {"phi": 1.75, "inter": 0.35, "intra": 0.2, "num_classes": 5, "num_samples": 200}}}}))
    sweep = demo / "sweep"
    points = []
    for m, acc in ((-0.1, 62.5), (0.1, 58.0)):
        name = f"head.margin={m}"
        (sweep / name).mkdir(parents=True)
        _metrics(sweep / name / "metrics.jsonl", 2)
        res = {"name": name, "point": {"head.margin": m}, "epoch": 2, "base_acc": 80.0 - 10 * m,
               "fewshot": {"1": {"mean": acc, "ci95": 0.9}, "5": {"mean": acc + 15, "ci95": 0.7}},
               "phi": {"base": {"phi": 2.0 + m, "space": "l2", "split": "base_test", "raw": {"phi": 2.1},
                                "l2": {"phi": 2.0 + m, "inter": 1.0, "intra": 0.5}},
                       "novel": {"phi": 1.0 - m, "space": "l2", "split": "novel", "raw": {"phi": 1.1},
                                 "l2": {"phi": 1.0 - m, "inter": 1.0, "intra": 1.0}}},
               "protocol": {"way": 5, "shots": [1, 5], "episodes": 100, "method": "finetune"}}
        (sweep / name / "result.json").write_text(json.dumps({**res, "config": to_dict(load_config(CFG))}))
        points.append(res)
    (sweep / "sweep.json").write_text(json.dumps({"grid": {"head.margin": [-0.1, 0.1]}, "axis": "head.margin",
                                                  "points": points}))
    return demo


# ----------------------------------------------------------------------------- readers

def test_eval_reader_takes_what_lowshot_eval_writes_and_names_the_bad_key():
    ev = EvalResult.from_dict({"checkpoint": "best.pt", "split": "novel", "within": None, "results": [
        {"shot": 1, "way": 5, "method": "ncm", "episodes": 10, "mean": 50.0, "ci95": 1.0,
         "accuracies": [49.0, 51.0]}]}, "eval_x.json")
    (r,) = ev.results
    assert (r.way, r.shot, r.method, r.mean, r.ci95, r.accuracies) == (5, 1, "ncm", 50.0, 1.0, [49.0, 51.0])
    with pytest.raises(DataError, match=r"eval_y.json: not a lowshot eval result"):
        EvalResult.from_dict({"1": {"mean": 40}, "5-shot": {"mean": 60}}, "eval_y.json")
    with pytest.raises(DataError, match=r"eval_z.json results\[0\]: key 'mean' should be int/float"):
        EvalResult.from_dict({"checkpoint": "b.pt", "results": [{"way": 5, "shot": 1, "method": "ncm",
                                                                  "episodes": 1, "mean": "n/a", "ci95": 1}]},
                             "eval_z.json")


def test_decouple_reader_and_tau_curves():
    real = {"method": "lws", "thresholds": {"many": 100, "few": 20}, "info": {"tau": 0.5},
            "metrics": {"all": 60.0, "class_mean": None, "many": None, "medium": None, "few": None,
                        "per_class": [{"accuracy": 70.0, "train_count": 300}]},
            "joint": {"all": 55.0, "class_mean": 50.0, "many": 60.0, "medium": 50.0, "few": 40.0}}
    d = DecoupleResult.from_dict(real, "decouple_lws.json")
    assert d.metrics.all == 60.0 and d.joint.all == 55.0 and d.tau == 0.5 and d.thresholds["many"] == 100
    assert d.metrics.per_class == [{"accuracy": 70.0, "train_count": 300}]
    with pytest.raises(DataError, match=r"decouple_crt.json: missing key 'method'"):
        DecoupleResult.from_dict({"test": {"all": 61.0}}, "decouple_crt.json")
    with pytest.raises(DataError, match=r"decouple_x.json metrics: missing key 'few'"):
        DecoupleResult.from_dict({"method": "x", "metrics": {"all": 1.0, "class_mean": 1.0, "many": 1.0,
                                                             "medium": 1.0}}, "decouple_x.json")
    tau = {"method": "tau_norm", "metrics": real["metrics"]}
    assert DecoupleResult.from_dict({**tau, "info": {"tau_curve": [], "test_curve": [[0.5, 40.0]]}}).tau_curves() \
        == [("test", [(0.5, 40.0)])]
    assert DecoupleResult.from_dict({**tau, "info": {"tau_curve": [[1.0, 50], [0.0, 40]]}}).tau_curves() == \
        [("val", [(0.0, 40.0), (1.0, 50.0)])]
    with pytest.raises(DataError, match="tau_curve"):
        DecoupleResult.from_dict({**tau, "info": {"tau_curve": ["bad"]}}).tau_curves()


# ----------------------------------------------------------------------------- the report

def _imgs(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', html)


def test_report_is_self_contained_escaped_and_complete(tmp_path):
    demo = make_tree(tmp_path)
    out = tmp_path / "report"
    path = build_report([demo], out)
    html = path.read_text()
    assert path == out / "report.html"
    # nothing external: no URL at all, no scripts, every image an inline PNG that decodes
    assert not re.search(r"https?:|//cdn|<script|<link|@import|url\(", html, re.I)
    srcs = _imgs(html)
    assert len(srcs) >= 8 and len(srcs) == html.count("<img ")
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # escaping: the run's name shows up only escaped
    assert "run &lt;b&gt;&amp;amp;" in html and "<b>&amp;" not in html
    # tables carry the numbers of each source
    assert "55.00 ± 0.80" in html and "77.25 ± 0.61" in html and "70.00 ± 1.00" in html  # eval*.json
    assert "62.50 ± 0.90" in html  # sweep point result.json (few-shot table and sweep table)
    assert re.search(r"<td>tau_norm</td><td>60.00</td><td>58.00</td><td>71.50</td><td>55.00</td><td>30.00</td>"
                     r"<td>0.7</td>", html)
    assert re.search(r"<td>crt</td><td>61.00</td><td>59.00</td><td>66.00</td>", html)  # 'all' read as overall
    assert re.search(r"<td>joint \(linear\)</td><td>50.00</td><td>45.00</td><td>85.00</td><td>-</td><td>5.00</td>"
                     r"<td>-</td>", html)  # stage-1 row once; never the thresholds dict; tau not inherited
    assert re.search(r"<td>lws</td><td>63.00</td><td>62.00</td><td>80.00</td><td>-</td><td>44.50</td>", html)
    assert html.count("<td>joint (linear)</td>") == 1
    assert "1.75 (l2)" in html and "head.margin=-0.1" in html
    assert "skipped" in html and "eval_bad.json" in html  # the malformed file is reported, not fatal
    # files of no writer's layout are never guessed at: a note names the file and the key
    assert "eval_guessed.json: not a lowshot eval result" in html and "71.37" not in html
    assert "decouple_guessed.json: missing key &#x27;method&#x27;" in html and "62.34" not in html
    for title in ("Training curves", "Few-shot accuracy", "Margin sweeps", "Feature discriminability (phi)",
                  "Long-tail (decoupled classifiers)"):
        assert f">{title}</h2>" in html
    # Markdown twin: same tables, figures as PNG files saved next to it
    md = (out / "report.md").read_text()
    figs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(figs) == len(srcs) and all((out / f).is_file() for f in figs)
    assert "| demo/run &lt;b&gt;&amp;amp; |" in md and "<b>" not in md and "55.00 ± 0.80" in md
    # rebuilding into the same folder replaces the figures instead of accumulating them
    build_report([demo], out)
    assert len(list(out.glob("fig*.png"))) == len(figs)


def test_sections_without_data_say_so(tmp_path):
    demo = make_tree(tmp_path)
    html = build_report([demo / "sweep"], tmp_path / "r").read_text()
    assert "No data: no decouple_*.json found" in html
    assert "No data: no eval" not in html  # sweep results do provide few-shot numbers
    assert "Long-tail" in html


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        build_report([tmp_path / "missing"], tmp_path / "r")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no lowshot results found"):
        build_report([tmp_path / "empty"], tmp_path / "r")
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2


def test_cli_report(tmp_path, capsys):
    demo = make_tree(tmp_path)
    assert main(["report", str(demo / EVIL), str(demo / "sweep"), "--out", str(tmp_path / "r")]) == 0
    assert "report.html" in capsys.readouterr().out
    assert (tmp_path / "r" / "report.md").is_file()


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="headless Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    demo = make_tree(tmp_path)
    html = build_report([demo], tmp_path / "r").read_text()
    # a probe (in a copy only) writes what the browser decoded into the DOM after the load event
    probe = ("<script>window.addEventListener('load', function () { var d = document.createElement('pre');"
             " d.id = 'probe'; d.textContent = JSON.stringify({widths: Array.from(document.images).map("
             "function (i) { return i.naturalWidth; }), tables: document.querySelectorAll('table').length,"
             " resources: performance.getEntriesByType('resource').map(function (r) { return r.name; })});"
             " document.body.appendChild(d); });</script>")
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", probe + "</body>"))
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}",
           "--dump-dom", page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert m, f"no probe output; chromium rc={done.returncode}, stderr tail: {done.stderr[-500:]}"
    seen = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(seen["widths"]) == len(_imgs(html)) and all(w > 0 for w in seen["widths"]), seen["widths"]
    assert seen["tables"] == html.count("<table>") >= 5
    assert seen["resources"] == []  # the page fetched nothing


@needs_fmnist
def test_report_from_real_training_analysis_and_decouple_outputs(tmp_path):
    """The readers match what lowshot train / analyze / decouple actually write."""
    from lowshot.longtail import decouple_checkpoint
    from lowshot.pipelines import analyze_with_figures
    from lowshot.train import train
    cfg = load_config(CFG, ["data.options={max_per_class: 20}", "train.epochs=2", "train.batch_size=32",
                            "train.max_steps_per_epoch=2", "val.every=0", "train.progress=false",
                            "head.name=linear", "head.margin=0", "head.scale=null"])
    run = tmp_path / "runs" / "tiny"
    train(cfg, run, log=lambda _m: None)
    analyze_with_figures(run / "best.pt", ["base"], out_dir=run / "analysis", projection="pca", classes=3,
                         per_class=10, device="cpu", log=lambda _m: None)
    _, dec = decouple_checkpoint(run / "best.pt", "ncm", test_split="base_test", log=lambda _m: None)
    from lowshot.fewshot.cli import run_eval
    ev = run_eval(run / "best.pt", shots=[1], episodes=10, method="ncm", device="cpu", log=lambda _m: None)
    html = build_report([tmp_path / "runs"], tmp_path / "r").read_text()
    assert "runs/tiny" in html and "2/2" in html  # epochs done / planned
    assert "fig01_curves" in (tmp_path / "r" / "report.md").read_text()
    assert re.search(r"<td>base</td><td>base_test</td><td>5</td><td>100</td>", html)
    m, j = dec["metrics"], dec["joint"]
    assert f"<td>ncm</td><td>{m['all']:.2f}</td><td>{m['class_mean']:.2f}</td>" in html
    assert f"<td>joint (linear)</td><td>{j['all']:.2f}</td><td>{j['class_mean']:.2f}</td>" in html
    r1 = ev["results"][0]
    assert re.search(rf"<td>eval_best_novel_ncm_5way_1shot_15q_10ep_seed0.json</td><td>ncm</td><td>5</td><td>1</td><td>10</td>"
                     rf"<td>{r1['mean']:.2f} ± {r1['ci95']:.2f}</td>", html)
    # curves, few-shot bars, projection, long-tail groups, per-class vs count
    assert len(_imgs(html)) == 5
    shutil.rmtree(run)  # the report is self-contained: it does not need the run any more
    assert len(_imgs((tmp_path / "r" / "report.html").read_text())) == 5


def test_report_of_a_seeded_sweep_shows_mean_std_and_the_seed_figure(tmp_path):
    sweep = tmp_path / "seeded"
    points = []
    for m in (-0.1, 0):
        for s, acc in enumerate((60.0, 62.0, 64.0)):
            name = f"head.margin={m},train.seed={s}"
            (sweep / name).mkdir(parents=True)
            res = {"name": name, "point": {"head.margin": m, "train.seed": s}, "epoch": 2,
                   "base_acc": 80.0 + s, "val_mean": 50.0 - m,
                   "fewshot": {"5x1": {"mean": acc - 10 * m, "ci95": 0.5, "way": 5, "shot": 1, "within": None},
                               "20x1@alphabet": {"mean": acc - 20, "ci95": 0.4, "way": 20, "shot": 1,
                                                 "within": "alphabet"}},
                   "phi": {"base": {"phi": 2.0, "space": "l2"}, "novel": {"phi": 1.0 + s, "space": "l2"}},
                   "protocol": {"protocols": ["5x1", "20x1@alphabet"], "episodes": 100, "method": "ncm"}}
            (sweep / name / "result.json").write_text(json.dumps(res))
            points.append(res)
    (sweep / "sweep.json").write_text(json.dumps({"grid": {"head.margin": [-0.1, 0]}, "axis": "head.margin",
                                                  "seeds": [0, 1, 2], "points": points}))
    html = build_report([sweep], tmp_path / "r").read_text()
    assert "mean ± sample std over seeds" in html and "error bars: std over seeds" in html
    # -0.1: 61, 63, 65 -> 63 ± 2 with the mean per-seed CI 0.5 beside it; 20-way within alphabet column
    assert "<td>63.00 ± 2.00 [0.50]</td>" in html and "novel 20-way 1-shot within alphabet %" in html
    assert "-0.1*: +1.00 (paired SE 0.00)" in html  # 63 - 62 vs margin 0; every seed differs by exactly 1
    # the few-shot table reads the protocol keys (way 20 within alphabet), one row per (run, protocol)
    assert "<td>20 (within alphabet)</td>" in html
