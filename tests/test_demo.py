"""`lowshot demo --quick`: the whole quick-start pipeline on real Fashion-MNIST, at a tiny budget."""
from lowshot.demo import MARGINS, STAGE2, run_demo

from conftest import needs_fmnist


@needs_fmnist
def test_quick_demo_end_to_end_and_rerun_reuses_runs(tmp_path, monkeypatch):
    lines = []
    out = run_demo(tmp_path / "demo", quick=True, log=lines.append)
    assert [p["point"]["head.margin"] for p in out["sweep"]] == MARGINS
    for p in out["sweep"]:
        assert set(p["fewshot"]) == {"1", "5"} and 20 < p["fewshot"]["5"]["mean"] <= 100
    assert set(out["stage2"]) == set(STAGE2)
    for res in out["stage2"].values():
        assert 0 <= res["metrics"]["all"] <= 100 and "few" in res["metrics"]
    html = (tmp_path / "demo" / "report" / "report.html").read_text()
    assert "Margin sweeps" in html and "Long-tail" in html and "http://" not in html
    assert any(line.startswith("HTML report: ") for line in lines)

    import lowshot.train as train_module
    calls = []
    monkeypatch.setattr(train_module, "train", lambda *a, **k: calls.append(a))
    run_demo(tmp_path / "demo", quick=True, log=lambda *_: None)
    assert calls == []  # finished sweep points and the finished joint run are reused
