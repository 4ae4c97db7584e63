"""The command line: user errors are one line with exit code 2; train -> embed -> eval on real data."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lowshot.checkpoint import load_checkpoint, save_checkpoint
from lowshot.cli import main
from lowshot.errors import CheckpointError
from lowshot.models import model_from_checkpoint

from conftest import OMNIGLOT_DIR, ROOT, needs_fmnist, needs_omniglot

FM_CFG = str(ROOT / "configs" / "fashion_mnist" / "conv4_neg_cosine.yaml")
TINY = ["data.options={max_per_class: 40}", "train.epochs=1", "train.batch_size=32", "train.progress=false",
        "val.every=0"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lowshot", *args], capture_output=True, text=True, cwd=ROOT)


def test_unknown_key_is_one_line_without_traceback(tmp_path):
    r = run_cli("train", FM_CFG, "head.margn=-0.1", "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "unknown config key 'head.margn'; did you mean 'head.margin'?" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_debug_flag_shows_traceback(tmp_path):
    r = run_cli("--debug", "train", FM_CFG, "train.epochs=oops", "--run-dir", str(tmp_path / "r"))
    assert r.returncode != 0 and "Traceback" in r.stderr and "expects int" in r.stderr


def test_missing_checkpoint_and_config(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_data_list(capsys):
    assert main(["data", "list"]) == 0
    names = capsys.readouterr().out.split()
    for n in ("fashion_mnist", "omniglot", "mini_imagenet", "fashion_mnist_lt", "cub"):
        assert n in names


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not (ROOT / "configs").is_dir():
        pytest.skip("no configs")
    from conftest import have_fmnist
    if not have_fmnist():
        pytest.skip("Fashion-MNIST not installed")
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", FM_CFG, *TINY, "--run-dir", str(run)]) == 0
    return run


@needs_fmnist
def test_embed_images_and_split(tiny_run, tmp_path):
    imgs = tmp_path / "imgs" / "sub"
    imgs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(imgs / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(imgs.parent / "rgb.jpg")
    out = tmp_path / "e.npz"
    assert main(["embed", "--checkpoint", str(tiny_run / "best.pt"), "--images", str(imgs.parent),
                 "--out", str(out), "--device", "cpu"]) == 0
    z = np.load(out, allow_pickle=False)
    assert z["features"].shape == (4, 64) and z["features"].dtype == np.float32
    assert [p.rsplit("/", 1)[-1] for p in z["paths"]] == ["rgb.jpg", "0.png", "1.png", "2.png"] or \
        sorted(z["paths"].tolist()) == sorted(str(p) for p in (imgs.parent / "rgb.jpg", *imgs.glob("*.png")))
    # the same image gives the same feature as the model applied by hand with the stored preprocessing
    from lowshot.inference import FrozenRun
    from lowshot.data import load_image
    run = FrozenRun.open(tiny_run / "best.pt", device="cpu")
    model, tf = run.model, run.transform
    idx = [i for i, p in enumerate(z["paths"]) if p.endswith("1.png")][0]
    with torch.no_grad():
        ref = model.backbone(tf(load_image(imgs / "1.png", 28, 1)[None]))[0]
    assert np.allclose(z["features"][idx], ref.numpy(), atol=1e-5)
    out2 = tmp_path / "s.npz"
    assert main(["embed", "--checkpoint", str(tiny_run / "best.pt"), "--split", "novel", "--out", str(out2),
                 "--device", "cpu"]) == 0
    z2 = np.load(out2, allow_pickle=False)
    assert z2["features"].shape == (200, 64) and set(z2["labels"].tolist()) == {0, 1, 2, 3, 4}
    assert z2["class_names"][0] == "Sandal"


@needs_fmnist
def test_embed_corrupt_image_names_file(tiny_run, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    Image.new("L", (28, 28)).save(bad)
    bad.write_bytes(bad.read_bytes()[:30])
    assert main(["embed", "--checkpoint", str(tiny_run / "best.pt"), "--images", str(bad), "--out",
                 str(tmp_path / "x.npz")]) == 2
    assert "bad.png" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


@needs_fmnist
def test_eval_cli_writes_json(tiny_run, capsys):
    assert main(["eval", "--checkpoint", str(tiny_run), "--episodes", "20", "--shot", "1", "--method", "ncm",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "5-way 1-shot" in out and "ncm" in out
    assert list(tiny_run.glob("eval_best_novel_ncm_5way_1shot_15q_20ep_seed0.json"))  # protocol in the name
    assert list((tiny_run / "features").glob("novel-*.pt"))  # features cached per backbone/split


@needs_fmnist
def test_incompatible_checkpoint_says_which_part(tiny_run, tmp_path):
    ck = load_checkpoint(tiny_run / "best.pt")
    ck["config"]["model"]["backbone"] = "resnet12"
    save_checkpoint(ck, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="backbone 'resnet12'"):
        model_from_checkpoint(load_checkpoint(tmp_path / "wrong.pt"))
    ck = load_checkpoint(tiny_run / "best.pt")
    ck["config"]["head"]["name"] = "linear"
    ck["config"]["head"]["margin"] = 0.0
    ck["config"]["head"]["scale"] = None
    save_checkpoint(ck, tmp_path / "wrong2.pt")
    with pytest.raises(CheckpointError, match="head 'linear'"):
        model_from_checkpoint(load_checkpoint(tmp_path / "wrong2.pt"))


@needs_omniglot
def test_omniglot_config_trains_and_embeds(tmp_path):
    run = tmp_path / "omni"
    assert main(["train", str(ROOT / "configs" / "omniglot" / "conv4_neg_cosine.yaml"), f"data.root={OMNIGLOT_DIR}",
                 "train.epochs=1", "train.progress=false", "val.every=1", "val.episodes=10", "val.method=ncm",
                 "--run-dir", str(run)]) == 0
    ck = load_checkpoint(run / "best.pt")
    assert ck["data"]["image_size"] == 28 and len(ck["class_names"]) > 50
    assert "/" in ck["class_names"][0]  # Alphabet/characterNN
    char_dir = tmp_path / "chars"
    import zipfile
    with zipfile.ZipFile(OMNIGLOT_DIR / "images_background_small1.zip") as z:
        pngs = [n for n in z.namelist() if n.endswith(".png")][:5]
        for n in pngs:
            (char_dir / n).parent.mkdir(parents=True, exist_ok=True)
            (char_dir / n).write_bytes(z.read(n))
    assert main(["embed", "--checkpoint", str(run / "best.pt"), "--images", str(char_dir), "--out",
                 str(tmp_path / "o.npz"), "--device", "cpu"]) == 0
    z = np.load(tmp_path / "o.npz")
    assert z["features"].shape == (5, 64) and np.isfinite(z["features"]).all()


@needs_omniglot
def test_test_split_of_other_classes_is_refused(tmp_path, capsys):
    """train on every alphabet but score base accuracy on base_test (other classes): one line, exit 2."""
    assert main(["train", str(ROOT / "configs" / "omniglot" / "conv4_neg_cosine.yaml"), f"data.root={OMNIGLOT_DIR}",
                 "data.train_split=train", "train.epochs=1", "val.every=0", "train.progress=false",
                 "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data.test_split" in err and "242 classes of data.train_split='train'" in err


@needs_omniglot
def test_omniglot_embedding_of_raw_files_matches_training_preprocessing(tmp_path):
    """Omniglot strokes are inverted by the reader; embed must apply the same step to raw PNGs."""
    import zipfile
    from lowshot.data import build_dataset
    run = tmp_path / "omni"
    assert main(["train", str(ROOT / "configs" / "omniglot" / "conv4_neg_cosine.yaml"), f"data.root={OMNIGLOT_DIR}",
                 "train.epochs=1", "train.max_steps_per_epoch=1", "val.every=0", "train.progress=false",
                 "--run-dir", str(run)]) == 0
    ck = load_checkpoint(run / "last.pt")
    assert ck["data"]["preprocess"] == {"invert": True}
    ds = build_dataset("omniglot", "train", root=str(OMNIGLOT_DIR), image_size=28)
    name = ds.class_names[0]
    with zipfile.ZipFile(OMNIGLOT_DIR / "images_background_small1.zip") as z:
        member = sorted(n for n in z.namelist() if f"/{name}/" in n and n.endswith(".png"))[0]
        (tmp_path / "one.png").write_bytes(z.read(member))
    from lowshot.data import load_image
    raw = load_image(tmp_path / "one.png", 28, 1, invert=True)
    assert torch.equal(raw, ds[0][0])  # the reader's first image of class 0 is the first drawer's file


def test_resume_refuses_new_overrides(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "head.margin=0.1"]) == 2  # train.epochs=N is allowed
    assert "config stored in its checkpoint" in capsys.readouterr().err
