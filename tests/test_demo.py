"""`lowshot demo --quick`: the whole quick-start pipeline on real Fashion-MNIST, at a tiny budget."""
import json

from lowshot.demo import MARGINS, PROTOCOLS, SEEDS, STAGE2, run_demo

from conftest import needs_fmnist


@needs_fmnist
def test_quick_demo_end_to_end_and_rerun_reuses_runs(tmp_path, monkeypatch):
    lines = []
    out = run_demo(tmp_path / "demo", quick=True, log=lines.append)
    assert len(SEEDS) >= 3  # the margin comparison is read against the seed spread
    assert [(p["point"]["head.margin"], p["point"]["train.seed"]) for p in out["sweep"]] == \
        [(m, s) for m in MARGINS for s in SEEDS]
    for p in out["sweep"]:
        assert set(p["fewshot"]) == set(PROTOCOLS) and 20 < p["fewshot"]["5x5"]["mean"] <= 100
    agg = json.loads((tmp_path / "demo" / "margin_sweep" / "sweep.json").read_text())["aggregate"]
    assert [a["point"]["head.margin"] for a in agg] == MARGINS and all(a["n"] == len(SEEDS) for a in agg)
    assert all(a["fewshot"]["5x1"]["std"] is not None for a in agg)
    text = "\n".join(lines)
    assert "mean ± sample std over seeds" in text
    assert "epoch=" not in text.split("== 2/3")[0]  # one line per sweep run, not the epoch log of 9 runs
    assert set(out["stage2"]) == set(STAGE2)
    for res in out["stage2"].values():
        assert 0 <= res["metrics"]["all"] <= 100 and "few" in res["metrics"]
    html = (tmp_path / "demo" / "report" / "report.html").read_text()
    assert "Margin sweeps" in html and "Long-tail" in html and "http://" not in html
    assert "error bars: std over seeds" in html
    assert any(line.startswith("HTML report: ") for line in lines)

    import lowshot.train as train_module
    calls = []
    monkeypatch.setattr(train_module, "train", lambda *a, **k: calls.append(a))
    run_demo(tmp_path / "demo", quick=True, log=lambda *_: None)
    assert calls == []  # finished sweep points and the finished joint run are reused
