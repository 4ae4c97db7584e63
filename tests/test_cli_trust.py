"""Issue 12 "Trust every run": the command line keeps its promises.

User errors exit 2 with one line (no traceback), arguments are never silently replaced, options
and key=value words may come in any order, and logs stay readable outside a terminal. The CLI is
the contract, so most checks run ``python -m lowshot`` in a subprocess.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import FMNIST, ROOT, needs_fmnist

FM_CFG = str(ROOT / "configs" / "fashion_mnist" / "conv4_neg_cosine.yaml")
TINY = ["data.options={max_per_class: 40}", "train.epochs=1", "train.batch_size=32", "val.every=0"]
SRC = str(ROOT / "src")


def run_cli(*args: str, cwd: str | Path = ROOT, pre: str = "") -> subprocess.CompletedProcess:
    """``python -m lowshot ARGS``; ``pre`` is Python run first (e.g. to hide an installed package)."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", f"import sys; {pre}\nfrom lowshot.cli import main; sys.exit(main(sys.argv[1:]))",
           *args] if pre else [sys.executable, "-m", "lowshot", *args]
    r = subprocess.run(cmd, capture_output=True, cwd=cwd, env=env)  # bytes: text mode would turn "\r" into "\n"
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                       r.stderr.decode(errors="replace"))


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one stderr line, no traceback, and every needle in it."""
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A one-epoch Fashion-MNIST run (progress on, stderr a pipe as in CI / nohup / SLURM)."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed")
    run = tmp_path_factory.mktemp("trust") / "run"
    r = run_cli("train", FM_CFG, *TINY, "train.progress=true", "--run-dir", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    (run / "train_stderr.txt").write_bytes(r.stderr.encode())
    return run


# ----------------------------------------------------------------------------- 2. matplotlib core, optional imports

def test_matplotlib_is_a_core_dependency_and_test_extras_cover_the_tests():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "matplotlib" in core
    test_extra = " ".join(project["optional-dependencies"]["test"])
    for pkg in ("pytest", "hypothesis", "scikit-learn", "safetensors"):
        assert pkg in test_extra
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert '-e ".[test]"' in setup and '-e ".[report]"' not in setup  # plain install already has matplotlib


@needs_fmnist
def test_demo_without_matplotlib_fails_at_once_in_one_line(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--quick", "--out", str(out), pre="sys.modules['matplotlib'] = None")
    one_line_error(r, "matplotlib", "pip install matplotlib")
    assert not out.exists()  # nothing trained before the error


@needs_fmnist
@pytest.mark.parametrize("blocked,args,needle", [
    ("matplotlib", ["analyze", "--checkpoint", "{run}/best.pt", "--projection", "pca", "--out", "{tmp}/a"], "matplotlib"),
    ("matplotlib", ["report", "{run}", "--out", "{tmp}/r"], "matplotlib"),
    ("safetensors", ["export", "--checkpoint", "{run}/best.pt", "--out", "{tmp}/m.safetensors"], "safetensors"),
    ("sklearn", ["analyze", "--checkpoint", "{run}/best.pt", "--projection", "tsne", "--out", "{tmp}/a"],
     "scikit-learn"),
])
def test_missing_optional_import_is_one_line(tiny_run, tmp_path, blocked, args, needle):
    args = [a.format(run=tiny_run, tmp=tmp_path) for a in args]
    r = run_cli(*args, pre=f"sys.modules[{blocked!r}] = None")
    one_line_error(r, needle, "pip install")
    assert list(tmp_path.iterdir()) == []  # failed before writing anything


# ----------------------------------------------------------------------------- 3. arguments never silently replaced

@needs_fmnist
@pytest.mark.parametrize("args,needle", [
    (["--episodes", "0"], "--episodes"),
    (["--way", "0"], "--way"),
    (["--way", "1"], "--way"),
    (["--query", "0"], "--query"),
    (["--shot", "0"], "--shot"),
])
def test_eval_out_of_range_is_rejected_not_defaulted(tiny_run, args, needle):
    r = run_cli("eval", "--checkpoint", str(tiny_run), "--method", "ncm", "--device", "cpu", *args)
    one_line_error(r, needle, "must be >=")
    assert not list(tiny_run.glob("eval_*.json"))


def test_sweep_episodes_zero_is_rejected(tmp_path):
    r = run_cli("sweep", FM_CFG, "head.margin=0,0.1", *TINY, "--method", "ncm", "--episodes", "0",
                "--out", str(tmp_path / "s"))
    one_line_error(r, "--episodes", "must be >= 1")
    assert not (tmp_path / "s").exists()


def test_one_way_in_a_config_is_rejected(tmp_path):
    r = run_cli("train", FM_CFG, *TINY, "eval.way=1", "--run-dir", str(tmp_path / "r"))
    one_line_error(r, "eval.way", ">= 2")


@needs_fmnist
def test_eval_with_another_protocol_does_not_overwrite(tiny_run):
    common = ["eval", "--checkpoint", str(tiny_run), "--method", "ncm", "--device", "cpu", "--shot", "1"]
    assert run_cli(*common, "--episodes", "5").returncode == 0
    assert run_cli(*common, "--episodes", "7").returncode == 0
    files = sorted(tiny_run.glob("eval_best_novel_ncm_*.json"))
    assert [len(json.loads(f.read_text())["results"][0]["accuracies"]) for f in files] == [5, 7]
    for f in files:
        f.unlink()


# ----------------------------------------------------------------------------- 7. data.root stored resolved, configs by name

@needs_fmnist
def test_relative_data_root_is_stored_absolute_and_eval_works_elsewhere(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "fm").symlink_to(FMNIST)
    (tmp_path / "work").mkdir()
    r = run_cli("train", FM_CFG, *TINY, "train.progress=false", "data.root=../data/fm", "--run-dir", "run",
                cwd=tmp_path / "work")
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "work" / "run"
    stored = yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]
    assert Path(stored).is_absolute() and Path(stored) == tmp_path / "data" / "fm"
    r = run_cli("eval", "--checkpoint", str(run), "--episodes", "5", "--shot", "1", "--method", "ncm",
                "--device", "cpu", "--out", str(tmp_path / "e.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]


@needs_fmnist
def test_missing_data_root_error_says_root_overrides_it(tiny_run, tmp_path):
    from lowshot.checkpoint import load_checkpoint, save_checkpoint
    ck = load_checkpoint(tiny_run / "best.pt")
    ck["config"]["data"]["root"] = str(tmp_path / "moved")
    save_checkpoint(ck, tmp_path / "ck" / "best.pt")
    r = run_cli("eval", "--checkpoint", str(tmp_path / "ck"), "--episodes", "5", "--device", "cpu")
    one_line_error(r, "moved", "pass --root DIR to override")
    r = run_cli("eval", "--checkpoint", str(tmp_path / "ck"), "--episodes", "5", "--shot", "1", "--method", "ncm",
                "--device", "cpu", "--root", str(FMNIST))
    assert r.returncode == 0, r.stderr[-1500:]


def test_packaged_config_found_by_name_from_any_folder(tmp_path):
    for name in ("fashion_mnist/conv4_neg_cosine", "configs/fashion_mnist/conv4_neg_cosine.yaml"):
        r = run_cli("train", name, "head.margn=1", cwd=tmp_path)  # found: the error is about the key
        one_line_error(r, "unknown config key 'head.margn'")
    one_line_error(run_cli("train", "omniglot/onesht", cwd=tmp_path), "config file not found",
                   "did you mean 'omniglot/oneshot'")


# ----------------------------------------------------------------------------- 9. no tracebacks for user errors

def test_non_utf8_yaml_is_one_line(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    one_line_error(run_cli("train", str(bad)), "latin1.yaml", "UTF-8")


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (10, 10), value).save(buf, format="PNG")
    return buf.getvalue()


def test_omniglot_zip_with_bad_crc_is_one_line(tmp_path):
    root = tmp_path / "omni"
    root.mkdir()
    zpath = root / "images_background_small1.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as zf:
        for a in ("Alpha", "Beta", "Gamma", "Delta", "Eps"):
            for d in range(1, 4):
                zf.writestr(f"images_background_small1/{a}/character01/0001_{d:02d}.png", _png(40 * d))
    data = bytearray(zpath.read_bytes())
    at = data.index(b"IDAT") + 8  # inside the first stored PNG's pixel data: the CRC no longer matches
    data[at] ^= 0xFF
    zpath.write_bytes(bytes(data))
    r = run_cli("data", "info", "omniglot", "--root", str(root))
    one_line_error(r, str(zpath), "corrupt")


@needs_fmnist
def test_export_into_missing_folder_writes_the_file(tiny_run, tmp_path):
    pytest.importorskip("safetensors")
    out = tmp_path / "new" / "dir" / "m.safetensors"
    r = run_cli("export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-1500:]
    assert out.is_file() and not list(out.parent.glob(".*tmp"))


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(7, 256)) * 8)
    cases = [["eval", "--checkpoint", str(junk)], ["embed", "--checkpoint", str(junk), "--split", "novel", "--out",
                                                   str(tmp_path / "x.npz")]]
    for args in cases:
        err = one_line_error(run_cli(*args), "junk.pt", "is not a checkpoint")
        assert "run code" not in err


def test_plain_state_dict_is_one_line(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "sd.pt")
    for cmd in ("eval", "embed"):
        extra = ["--split", "novel", "--out", str(tmp_path / "o.npz")] if cmd == "embed" else []
        one_line_error(run_cli(cmd, "--checkpoint", str(tmp_path / "sd.pt"), *extra), "'config'")


# ----------------------------------------------------------------------------- 10. any order

def test_overrides_after_options_are_read(tmp_path):
    r = run_cli("train", FM_CFG, "train.epochs=1", "--run-dir", str(tmp_path / "r"), "head.margn=1")
    one_line_error(r, "unknown config key 'head.margn'")  # parsed as an override, not "unrecognized arguments"
    assert not (tmp_path / "r").exists()


def test_key_value_after_a_list_option_is_a_method_option(tmp_path):
    r = run_cli("eval", "--checkpoint", str(tmp_path / "nope.pt"), "--shot", "1", "5", "steps=20")
    one_line_error(r, "checkpoint not found")  # parsing succeeded: steps=20 is not a shot


def test_debug_after_the_subcommand(tmp_path):
    r = run_cli("train", FM_CFG, "train.epochs=oops", "--debug", "--run-dir", str(tmp_path / "r"))
    assert r.returncode != 0 and "Traceback" in r.stderr and "expects int" in r.stderr


def test_argparse_errors_are_one_line(tmp_path):
    one_line_error(run_cli("train", FM_CFG, "--bogus"), "unrecognized arguments: --bogus", "lowshot train -h")
    one_line_error(run_cli("eval", "--shot", "x"), "--shot", "'x'")


def test_parse_order_rule():
    from lowshot.cli import parse_args
    a = parse_args(["train", "C", "a=1", "--run-dir", "X", "b=2", "--", "c=3"])
    assert (a.config, a.overrides, a.run_dir) == ("C", ["a=1", "b=2", "c=3"], "X")
    a = parse_args(["eval", "--checkpoint", "c", "--out", "a=b.json", "--shot", "1", "5", "x=1", "--way", "3"])
    assert (a.out, a.shot, a.options, a.way) == ("a=b.json", [1, 5], ["x=1"], 3)  # an option's own value stays
    a = parse_args(["sweep", "head.margin=0,1", "C", "--episodes", "3", "train.epochs=1"])
    assert (a.config, a.grid, a.episodes) == ("C", ["head.margin=0,1", "train.epochs=1"], 3)
    a = parse_args(["decouple", "--method", "crt", "epochs=2", "--checkpoint", "X", "--debug"])
    assert (a.options, a.checkpoint, a.debug) == (["epochs=2"], "X", True)


# ----------------------------------------------------------------------------- 11. progress, readable logs

def test_plain_progress_prints_at_most_every_interval():
    from lowshot.utils import plain_progress
    t = [0.0]
    out = io.StringIO()

    def clock() -> float:
        return t[0]

    seen = []
    for i in plain_progress(range(40), total=40, desc="val features", interval=10.0, stream=out, clock=clock):
        seen.append(i)
        t[0] += 1.5  # each item 1.5 s: 60 s in all
    lines = out.getvalue().splitlines()
    assert seen == list(range(40)) and "\r" not in out.getvalue()
    assert lines[0] == "val features: 7/40 (18%) 10s elapsed, ~50s left"  # first line once 10 s have passed
    assert [int(line.split()[2].split("/")[0]) for line in lines[:-1]] == [7, 14, 21, 28, 35]  # then every >= 10 s
    assert lines[-1] == "val features: done, 40 in 60s"
    quiet = io.StringIO()
    assert list(plain_progress(range(3), total=3, stream=quiet, clock=lambda: 0.0)) == [0, 1, 2]
    assert quiet.getvalue() == ""  # a short step prints nothing


@needs_fmnist
def test_training_log_outside_a_tty_has_no_carriage_returns(tiny_run):
    log = (tiny_run / "train_stderr.txt").read_bytes()
    assert b"\r" not in log


def test_fewshot_validation_shows_feature_progress(monkeypatch):
    import lowshot.inference as features
    from lowshot.config import Config
    from lowshot.data.base import TensorImageDataset
    from lowshot.models import build_model
    from lowshot.train import fewshot_validation
    calls = []
    real = features.progress

    def spy(iterable, **kw):
        calls.append(kw)
        return real(iterable, **kw)

    monkeypatch.setattr(features, "progress", spy)
    g = torch.Generator().manual_seed(0)
    ds = TensorImageDataset(torch.randint(0, 255, (60, 1, 28, 28), dtype=torch.uint8, generator=g),
                            torch.arange(6).repeat_interleave(10), [f"c{i}" for i in range(6)])
    cfg = Config()
    cfg.val.episodes, cfg.val.method, cfg.val.query = 3, "ncm", 5
    model = build_model(cfg, 5, 1, 28)
    res = fewshot_validation(model, ds, lambda x: x.float() / 255, cfg, torch.device("cpu"))
    assert 0 <= res["val_mean"] <= 100
    assert calls and calls[0]["enabled"] is True and "val features" in calls[0]["desc"]


# ----------------------------------------------------------------------------- 12. smaller ones

def test_csv_list_sparse_integer_labels_need_num_classes(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "list.csv").write_text("a.png,0\na.png,1\na.png,999\n")
    one_line_error(run_cli("data", "info", "csv_list", "--root", str(tmp_path / "list.csv")),
                   "list.csv:3", "label 999 makes 1000 classes", "num_classes")
    from lowshot.data import build_dataset
    assert build_dataset("csv_list", "train", root=str(tmp_path / "list.csv"), num_classes=1000).num_classes == 1000


@needs_fmnist
def test_data_download_says_when_nothing_was_downloaded():
    r = run_cli("data", "download", "fashion_mnist", "--root", str(FMNIST))
    assert r.returncode == 0, r.stderr
    assert "already present" in r.stdout and "nothing downloaded" in r.stdout and "downloaded to" not in r.stdout


def test_data_info_image_folder_is_one_split(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / c / f"{i}.png")
    r = run_cli("data", "info", "image_folder", "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if " images " in line]
    assert len(rows) == 1 and "4 images" in " ".join(rows[0].split()) and "train/test" in rows[0]
    assert "one split" in r.stdout


def test_longtail_configs_log_val_acc_and_the_report_reads_it():
    from lowshot.config import load_config
    from lowshot.report.build import held_out_acc
    from lowshot.train import held_out_key
    assert held_out_key(load_config("fashion_mnist_lt/conv4_joint")) == "val_acc"
    assert held_out_key(load_config("decoupling/imagenet_lt_resnet10_joint")) in ("val_acc", "test_acc")
    assert held_out_key(load_config("fashion_mnist/conv4_neg_cosine")) == "base_acc"
    assert held_out_acc({"epoch": 1, "train_acc": 90.0, "val_acc": 71.5}) == 71.5
    assert held_out_acc({"epoch": 1, "train_acc": 90.0, "base_acc": 60.0}) == 60.0


def test_longtail_doc_names_the_split_best_pt_is_chosen_on():
    doc = (ROOT / "docs" / "longtail.md").read_text()
    cfg = yaml.safe_load((ROOT / "configs" / "fashion_mnist_lt" / "conv4_joint.yaml").read_text())
    assert cfg["data"]["test_split"] == "val"
    assert "is the *test* split" not in doc and "`data.test_split: val`" in doc


def test_corrupt_image_error_gives_the_skip_corrupt_hint(tmp_path):
    from lowshot.data import build_dataset
    from lowshot.errors import DataError
    (tmp_path / "c").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "c" / "good.png")
    (tmp_path / "c" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    ds = build_dataset("image_folder", "train", root=str(tmp_path), image_size=8)
    bad = [i for i, p in enumerate(ds.paths) if p.endswith("bad.png")][0]
    with pytest.raises(DataError, match=r"bad\.png.*skip_corrupt"):
        ds[bad]
