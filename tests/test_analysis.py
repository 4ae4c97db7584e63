"""Discriminability phi (hand-computed), PCA projection, and `lowshot analyze` on a tiny real run."""
import json
import math

import pytest
import torch

from lowshot.analysis import analyze_checkpoint, class_statistics, discriminability, pca_2d, resolve_split
from lowshot.analysis.discriminability import project_2d
from lowshot.cli import main
from lowshot.config import load_config
from lowshot.errors import ConfigError, DataError
from lowshot.pipelines import analyze_with_figures

from conftest import ROOT, needs_fmnist

CFG = ROOT / "configs" / "fashion_mnist" / "conv4_neg_cosine.yaml"
TINY = ["data.options={max_per_class: 40}", "train.epochs=1", "train.batch_size=32", "val.every=0",
        "train.progress=false"]

# three 2-D classes of different sizes:
#   A: (0,0) (2,0)        centre (1,0)  mean sq. dist to centre 1
#   B: (0,4) (0,6)        centre (0,5)  1
#   C: (3,4) (5,4) (4,4)  centre (4,4)  (1+1+0)/3 = 2/3
# ||A-B||^2 = 26, ||A-C||^2 = 25, ||B-C||^2 = 17 -> D_inter = 2*(26+25+17) / (3*2) = 68/3
# D_intra = (1 + 1 + 2/3) / 3 = 8/9 (class-weighted; sample-weighted would be 6/7)  -> phi = 25.5
FEATS = torch.tensor([[0, 0], [2, 0], [0, 4], [0, 6], [3, 4], [5, 4], [4, 4]], dtype=torch.float32)
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 2])


def test_class_statistics_hand_computed():
    st = class_statistics(FEATS, LABELS)
    assert st.centres.tolist() == [[1, 0], [0, 5], [4, 4]]
    assert st.counts.tolist() == [2, 2, 3]
    assert st.intra_per_class.tolist() == pytest.approx([1, 1, 2 / 3])
    assert st.inter == pytest.approx(68 / 3)
    assert st.intra == pytest.approx(8 / 9)
    assert st.phi == pytest.approx(25.5)
    d = st.to_dict()
    assert d["phi"] == pytest.approx(25.5) and d["num_classes"] == 3 and d["num_samples"] == 7
    assert d["space"] == "raw" and "centres" not in d


def test_phi_ignores_label_values_order_and_global_scale():
    perm = torch.tensor([6, 2, 0, 5, 1, 3, 4])
    relabelled = torch.tensor([9, 3, 7])[LABELS]  # arbitrary, non-contiguous ids
    st = class_statistics(FEATS[perm] * 3.5, relabelled[perm])
    assert st.phi == pytest.approx(25.5)
    assert st.classes.tolist() == [3, 7, 9]


def test_phi_on_l2_normalised_features_hand_computed():
    # A: (2,0),(0,3) -> (1,0),(0,1): centre (.5,.5), intra .5 ; B: (-1,0),(-5,0) -> (-1,0) twice: intra 0
    # D_inter = ||(.5,.5) - (-1,0)||^2 = 2.5 ; D_intra = (.5 + 0) / 2 = .25 -> phi = 10
    f = torch.tensor([[2.0, 0], [0, 3], [-1, 0], [-5, 0]])
    y = torch.tensor([0, 0, 1, 1])
    st = class_statistics(f, y, normalize=True)
    assert (st.inter, st.intra, st.phi) == (pytest.approx(2.5), pytest.approx(0.25), pytest.approx(10.0))
    assert st.normalized
    # raw space differs: centres (1,1.5) and (-3,0): inter 18.25; intra (3.25 + 4)/2 = 3.625
    raw = class_statistics(f, y)
    assert raw.phi == pytest.approx(18.25 / 3.625)


def test_discriminability_headline_space_follows_head():
    cos = discriminability(FEATS, LABELS, "cosine")
    lin = discriminability(FEATS, LABELS, "linear")
    assert cos["space"] == "l2" and cos["phi"] == cos["l2"]["phi"]
    assert lin["space"] == "raw" and lin["phi"] == pytest.approx(25.5)


def test_collapsed_classes_give_infinite_phi_and_json_null():
    st = class_statistics(torch.tensor([[0.0, 0], [0, 0], [1, 1]]), torch.tensor([0, 0, 1]))
    assert math.isinf(st.phi) and st.to_dict()["phi"] is None


@pytest.mark.parametrize("feats,labels,match", [
    (FEATS, torch.zeros(7, dtype=torch.long), "at least 2 classes"),
    (FEATS, LABELS[:5], "7 features but 5 labels"),
    (FEATS[:, 0], LABELS, r"\[N, D\]"),
    (FEATS, LABELS.float(), "integers"),
    (torch.full((7, 2), float("nan")), LABELS, "NaN"),
])
def test_class_statistics_rejects_bad_input(feats, labels, match):
    with pytest.raises(DataError, match=match):
        class_statistics(feats, labels)


def test_pca_2d_hand_example_and_sign_convention():
    x = torch.tensor([[-1.0, 0, 0], [1, 0, 0], [0, 0.5, 0], [0, -0.5, 0]]) + torch.tensor([3.0, -2, 7])
    xy = pca_2d(x)
    assert torch.allclose(xy, torch.tensor([[-1.0, 0], [1, 0], [0, 0.5], [0, -0.5]]), atol=1e-6)
    # axes are fixed by the data's directions, not by SVD's arbitrary signs: mirrored data, mirrored output
    assert torch.allclose(pca_2d(-x), -xy, atol=1e-6)


def test_tsne_without_sklearn_is_a_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match="scikit-learn"):
        project_2d(FEATS, "tsne")
    with pytest.raises(ConfigError, match="unknown projection"):
        project_2d(FEATS, "umap")


def test_resolve_split_uses_held_out_base_images_else_train_split():
    cfg = load_config(CFG)
    assert resolve_split(cfg, "base") == "base_test" and resolve_split(cfg, "novel") == "novel"
    cfg2 = load_config(CFG, ["data.test_split=null", "data.novel_split=null"])
    assert resolve_split(cfg2, "base") == "base"
    with pytest.raises(ConfigError, match="novel_split"):
        resolve_split(cfg2, "novel")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from lowshot.train import train
    run = tmp_path_factory.mktemp("analysis") / "run"
    train(load_config(CFG, TINY), run, log=lambda _m: None)
    return run


@needs_fmnist
def test_analyze_checkpoint_real_features(tiny_run, tmp_path):
    lines = []
    res = analyze_with_figures(tiny_run / "best.pt", ["base", "novel"], out_dir=tmp_path / "a", projection="pca",
                               classes=3, per_class=20, device="cpu", log=lines.append)
    assert set(res["splits"]) == {"base", "novel"}
    for kind, split, names in (("base", "base_test", "T-shirt/top"), ("novel", "novel", "Sandal")):
        r = res["splits"][kind]
        assert r["split"] == split and r["class_names"][0] == names
        assert r["space"] == "l2" and r["phi"] == r["l2"]["phi"] > 0  # cosine head: headline is l2
        assert r["raw"]["num_classes"] == 5 and r["raw"]["num_samples"] == 200  # max_per_class 40
    # the JSON holds exactly what was returned; the projection is a real PNG
    stored = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert stored["splits"]["novel"]["phi"] == pytest.approx(res["splits"]["novel"]["phi"])
    png = (tmp_path / "a" / "projection_novel.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert "discriminability phi" in lines[0] and "novel" in lines[0]


@needs_fmnist
def test_analyze_phi_matches_direct_computation(tiny_run):
    """The command's number is class_statistics on the checkpoint's own test-time features."""
    from lowshot.analysis import split_features
    from lowshot.inference import FrozenRun
    run = FrozenRun.open(tiny_run / "best.pt", device="cpu")
    feats = split_features(run, "novel")
    want = class_statistics(feats["features"], feats["labels"], normalize=True).phi
    got = analyze_checkpoint(tiny_run / "best.pt", ["novel"], device="cpu", log=lambda _m: None)
    assert got["splits"]["novel"]["phi"] == pytest.approx(want, rel=1e-6)


@needs_fmnist
def test_cli_analyze(tiny_run, tmp_path, capsys):
    rc = main(["analyze", "--checkpoint", str(tiny_run / "last.pt"), "--split", "base", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "base_test" in out and "phi" in out
    assert list(json.loads((tmp_path / "analysis.json").read_text())["splits"]) == ["base"]
    assert main(["analyze", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
