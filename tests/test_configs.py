"""Every shipped config loads, builds its model and runs a forward pass (no data needed).

Catches typos in keys, head/backbone options, sampler and few-shot method options, and broken
``base:`` chains before anyone spends GPU hours; also checks the paper-table headers name a target.
"""
import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lowshot.config import load_config
from lowshot.data import build_dataset
from lowshot.data.registry import DATASETS
from lowshot.models import build_model
from lowshot.train import build_train_sampler

from conftest import ROOT

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
PAPER_DIRS = ("neg_margin", "decoupling", "virtual_softmax", "cross_domain")
# (channels, default image size) of each reader, so models can be built without the data.
READER_SHAPE = {"fashion_mnist": (1, 28), "fashion_mnist_lt": (1, 28), "omniglot": (1, 28), "mini_imagenet": (3, 84),
                "tiered_imagenet": (3, 84), "cub": (3, 224), "cifar10": (3, 32), "cifar100": (3, 32),
                "cifar_fs": (3, 32), "fc100": (3, 32), "imagenet_lt": (3, None)}


def test_configs_exist_for_every_paper_table():
    for d in PAPER_DIRS:
        assert [p for p in CONFIGS if p.parent.name == d and not p.name.startswith("_")], d


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_builds_and_runs(path):
    cfg = load_config(path)
    name = DATASETS.canonical(cfg.data.name)
    channels, default_size = READER_SHAPE[name]
    size = cfg.data.image_size or default_size
    assert size is not None, f"{path}: dataset {name} has no default image size; set data.image_size"
    model = build_model(cfg, 7, channels, size)
    build_train_sampler(cfg, torch.arange(7).repeat(3))  # sampler name and options
    if cfg.train.batch_size % 8 and cfg.train.batch_size >= 64:
        pytest.fail(f"{path}: batch {cfg.train.batch_size} cannot be split over 8 GPUs")
    model.eval()
    with torch.no_grad():
        if hasattr(model.backbone, "final_side"):  # conv4/conv6 flatten: out_dim depends on the input size
            assert model.backbone(torch.randn(1, channels, size, size)).shape == (1, model.backbone.out_dim)
        model.head.train()  # margins / the virtual class only act in training, with labels
        assert model.head(torch.randn(2, model.backbone.out_dim), torch.tensor([0, 6])).shape[0] == 2
    from lowshot.fewshot.finetune import FinetuneConfig
    fields = set(FinetuneConfig.__dataclass_fields__)
    for section in (cfg.val, cfg.eval):
        if section.method == "finetune":
            assert set(section.options) <= fields, f"{path}: unknown finetune options {set(section.options) - fields}"
            FinetuneConfig(**section.options)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name in PAPER_DIRS],
                         ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_paper_configs_name_their_target_and_command(path):
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert header, f"{path} has no header comment"
    if not path.name.startswith("_"):
        assert "target" in header.lower(), f"{path}: header names no published target"
        assert "lowshot train" in header or "lowshot.cli train" in header, f"{path}: header has no command"


def _write_split(root: Path, part: str, wnids: list[str], per_class: int) -> None:
    with open(root / f"{part}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        for c, wnid in enumerate(wnids):
            for k in range(1, per_class + 1):
                name = f"{wnid}{k:08d}.jpg"
                from PIL import Image
                Image.new("RGB", (8, 8), (c * 40, 0, 0)).save(root / "images" / name, format="JPEG")
                w.writerow([name, wnid])


def test_mini_imagenet_all_split_joins_the_three_class_sets(tmp_path):
    """The cross-domain protocol trains on all 100 mini-ImageNet classes: split 'all'."""
    (tmp_path / "images").mkdir()
    parts = {"train": ["n03", "n01"], "val": ["n05"], "test": ["n02", "n04"]}
    for part, wnids in parts.items():
        _write_split(tmp_path, part, wnids, per_class=2)
    all_ = build_dataset("mini_imagenet", "all", root=str(tmp_path), image_size=8)
    assert all_.class_names == ["n01", "n02", "n03", "n04", "n05"] and len(all_) == 10
    assert torch.bincount(all_.labels).tolist() == [2] * 5
    assert build_dataset("mini_imagenet", "base", root=str(tmp_path), image_size=8).class_names == ["n01", "n03"]
    # the pickle-cache layout joins the same way (labels re-indexed by sorted class name)
    cache = tmp_path / "cache"
    cache.mkdir()
    for part, wnids in parts.items():
        n = 2 * len(wnids)
        data = np.full((n, 84, 84, 3), len(part), np.uint8)
        obj = {"image_data": data, "class_dict": {w: [2 * i, 2 * i + 1] for i, w in enumerate(wnids)}}
        (cache / f"mini-imagenet-cache-{part}.pkl").write_bytes(pickle.dumps(obj, protocol=4))
    cached = build_dataset("mini_imagenet", "all", root=str(cache))
    assert cached.class_names == all_.class_names and torch.bincount(cached.labels).tolist() == [2] * 5
    assert int(cached[int(torch.nonzero(cached.labels == 4)[0])][0][0, 0, 0]) == len("val")  # n05 is in val


@pytest.mark.parametrize("name", ["mini_resnet12", "tiered_resnet12", "cub_resnet12"])
def test_mmfewshot_resnet12_recipes_train_without_dropout(name):
    """mmfewshot builds ResNet12 with its default drop_rate=0.0 (backbones/resnet12.py:113)."""
    cfg = load_config(ROOT / "configs" / "neg_margin" / f"{name}.yaml")
    net = build_model(cfg, 5, 3, 84).backbone
    assert net.drop_rate == 0.0 and net.block_rates() == [0.0] * 4


@pytest.mark.parametrize("shot", [1, 5])
def test_official_resnet12_recipes_ramp_dropblock_over_40k_steps(shot):
    """bl0 lib/backbone/resnet12.py:65: DropBlock ramps over 20 * 2000 steps; scripts set drop_rate 0.1."""
    cfg = load_config(ROOT / "configs" / "neg_margin" / f"mini_resnet12_official_{shot}shot.yaml")
    net = build_model(cfg, 5, 3, 84).backbone.train()
    assert net.drop_rate == 0.1 and net.dropblock_ramp_steps == 40000
    assert net.block_rates() == pytest.approx([0.1, 0.1, 0.0, 0.0])
    net.set_train_step(20000)
    assert net.block_rates() == pytest.approx([0.1, 0.1, 0.05, 0.05])
