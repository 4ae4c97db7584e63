"""Within-group episodes from the CLI and configs: ``lowshot eval --within KEY``, ``eval.within``,
``val.within`` (Lake et al.'s within-alphabet Omniglot protocol), on a tiny real Omniglot run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import OMNIGLOT_DIR, ROOT, needs_omniglot

pytestmark = [needs_omniglot, pytest.mark.usefixtures("single_thread")]

OMNI_CFG = str(ROOT / "configs" / "omniglot" / "conv4_neg_cosine.yaml")
# val alphabets: Japanese (katakana) 47 characters, Tagalog 17: 20-way within-alphabet episodes are katakana only
TINY = [f"data.root={OMNIGLOT_DIR}", "train.epochs=1", "train.max_steps_per_epoch=2", "train.progress=false",
        "val.every=1", "val.episodes=10", "val.method=ncm", "val.way=20", "val.within=alphabet",
        "eval.within=alphabet", "eval.method=ncm", "eval.way=5", "eval.shots=[1]", "eval.episodes=10"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowshot", *args], capture_output=True, text=True, cwd=ROOT)


def one_error_line(stderr: str) -> bool:
    """The error is one line, the last, with no traceback. Progress lines of a slow data decode
    (printed once it has run 10 s, e.g. on a loaded machine) may come before it."""
    lines = [ln for ln in stderr.strip().splitlines() if not ln.startswith("decoding ")]
    return len(lines) == 1 and lines[0].startswith("lowshot: error") and "Traceback" not in stderr


@pytest.fixture(scope="module")
def omni_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("within") / "run"
    r = run_cli("train", OMNI_CFG, *TINY, "--run-dir", str(run))
    assert r.returncode == 0, r.stderr
    return run


def _val_arrays(run):
    from lowshot.inference import FrozenRun
    frozen = FrozenRun.open(run / "last.pt", show_progress=False)
    feats, labels = frozen.features("val")
    return feats, labels, frozen.dataset("val").class_names, frozen.groups("val", "alphabet")


def test_val_within_is_used_for_few_shot_validation(omni_run):
    """The logged val_mean is the within-alphabet 20-way score of the epoch's model, not the across one."""
    from lowshot.fewshot import evaluate
    rec = json.loads((omni_run / "metrics.jsonl").read_text().splitlines()[-1])
    feats, labels, names, groups = _val_arrays(omni_run)
    kw = dict(way=20, shot=1, query=15, episodes=10, method="ncm", seed=0)
    within = evaluate(feats, labels, groups=groups, **kw)["mean"]
    across = evaluate(feats, labels, **kw)["mean"]
    assert rec["val_mean"] == pytest.approx(within, abs=1e-9)
    assert abs(within - across) > 1e-6


def test_val_within_errors_before_training(tmp_path):
    run = tmp_path / "bad"
    r = run_cli("train", OMNI_CFG, *TINY, "val.within=drawer", "--run-dir", str(run))
    assert r.returncode == 2 and one_error_line(r.stderr), r.stderr
    assert "val.within" in r.stderr and "'drawer'" in r.stderr and "available: alphabet" in r.stderr
    assert not (run / "last.pt").exists()
    r = run_cli("train", OMNI_CFG, *TINY, "val.way=48", "--run-dir", str(tmp_path / "bad2"))
    assert r.returncode == 2 and "at least 48 classes" in r.stderr and "Tagalog' (17)" in r.stderr, r.stderr
    assert not (tmp_path / "bad2" / "last.pt").exists()


def test_eval_within_episodes_share_an_alphabet(omni_run, monkeypatch, capsys):
    """Every episode the CLI samples with --within alphabet has all its classes in one alphabet."""
    from lowshot.cli import main
    from lowshot.fewshot import api
    seen = []

    def spy(*a, **kw):
        eps = real(*a, **kw)
        seen.append((eps, kw.get("groups")))
        return eps
    real = api.sample_episodes
    monkeypatch.setattr(api, "sample_episodes", spy)
    out = omni_run / "w.json"
    assert main(["eval", "--checkpoint", str(omni_run), "--split", "val", "--within", "alphabet", "--way", "20",
                 "--shot", "1", "5", "--episodes", "30", "--device", "cpu", "--out", str(out)]) == 0
    assert "episodes within one alphabet" in capsys.readouterr().out
    feats, labels, names, groups = _val_arrays(omni_run)
    assert len(seen) == 2
    for eps, g in seen:
        assert list(g) == groups
        alpha = [groups[i] for i in eps[:, :, 0].flatten().tolist()]          # first sample of each class
        per_episode = [set(alpha[e * 20:(e + 1) * 20]) for e in range(eps.shape[0])]
        assert all(s == {"Japanese_(katakana)"} for s in per_episode)      # Tagalog has only 17 characters
        assert all(len({groups[i] for i in row.flatten().tolist()}) == 1 for row in eps)
    data = json.loads(out.read_text())
    assert data["within"] == "alphabet" and [r["within"] for r in data["results"]] == [True, True]
    # 5-way: both alphabets are drawn
    seen.clear()
    assert main(["eval", "--checkpoint", str(omni_run), "--split", "val", "--within", "alphabet", "--way", "5",
                 "--shot", "1", "--episodes", "40", "--device", "cpu", "--out", str(out)]) == 0
    eps = seen[0][0]
    firsts = {groups[int(row[0, 0])] for row in eps}
    assert firsts == {"Japanese_(katakana)", "Tagalog"}
    assert all(len({groups[i] for i in row.flatten().tolist()}) == 1 for row in eps)


def test_eval_within_from_config_and_switched_off(omni_run):
    """eval.within of the run's config applies without --within; --within none draws across alphabets."""
    from lowshot.fewshot import evaluate
    feats, labels, names, groups = _val_arrays(omni_run)
    r = run_cli("eval", "--checkpoint", str(omni_run), "--split", "val", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    cfg_out = omni_run / "eval_best_val_ncm_5way_1shot_15q_10ep_seed0_within-alphabet.json"
    data = json.loads(cfg_out.read_text())
    kw = dict(way=5, shot=1, query=15, episodes=10, method="ncm", seed=0)
    assert data["within"] == "alphabet"
    assert data["results"][0]["mean"] == pytest.approx(evaluate(feats, labels, groups=groups, **kw)["mean"])
    r = run_cli("eval", "--checkpoint", str(omni_run), "--split", "val", "--within", "none", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    data = json.loads((omni_run / "eval_best_val_ncm_5way_1shot_15q_10ep_seed0.json").read_text())
    assert data["within"] is None and data["results"][0]["within"] is False
    assert data["results"][0]["mean"] == pytest.approx(evaluate(feats, labels, **kw)["mean"])


def test_eval_within_user_errors_are_one_line(omni_run, tmp_path):
    out = tmp_path / "x.json"
    r = run_cli("eval", "--checkpoint", str(omni_run), "--within", "drawer", "--out", str(out))
    assert r.returncode == 2 and one_error_line(r.stderr), r.stderr
    assert "'drawer'" in r.stderr and "available: alphabet" in r.stderr
    r = run_cli("eval", "--checkpoint", str(omni_run), "--split", "val", "--within", "alphabet", "--way", "48",
                "--out", str(out))
    assert r.returncode == 2 and "at least 48 classes" in r.stderr.strip().splitlines()[-1]
    r = run_cli("eval", "--checkpoint", str(omni_run), "--generalized", "--within", "alphabet", "--out", str(out))
    assert r.returncode == 2 and "--within" in r.stderr
    assert not out.exists()


def test_within_config_keys_validate():
    from lowshot.config import load_config
    from lowshot.errors import ConfigError
    cfg = load_config(OMNI_CFG, ["val.within=alphabet", "eval.within=alphabet"])
    assert cfg.val.within == cfg.eval.within == "alphabet"
    assert load_config(OMNI_CFG).eval.within is None
    with pytest.raises(ConfigError, match="eval.within"):
        load_config(OMNI_CFG, ["eval.within=3"])


def test_omniglot_benchmark_uses_within_path(omni_run, tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "omniglot_oneshot.py"), "--checkpoint",
                        str(omni_run), "--split", "val", "--protocols", "20x1", "--episodes", "10", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())[0]
    from lowshot.fewshot import evaluate
    feats, labels, names, groups = _val_arrays(omni_run)
    ref = evaluate(feats, labels, way=20, shot=1, query=15, episodes=10, method="ncm", seed=0, groups=groups)
    assert res["within"] is True and res["mean"] == pytest.approx(ref["mean"])
    assert torch.is_tensor(feats)


def test_embed_split_writes_alphabets_and_features_within_equals_checkpoint(omni_run, tmp_path):
    """`embed --split val` stores group_alphabet; `eval --features --within alphabet` then gives the
    checkpoint path's within-alphabet numbers."""
    import numpy as np
    f = tmp_path / "val.npz"
    r = run_cli("embed", "--checkpoint", str(omni_run), "--split", "val", "--out", str(f), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    z = np.load(f, allow_pickle=False)
    feats, labels, names, groups = _val_arrays(omni_run)
    assert z["group_alphabet"].tolist() == groups and str(z["head"]) == "cosine"
    common = ["--within", "alphabet", "--way", "20", "--shot", "1", "--episodes", "10", "--method", "ncm",
              "--device", "cpu"]
    a = run_cli("eval", "--checkpoint", str(omni_run), "--split", "val", *common, "--out", str(tmp_path / "a.json"))
    b = run_cli("eval", "--features", str(f), *common, "--out", str(tmp_path / "b.json"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra, rb = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert ra["within"] == rb["within"] == "alphabet"
    assert ra["results"][0]["accuracies"] == rb["results"][0]["accuracies"]


def test_embedding_variant_trains_on_every_alphabet_and_embed_serves_it(tmp_path):
    """configs/omniglot/embedding.yaml: every character of every alphabet (+ rotations) is a training
    class, nothing is held out, and ``lowshot embed`` turns raw character PNGs into its features,
    the same ones the model computes on the training images."""
    import zipfile

    import numpy as np

    from lowshot.data import build_dataset
    from lowshot.inference import FrozenRun
    cfg = str(ROOT / "configs" / "omniglot" / "embedding.yaml")
    run = tmp_path / "emb"
    r = run_cli("train", cfg, f"data.root={OMNIGLOT_DIR}", "train.epochs=1", "train.max_steps_per_epoch=2",
                "train.progress=false", "--run-dir", str(run))
    assert r.returncode == 0, r.stderr
    frozen = FrozenRun.open(run, device="cpu")
    every = build_dataset("omniglot", "train", root=str(OMNIGLOT_DIR), image_size=frozen.metadata["image_size"])
    alphabets = {n.split("/")[0] for n in every.class_names}
    assert len(alphabets) == 8 and len(frozen.class_names) == 4 * every.num_classes  # + 3 rotations each
    assert frozen.config.data.test_split is None and frozen.config.data.novel_split is None
    folder = tmp_path / "chars"
    folder.mkdir()
    with zipfile.ZipFile(OMNIGLOT_DIR / "images_background_small1.zip") as z:
        pngs = sorted(n for n in z.namelist() if n.endswith(".png"))[:3]
        for i, name in enumerate(pngs):
            (folder / f"{i}.png").write_bytes(z.read(name))
    out = tmp_path / "chars.npz"
    r = run_cli("embed", "--checkpoint", str(run), "--images", str(folder), "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    z = np.load(out, allow_pickle=False)
    assert z["features"].shape == (3, frozen.model.backbone.out_dim) and np.isfinite(z["features"]).all()
    # the first PNG of the zip is the first image of the first character: the features of the raw file
    # equal the backbone's features of that training image (same preprocessing, stored in the checkpoint)
    with torch.no_grad():
        ref = frozen.model.backbone(frozen.transform(every[0][0][None]))[0]
    np.testing.assert_allclose(z["features"][0], ref.numpy(), atol=1e-4)
