import pytest
import yaml
from hypothesis import given, settings, strategies as st

from lowshot.config import (Config, all_keys, apply_overrides, dump_yaml, from_dict, load_config,
                            parse_override, to_dict)
from lowshot.errors import ConfigError


def test_defaults_roundtrip_through_yaml():
    cfg = Config()
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["head.margin=-0.02", "train.epochs=3", "optim.nesterov=true",
                                     "model.backbone_kwargs.drop_rate=0.1", "augment.crop_scale=null",
                                     "schedule.milestones=[60,120]"])
    assert cfg.head.margin == -0.02 and cfg.train.epochs == 3 and cfg.optim.nesterov is True
    assert cfg.model.backbone_kwargs == {"drop_rate": 0.1}
    assert cfg.augment.crop_scale is None and cfg.schedule.milestones == [60, 120]
    assert isinstance(apply_overrides(Config(), ["optim.lr=1"]).optim.lr, float)  # int accepted for float


@pytest.mark.parametrize("override, message", [
    ("head.margn=0.1", "'head.margin'"),
    ("optim.momentun=0.5", "'optim.momentum'"),
    ("trian.epochs=2", "'train'"),
])
def test_unknown_key_suggests_closest(override, message):
    with pytest.raises(ConfigError, match="unknown config key") as e:
        apply_overrides(Config(), [override])
    assert message in str(e.value)


@pytest.mark.parametrize("override, expected", [
    ("train.epochs=abc", "expects int"),
    ("head.margin=[1]", "expects float"),
    ("optim.lr=1e-3x", "expects float"),
    ("optim.nesterov=3", "expects bool"),
    ("train.batch_size=0", "must be > 0"),
    ("optim.name=rmsprop", "sgd, adam, adamw"),
    ("train=3", "is a section"),
    ("nokeyvalue", "key=value"),
])
def test_bad_values_name_key_and_type(override, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        apply_overrides(Config(), [override])
    assert override.split("=")[0].split(".")[0] in str(e.value) or "key=value" in str(e.value)


def test_yaml_file_with_base_and_unknown_key(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 7\nhead:\n  name: linear\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nhead:\n  margin: -0.1\n  name: cosine\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.seed=3"])
    assert (cfg.train.epochs, cfg.head.name, cfg.head.margin, cfg.train.seed) == (7, "cosine", -0.1, 3)
    (tmp_path / "bad.yaml").write_text("head:\n  scael: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'head.scale'"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_shipped_config_loads():
    from pathlib import Path
    files = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))
    assert files, "configs/ should ship recipes"
    for f in files:
        load_config(f)


scalars = st.one_of(st.integers(-1000, 1000), st.floats(-1e3, 1e3, allow_nan=False), st.booleans(),
                    st.text(alphabet="abcxyz_", min_size=1, max_size=6))


@settings(max_examples=50, deadline=None)
@given(margin=st.floats(-1, 1, allow_nan=False), epochs=st.integers(0, 500), extra=st.dictionaries(
    st.text(alphabet="abcxyz", min_size=1, max_size=5), scalars, max_size=3))
def test_config_roundtrip_property(margin, epochs, extra):
    cfg = apply_overrides(Config(), [f"head.margin={margin!r}", f"train.epochs={epochs}"])
    cfg.head.kwargs = extra
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_parse_override_values():
    assert parse_override("a.b=-0.5") == ("a.b", -0.5)
    assert parse_override("a=hello") == ("a", "hello")
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert "head.margin" in all_keys()


def test_exponent_floats_without_dot():
    # PyYAML reads '1e-3' as a string; float keys must still accept it
    assert apply_overrides(Config(), ["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)


def test_amp_off_written_bare_in_yaml():
    # YAML 1.1 reads `off` as false; the config must still mean "no autocast"
    assert apply_overrides(Config(), ["train.amp=off"]).train.amp == "off"
    assert apply_overrides(Config(), ["train.amp=bf16"]).train.amp == "bf16"
    with pytest.raises(ConfigError, match="train.amp"):
        apply_overrides(Config(), ["train.amp=on"])


def test_affine_augmentation_section_reaches_the_train_transform():
    from lowshot.data.transforms import RandomAffine
    from lowshot.train import make_transforms
    from lowshot.data.base import TensorImageDataset
    import torch
    cfg = load_config(None, ["augment.affine.degrees=10", "augment.affine.scale=[0.8,1.2]",
                             "augment.affine.translate=0.1", "augment.affine.shear=15"])
    assert cfg.augment.affine.scale == [0.8, 1.2] and cfg.augment.affine.shear == 15.0
    ds = TensorImageDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4), list("abcd"))
    train_tf, test_tf, _ = make_transforms(cfg, ds)
    warp = [t for t in train_tf.transforms if isinstance(t, RandomAffine)]
    assert len(warp) == 1 and warp[0].degrees == (-10.0, 10.0) and warp[0].scale == (0.8, 1.2)
    assert not any(isinstance(t, RandomAffine) for t in test_tf.transforms)  # never at test time
    assert not any(isinstance(t, RandomAffine) for t in make_transforms(load_config(), ds)[0].transforms)
    with pytest.raises(ConfigError, match="augment.affine.degrees"):
        load_config(None, ["augment.affine.degrees=-5"])
    with pytest.raises(ConfigError, match="augment.affine.scale"):
        load_config(None, ["augment.affine.scale=[1.2,0.8]"])
    with pytest.raises(ConfigError, match="augment.affine.degres"):
        load_config(None, ["augment.affine.degres=5"])
