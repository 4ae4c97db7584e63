"""Stage 2 on a real (tiny) Fashion-MNIST-LT run: checkpoints, reported accuracy, tau curve, cache."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import ROOT, needs_fmnist

from lowshot.checkpoint import load_checkpoint, save_checkpoint
from lowshot.config import load_config
from lowshot.data import build_dataset
from lowshot import inference
from lowshot.inference import FrozenRun
from lowshot.errors import ConfigError
from lowshot.heads import create_head
from lowshot.data.loader import BatchLoader
from lowshot.heads.ncm import ncm_fit
from lowshot.longtail import stage2, tau_normalize
from lowshot.longtail.metrics import shot_thresholds
from lowshot.longtail.stage2 import decouple, evaluate_checkpoint
from lowshot.models import model_from_checkpoint
from lowshot.train import train

# 120 images per class, 20 of them carved as val, IF=10 on the remaining 100: 100, 77, ..., 10
OPTIONS = "data.options={max_per_class: 120, val_per_class: 20, imbalance_factor: 10}"
FAST = {"crt": {"epochs": 3, "batch_size": 64}, "lws": {"epochs": 3, "batch_size": 64}, "tau_norm": {}, "ncm": {}}
quiet = lambda _msg: None


@pytest.fixture(autouse=True)
def few_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = load_config(ROOT / "configs/fashion_mnist_lt/conv4_joint.yaml",
                      [OPTIONS, "train.epochs=1", "train.batch_size=32", "train.progress=false", "data.test_split=null"])
    run_dir = tmp_path_factory.mktemp("lt_run")
    train(cfg, run_dir, overwrite=True, log=quiet)
    return run_dir / "last.pt"


def _test_set():
    return build_dataset("fashion_mnist_lt", "test", max_per_class=120, val_per_class=20, imbalance_factor=10)


@torch.no_grad()
def _accuracy_of(path) -> tuple[float, torch.Tensor]:
    """End-to-end accuracy of a saved checkpoint on the test images (no cached features)."""
    run = FrozenRun.open(path, device="cpu")
    model, transform = run.model, run.transform
    ds = _test_set()
    preds = torch.cat([model(transform(x)).argmax(1) for x, _ in BatchLoader(ds, 500)])
    return 100.0 * float((preds == ds.labels).double().mean()), preds


@needs_fmnist
@pytest.mark.parametrize("method,head", [("crt", "linear"), ("tau_norm", "linear"), ("lws", "linear"),
                                         ("ncm", "ncm")])
def test_each_method_writes_a_checkpoint_that_reproduces_its_report(run, method, head):
    out, res = decouple(run, method, log=quiet, **FAST[method])
    assert out == run.parent / f"decouple_{method}.pt"
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["metrics"]["all"] == pytest.approx(res["metrics"]["all"])
    ck = load_checkpoint(out)
    assert ck["kind"] == "decouple" and ck["method"] == method and ck["source"] == str(run)
    assert ck["source_info"]["head"] == "linear" and ck["backbone_updated"] is False
    model, cfg = model_from_checkpoint(ck)
    assert cfg.head.name == head and cfg.data.name == "fashion_mnist_lt"
    if method == "tau_norm":
        assert model.head.bias is None  # tau-norm drops the bias
    src = load_checkpoint(run)
    assert all(torch.equal(ck["model"][k], src["model"][k]) for k in src["model"])  # backbone untouched
    acc, _ = _accuracy_of(out)
    assert acc == pytest.approx(res["metrics"]["all"], abs=100.0 / 1200 + 1e-9)  # at most one image apart
    assert res["thresholds"]["rule"] == "rank"  # 100..10 images: no class has > 100
    assert res["train_counts"] == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    assert [r["group"] for r in res["metrics"]["per_class"]] == ["many"] * 3 + ["medium"] * 4 + ["few"] * 3
    assert res["joint"]["all"] == pytest.approx(evaluate_checkpoint(run, log=quiet)["metrics"]["all"])
    again = evaluate_checkpoint(out, log=quiet)  # the decoupled checkpoint evaluates to the same numbers
    assert again["metrics"]["all"] == pytest.approx(res["metrics"]["all"]) and again["method"] == method


@needs_fmnist
def test_tau_norm_picks_tau_on_val_and_saves_the_curve(run):
    out, res = decouple(run, "tau_norm", log=quiet)
    info = res["info"]
    curve = info["tau_curve"]
    assert [round(t, 6) for t, _ in curve] == [round(0.1 * i, 6) for i in range(21)]
    best = max(a for _, a in curve)
    assert info["tau"] == next(t for t, a in curve if a == best)  # first (smallest) best tau
    assert info["tau_source"] == "best on val" and len(info["test_curve"]) == 21
    ck = load_checkpoint(out)
    assert ck["tau_curve"] == ck["info"]["tau_curve"] == curve and ck["tau"] == info["tau"]
    assert ck["results"]["info"]["tau"] == info["tau"]
    w = load_checkpoint(run)["head"]["weight"]
    torch.testing.assert_close(ck["head"]["weight"], tau_normalize(w, info["tau"]))
    # the curve is measured on the balanced val split (20 per class), not on test
    ctx = FrozenRun.open(run, device="cpu", same_classes=True, log=quiet)
    vf, vy = ctx.features("val")
    assert vy.numel() == 200
    acc1 = 100.0 * float(((vf @ tau_normalize(w, 1.0).t()).argmax(1) == vy).double().mean())
    assert {round(t, 6): a for t, a in curve}[1.0] == pytest.approx(acc1)
    out2, fixed = decouple(run, "tau", tau=0.5, grid=[0, 0.5, 1], log=quiet)
    assert fixed["info"]["tau"] == 0.5 and fixed["info"]["tau_source"] == "fixed"
    assert [t for t, _ in fixed["info"]["tau_curve"]] == [0.0, 0.5, 1.0]
    torch.testing.assert_close(load_checkpoint(out2)["head"]["weight"], tau_normalize(w, 0.5))
    with pytest.raises(ConfigError, match="tau=VALUE"):
        decouple(run, "tau_norm", val_split=None, log=quiet)


@needs_fmnist
def test_ncm_head_holds_the_class_means_of_cached_train_features(run):
    out, _ = decouple(run, "ncm", metric="cosine", log=quiet)
    ck = load_checkpoint(out)
    f, y = FrozenRun.open(run, device="cpu", same_classes=True, log=quiet).features("train")
    means, center = ncm_fit(f, y)
    torch.testing.assert_close(ck["head"]["weight"], means)
    torch.testing.assert_close(ck["head"]["center"], center)
    assert ck["config"]["head"] == {"name": "ncm", "margin": 0.0, "scale": None, "kwargs": {"metric": "cosine"}}


@needs_fmnist
def test_feature_cache_is_reused_and_keyed_on_the_backbone(run, tmp_path, monkeypatch):
    ckpt = tmp_path / "last.pt"
    shutil.copyfile(run, ckpt)
    calls: list[int] = []
    real = inference.extract_features

    def counting(backbone, dataset, *a, **kw):
        calls.append(len(dataset))
        return real(backbone, dataset, *a, **kw)

    monkeypatch.setattr(inference, "extract_features", counting)
    decouple(ckpt, "ncm", log=quiet)
    assert sorted(calls) == [403, 1200]  # train + test
    evaluate_checkpoint(ckpt, log=quiet)
    decouple(ckpt, "ncm", log=quiet)
    assert len(calls) == 2  # everything came from <run_dir>/features/
    decouple(ckpt, "tau_norm", log=quiet)
    assert len(calls) == 3 and len(list((tmp_path / "features").glob("*.pt"))) == 3  # + val
    ck = load_checkpoint(ckpt)  # a changed backbone must not read stale features
    first = next(k for k in ck["model"] if k.endswith("weight"))
    ck["model"][first] = ck["model"][first] * 1.5
    save_checkpoint(ck, ckpt)
    decouple(ckpt, "ncm", log=quiet)
    assert len(calls) == 5
    decouple(ckpt, "ncm", cache=False, out=tmp_path / "nocache.pt", log=quiet)
    assert len(calls) == 7


@needs_fmnist
@pytest.mark.parametrize("freeze_bn", [True, False])
def test_crt_on_images_bn_modes_are_saved(run, tmp_path, freeze_bn):
    out, res = decouple(run, "crt", images=True, freeze_bn=freeze_bn, epochs=1, batch_size=64,
                        out=tmp_path / "crt_img.pt", log=quiet)
    ck, src = load_checkpoint(out), load_checkpoint(run)
    stats = [k for k in src["model"] if k.endswith("running_mean")]
    params = [k for k in src["model"] if k.endswith("weight")]
    assert stats and all(torch.equal(ck["model"][k], src["model"][k]) for k in params)  # never trained
    moved = any(not torch.equal(ck["model"][k], src["model"][k]) for k in stats)
    assert moved == (not freeze_bn)
    assert {k: res["info"][k] for k in ("mode", "freeze_bn")} == {"mode": "images", "freeze_bn": freeze_bn}
    assert ck["backbone_updated"] == (not freeze_bn)
    acc, _ = _accuracy_of(out)  # reported numbers use the saved (BN-updated) backbone
    assert acc == pytest.approx(res["metrics"]["all"], abs=100.0 / 1200 + 1e-9)


@needs_fmnist
def test_option_errors(run):
    with pytest.raises(ConfigError, match=r"no option 'epochz' \(valid: .*epochs"):
        decouple(run, "crt", epochz=3, log=quiet)
    with pytest.raises(ConfigError, match="did you mean 'crt'"):
        decouple(run, "crtt", log=quiet)
    with pytest.raises(ConfigError, match="'epochs' expects an integer"):
        decouple(run, "lws", epochs=1.5, log=quiet)
    with pytest.raises(ConfigError, match="no option 'tau'"):
        decouple(run, "ncm", tau=1.0, log=quiet)
    with pytest.raises(ConfigError, match="thresholds"):
        decouple(run, "ncm", thresholds="median", log=quiet)
    with pytest.raises(ConfigError, match="overwrite the source"):
        decouple(run, "ncm", out=run, log=quiet)


def test_linear_parts_reproduce_eval_logits():
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    for name, kw in (("linear", {}), ("neg_softmax", {"bias": True}), ("virtual_softmax", {})):
        head = create_head(name, 3, 4, **kw).eval()
        w, b = head.linear_parts()
        torch.testing.assert_close(x @ w.t() + (0 if b is None else b), head(x))
    with pytest.raises(ConfigError, match="'cosine'.*use crt or ncm"):
        create_head("cosine", 3, 4).linear_parts()


def test_shot_thresholds_rules():
    assert shot_thresholds([500, 50, 10])["rule"] == "official"
    fm = shot_thresholds([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])  # Fashion-MNIST-LT IF=100
    assert (fm["rule"], fm["many"], fm["few"]) == ("rank", 1077, 232)
    forced = shot_thresholds([500, 50, 10], "rank")
    assert (forced["rule"], forced["many"], forced["few"]) == ("rank", 50, 50)
    assert shot_thresholds([5000, 50], "official")["rule"] == "official"


@needs_fmnist
@pytest.mark.parametrize("method", ["crt", "lws"])
def test_stage2_trains_like_the_official_loop_by_default(run, method):
    """Per-epoch cosine with the last epoch at lr 0 and the best epoch on the balanced val split kept
    (classifier-balancing run_networks.py:157-160, :255, :356-362); select=last keeps the final epoch."""
    _, res = decouple(run, method, log=quiet, out=run.parent / f"official_{method}.pt", **FAST[method])
    info = res["info"]
    assert (info["schedule"], info["select"], info["val_split"]) == ("epoch", "best_val", "val")
    assert info["epoch_lrs"] == pytest.approx([0.15, 0.05, 0.0], abs=1e-12)
    assert len(info["val_curve"]) == 3 and info["best_epoch"] == info["val_curve"].index(max(info["val_curve"])) + 1
    _, last = decouple(run, method, log=quiet, out=run.parent / f"last_{method}.pt", select="last",
                       schedule="step", **FAST[method])
    assert "best_epoch" not in last["info"] and last["info"]["epoch_lrs"][-1] > 0
    with pytest.raises(ConfigError, match="val_split"):
        decouple(run, method, log=quiet, out=run.parent / "x.pt", val_split="nope", **FAST[method])
