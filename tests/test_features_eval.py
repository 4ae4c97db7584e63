"""``lowshot eval --features FILE``: bring-your-own features (.npz / .pt), the checkpoint path's
protocol, table and JSON; generalized few-shot on features files; one-line user errors."""
from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, needs_fmnist

pytestmark = pytest.mark.usefixtures("single_thread")

FM_CFG = str(ROOT / "configs" / "fashion_mnist" / "conv4_neg_cosine.yaml")
TINY = ["data.options={max_per_class: 40}", "train.epochs=1", "train.batch_size=32", "train.progress=false",
        "val.every=0"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowshot", *args], capture_output=True, text=True, cwd=ROOT)


def table_of(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("|")]


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("lowshot: error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def main_error(capsys, *args: str) -> subprocess.CompletedProcess:
    """``lowshot ARGS`` in-process (the same ``main`` the console script runs, without a new interpreter)."""
    from lowshot.cli import main
    capsys.readouterr()
    rc = main(list(args))
    cap = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), rc, cap.out, cap.err)


# ----------------------------------------------------------------------------- hand-made files, known answers

def clusters(classes: int = 6, per_class: int = 20, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class c at 10 * e_c plus noise of std 0.01: every method separates them perfectly."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), per_class)
    x = 10.0 * np.eye(dim, dtype=np.float32)[y] + rng.normal(0, 0.01, (y.size, dim)).astype(np.float32)
    return x, y


@pytest.mark.parametrize("method", ["ncm", "logreg", "finetune"])
def test_perfectly_separated_features_give_100(tmp_path, method):
    x, y = clusters()
    f = tmp_path / "sep.npz"
    np.savez(f, features=x, labels=y, class_names=np.array([f"c{i}" for i in range(6)]))
    out = tmp_path / "r.json"
    r = run_cli("eval", "--features", str(f), "--method", method, "--way", "5", "--shot", "1", "5",
                "--episodes", "10", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert table_of(r.stdout)[2] == f"| {method} | 100.00 ± 0.00 | 100.00 ± 0.00 |"
    rec = json.loads(out.read_text())
    assert rec["features"] == str(f) and rec["within"] is None and rec["head"] == "cosine"
    assert [(c["way"], c["shot"], c["mean"], c["episodes"]) for c in rec["results"]] == [(5, 1, 100.0, 10),
                                                                                         (5, 5, 100.0, 10)]
    assert rec["results"][0]["accuracies"] == [100.0] * 10


def test_within_groups_of_a_features_file_known_answer(tmp_path):
    """Classes identical inside a group, distinct across: within-group episodes are pure ties (class 0
    wins every argmax: exactly 100 / way), across-group episodes are not."""
    groups = np.repeat(["A", "B"], 6 * 10)            # 6 classes per group, 10 samples each
    y = np.repeat(np.arange(12), 10)
    x = np.where(groups[:, None] == "A", np.array([1.0, 0.0]), np.array([0.0, 1.0])).astype(np.float32)
    f = tmp_path / "g.npz"
    np.savez(f, features=x, labels=y, group_script=groups)
    common = ["--method", "ncm", "--way", "5", "--shot", "1", "--query", "5", "--episodes", "30", "--device", "cpu"]
    r = run_cli("eval", "--features", str(f), "--within", "script", *common, "--out", str(tmp_path / "w.json"))
    assert r.returncode == 0, r.stderr
    assert "episodes within one script (2 groups)" in r.stdout
    rec = json.loads((tmp_path / "w.json").read_text())
    assert rec["within"] == "script" and rec["results"][0]["within"] is True
    assert rec["results"][0]["accuracies"] == [20.0] * 30
    r = run_cli("eval", "--features", str(f), *common, "--out", str(tmp_path / "a.json"))
    across = json.loads((tmp_path / "a.json").read_text())["results"][0]
    assert across["within"] is False and across["mean"] > 20.0
    # the default output name records the within key
    r = run_cli("eval", "--features", str(f), "--within", "script", *common)
    assert r.returncode == 0 and list(tmp_path.glob("eval_g_features_ncm_*_within-script.json"))


def test_pt_dict_equals_npz(tmp_path):
    x, y = clusters(seed=3)
    x = x + np.random.default_rng(1).normal(0, 8, x.shape).astype(np.float32)   # not separable: a real number
    groups = np.array(["a", "a", "a", "b", "b", "b"])[y]
    np.savez(tmp_path / "f.npz", features=x, labels=y, group_k=groups)
    torch.save({"features": torch.from_numpy(x), "labels": torch.from_numpy(y), "group_k": groups.tolist(),
                "class_names": [f"c{i}" for i in range(6)]}, tmp_path / "f.pt")
    res = []
    for name in ("f.npz", "f.pt"):
        out = tmp_path / f"{name}.json"
        r = run_cli("eval", "--features", str(tmp_path / name), "--method", "logreg", "--way", "3", "--shot", "1",
                    "--episodes", "15", "--within", "k", "--out", str(out), "--device", "cpu")
        assert r.returncode == 0, r.stderr
        res.append(json.loads(out.read_text())["results"][0])
    assert res[0]["accuracies"] == res[1]["accuracies"] and 34 < res[0]["mean"] < 100


def _bad_files(tmp_path):
    x, y = clusters()
    files = {}

    def npz(name, **arrays):
        np.savez(tmp_path / name, **arrays)
        files[name] = tmp_path / name
    npz("shape.npz", features=x, labels=y[:-3])
    npz("not2d.npz", features=x[:, 0], labels=y)
    nan = x.copy()
    nan[17, 2] = np.nan
    npz("nan.npz", features=nan, labels=y)
    inf = x.copy()
    inf[33, 0] = np.inf
    npz("inf.npz", features=inf, labels=y)
    npz("fewclasses.npz", features=x[y < 3], labels=y[y < 3])
    small = np.ones(y.size, bool)
    small[np.nonzero(y == 4)[0][5:]] = False            # class 4 keeps 5 samples: < 1 + 15
    npz("small.npz", features=x[small], labels=y[small], class_names=np.array([f"c{i}" for i in range(6)]))
    npz("nolabels.npz", features=x)
    npz("floatlabels.npz", features=x, labels=y + 0.5)
    torch.save({"features": torch.from_numpy(x), "labels": torch.from_numpy(y), "extra": object()},
               tmp_path / "pickled.pt")
    files["pickled.pt"] = tmp_path / "pickled.pt"
    (tmp_path / "feats.csv").write_text("1,2\n")
    files["feats.csv"] = tmp_path / "feats.csv"
    return files


def test_each_bad_features_file_is_one_line_exit_2(tmp_path, capsys):
    files = _bad_files(tmp_path)
    expect = {
        "shape.npz": "'features' has 120 rows but 'labels' has shape (117,)",
        "not2d.npz": "'features' must be N x D",
        "nan.npz": "NaN/Inf in 1 rows (first: row 17)",
        "inf.npz": "NaN/Inf in 1 rows (first: row 33)",
        "fewclasses.npz": "5-way episodes need at least 5 classes, the labels have 3",
        "small.npz": "class 4 ('c4') has 5 samples, fewer than shot + query = 1 + 15 = 16",
        "nolabels.npz": "no 'labels' array (keys: features)",
        "floatlabels.npz": "'labels' must be integer class ids",
        "pickled.pt": "weights_only=True",
        "feats.csv": "unknown features file type '.csv'",
    }
    for i, (name, needle) in enumerate(expect.items()):
        out = tmp_path / f"{name}.json"
        cli = run_cli if i < 2 else functools.partial(main_error, capsys)   # two real processes, the rest in-process
        r = cli("eval", "--features", str(files[name]), "--method", "ncm", "--shot", "1", "--episodes", "3",
                "--out", str(out))
        one_line_error(r, str(files[name]), needle)
        assert not out.exists()
    r = main_error(capsys, "eval", "--features", str(tmp_path / "missing.npz"))
    one_line_error(r, "features file not found", "missing.npz")


def test_features_cli_argument_errors(tmp_path, capsys):
    run_cli = functools.partial(main_error, capsys)
    x, y = clusters()
    f = tmp_path / "f.npz"
    np.savez(f, features=x, labels=y, group_script=np.array(["a"] * y.size))
    one_line_error(run_cli("eval"), "--checkpoint", "--features")
    one_line_error(run_cli("eval", "--features", str(f), "--split", "novel"), "--split")
    one_line_error(run_cli("eval", "--features", str(f), "--checkpoint", "x.pt"), "--checkpoint", "--generalized")
    one_line_error(run_cli("eval", "--features", str(f), "--calibration", "bias"), "--calibration")
    one_line_error(run_cli("eval", "--features", str(f), "--within", "alphabet"),
                   "no group array 'group_alphabet'", "group_script")
    one_line_error(run_cli("eval", "--features", str(f), "--generalized"), "--base-features")
    assert not list(tmp_path.glob("*.json"))


def test_python_api_loads_and_evaluates(tmp_path):
    from lowshot.errors import DataError
    from lowshot.fewshot.feature_files import load_feature_file, run_features_eval
    x, y = clusters()
    np.savez(tmp_path / "f.npz", features=x.astype(np.float16), labels=y)
    ff = load_feature_file(tmp_path / "f.npz")
    assert ff.features.dtype == torch.float32 and ff.num_classes == 6 and ff.head is None
    rec = run_features_eval(tmp_path / "f.npz", method="ncm", shots=[1], episodes=4, log=lambda _m: None)
    assert rec["results"][0]["mean"] == 100.0 and list(tmp_path.glob("eval_f_features_ncm_5way_1shot_*.json"))
    with pytest.raises(DataError, match="no group array 'group_alphabet'.*none"):
        ff.group("alphabet")
    # a .pt dict with bfloat16 features and a `head`: the head family sets the fine-tune head
    torch.save({"features": torch.from_numpy(x).to(torch.bfloat16), "labels": y.tolist(), "head": "neg_softmax"},
               tmp_path / "b.pt")
    rec = run_features_eval(tmp_path / "b.pt", shots=[1], episodes=2, log=lambda _m: None)
    assert rec["head"] == "neg_softmax" and rec["options"] == {"head": "linear", "bias": False, "scale": 5.0}
    assert rec["results"][0]["mean"] == 100.0


# ----------------------------------------------------------------------------- on a tiny trained run

@pytest.fixture(scope="module")
def fm_run(tmp_path_factory):
    from conftest import have_fmnist
    if not have_fmnist():
        pytest.skip("Fashion-MNIST not installed")
    d = tmp_path_factory.mktemp("feat")
    r = run_cli("train", FM_CFG, *TINY, "--run-dir", str(d / "run"))
    assert r.returncode == 0, r.stderr
    for split in ("base", "base_test", "val", "novel"):
        r = run_cli("embed", "--checkpoint", str(d / "run"), "--split", split, "--out", str(d / f"{split}.npz"),
                    "--device", "cpu")
        assert r.returncode == 0, r.stderr
    return d


@needs_fmnist
@pytest.mark.parametrize("method", ["finetune", "ncm"])
def test_embed_output_gives_the_checkpoint_paths_result(fm_run, method):
    """embed --split novel + eval --features == eval --checkpoint: same episodes, head family, numbers."""
    z = np.load(fm_run / "novel.npz")
    assert str(z["head"]) == "cosine" and z["labels"].shape == (200,)
    common = ["--method", method, "--shot", "1", "5", "--episodes", "20", "--device", "cpu"]
    a = run_cli("eval", "--checkpoint", str(fm_run / "run"), *common, "--out", str(fm_run / f"ck_{method}.json"))
    b = run_cli("eval", "--features", str(fm_run / "novel.npz"), *common, "--out", str(fm_run / f"ft_{method}.json"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert table_of(a.stdout) == table_of(b.stdout)
    ra = json.loads((fm_run / f"ck_{method}.json").read_text())["results"]
    rb = json.loads((fm_run / f"ft_{method}.json").read_text())["results"]
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rb]


@needs_fmnist
def test_foreign_features_use_the_documented_finetune_head(fm_run, tmp_path):
    """Without a `head` entry, finetune uses a cosine head: equal to the file's own when it is cosine,
    different from an explicit head=linear."""
    z = dict(np.load(fm_run / "novel.npz"))
    del z["head"]
    np.savez(tmp_path / "foreign.npz", **z)
    common = ["--shot", "1", "--episodes", "10", "--device", "cpu"]
    res = {}
    for name, f, extra in (("own", fm_run / "novel.npz", []), ("foreign", tmp_path / "foreign.npz", []),
                           ("linear", tmp_path / "foreign.npz", ["head=linear"])):
        out = tmp_path / f"{name}.json"
        r = run_cli("eval", "--features", str(f), *common, "--out", str(out), *extra)
        assert r.returncode == 0, r.stderr
        res[name] = json.loads(out.read_text())
    assert res["foreign"]["head"] == "cosine"
    assert res["foreign"]["results"][0]["accuracies"] == res["own"]["results"][0]["accuracies"]
    assert res["linear"]["options"]["head"] == "linear"
    assert res["linear"]["results"][0]["accuracies"] != res["foreign"]["results"][0]["accuracies"]


@needs_fmnist
def test_embed_an_image_folder_and_evaluate_it(fm_run, tmp_path):
    """The documented flow: a class-per-folder tree -> embed (checkpoint's channels) -> eval --features."""
    from PIL import Image
    from lowshot.data import build_dataset
    ds = build_dataset("fashion_mnist", "novel", max_per_class=12)
    root = tmp_path / "folder"
    for i in range(len(ds)):
        img, label = ds[i]
        d = root / ds.class_names[int(label)].replace(" ", "_")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(d / f"{i:03d}.png")
    out = tmp_path / "folder.npz"
    r = run_cli("embed", "--checkpoint", str(fm_run / "run"), "--split", "all", "--dataset", "image_folder",
                "--root", str(root), "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    z = np.load(out)
    assert z["features"].shape == (60, 64) and sorted(z["class_names"].tolist()) == z["class_names"].tolist()
    assert z["class_names"].tolist() == ["Ankle_boot", "Bag", "Sandal", "Shirt", "Sneaker"]
    # the same features as `embed --images` of those files (the checkpoint's own preprocessing)
    r = run_cli("embed", "--checkpoint", str(fm_run / "run"), "--images", str(root), "--out", str(tmp_path / "i.npz"),
                "--device", "cpu")
    zi = np.load(tmp_path / "i.npz")
    order = np.argsort(zi["paths"])
    assert np.allclose(np.sort(zi["features"][order], 0), np.sort(z["features"], 0), atol=1e-5)
    r = run_cli("eval", "--features", str(out), "--way", "5", "--shot", "1", "--query", "5", "--episodes", "10",
                "--method", "ncm", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert table_of(r.stdout)[0] == "| method | 5-way 1-shot |"


# ----------------------------------------------------------------------------- generalized on features

@needs_fmnist
def test_generalized_on_features_equals_the_checkpoint_path(fm_run):
    proto = ["--way", "3", "--shot", "1", "--query", "4", "--episodes", "8", "--calibration", "none", "bias",
             "--device", "cpu"]
    a = run_cli("eval", "--checkpoint", str(fm_run / "run"), "--generalized", *proto, "--out", str(fm_run / "ga.json"))
    b = run_cli("eval", "--features", str(fm_run / "novel.npz"), "--generalized", "--base-features",
                str(fm_run / "base_test.npz"), "--val-features", str(fm_run / "val.npz"), "--checkpoint",
                str(fm_run / "run"), *proto, "--out", str(fm_run / "gb.json"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert table_of(a.stdout) == table_of(b.stdout)
    ga, gb = (json.loads((fm_run / n).read_text()) for n in ("ga.json", "gb.json"))
    assert ga["method"] == gb["method"] == "imprint" and ga["results"] == gb["results"]
    assert gb["source"]["base_features"].endswith("base_test.npz") and gb["source"]["head"] == "cosine"
    # NCM over base training features, no checkpoint == the checkpoint path's method=ncm
    a = run_cli("eval", "--checkpoint", str(fm_run / "run"), "--generalized", "--method", "ncm", *proto,
                "--out", str(fm_run / "na.json"))
    b = run_cli("eval", "--features", str(fm_run / "novel.npz"), "--generalized", "--base-features",
                str(fm_run / "base_test.npz"), "--base-train-features", str(fm_run / "base.npz"), "--val-features",
                str(fm_run / "val.npz"), *proto, "--out", str(fm_run / "nb.json"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    na, nb = (json.loads((fm_run / n).read_text()) for n in ("na.json", "nb.json"))
    assert nb["method"] == "ncm" and nb["classifier"] == "ncm" and na["results"] == nb["results"]


@needs_fmnist
def test_generalized_on_features_user_errors(fm_run, tmp_path, capsys):
    run_cli = functools.partial(main_error, capsys)
    out = tmp_path / "g.json"
    base = ["eval", "--features", str(fm_run / "novel.npz"), "--generalized", "--episodes", "4", "--way", "3",
            "--query", "4", "--out", str(out)]
    one_line_error(run_cli(*base, "--base-features", str(fm_run / "base_test.npz")),
                   "--checkpoint CKPT", "--base-train-features")
    one_line_error(run_cli(*base, "--base-features", str(fm_run / "novel.npz"), "--checkpoint", str(fm_run / "run")),
                   "label 0 is 'Sandal' but 'T-shirt/top'")
    one_line_error(run_cli(*base, "--base-features", str(fm_run / "base_test.npz"), "--checkpoint",
                           str(fm_run / "run"), "--calibration", "bias"), "--val-features")
    assert not out.exists()


@pytest.mark.parametrize("kw", [{"way": 0}, {"way": 1}, {"episodes": 0}, {"query": 0}])
def test_python_api_never_replaces_a_given_zero_by_the_default(tmp_path, kw):
    """``way=0`` used to become the default 5 (``x or default``) and ``way=1`` gave 100 %: both refused."""
    from lowshot.errors import ConfigError
    from lowshot.fewshot.feature_files import run_features_eval
    x, y = clusters()
    np.savez(tmp_path / "f.npz", features=x, labels=y)
    with pytest.raises(ConfigError):
        run_features_eval(tmp_path / "f.npz", method="ncm", shots=[1], **{"episodes": 4, **kw}, log=lambda _m: None)
    assert not list(tmp_path.glob("eval_*.json"))
