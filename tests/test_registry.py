import pytest

from lowshot.errors import ConfigError
from lowshot.registry import Registry


def test_register_alias_create_and_list():
    reg = Registry("widget")

    @reg.register("box", "crate")
    def make_box(size: int = 1, *, color: str = "red"):
        return (size, color)

    assert reg.create("crate", size=3) == (3, "red")
    assert reg.names() == ["box"] and reg.names(include_aliases=True) == ["box", "crate"]
    assert "crate" in reg and reg.canonical("crate") == "box"
    with pytest.raises(ValueError, match="already registered"):
        reg.register("crate")(make_box)


def test_unknown_name_and_option_are_config_errors_with_suggestions():
    reg = Registry("widget")
    reg.register("cosine")(lambda margin=0.0, scale=1.0: (margin, scale))
    with pytest.raises(ConfigError, match="unknown widget 'cosin'; did you mean 'cosine'"):
        reg.create("cosin")
    with pytest.raises(ConfigError, match="widget 'cosine' has no option 'margn'; did you mean 'margin'"):
        reg.create("cosine", margn=0.1)
    # factories taking **kwargs check their own options
    reg.register("free")(lambda **kw: kw)
    assert reg.create("free", anything=1) == {"anything": 1}


def test_dataset_option_typo_is_named(tmp_path):
    from lowshot.data import build_dataset
    with pytest.raises(ConfigError, match="has no option 'max_per_clas'; did you mean 'max_per_class'"):
        build_dataset("fashion_mnist", "base", max_per_clas=3)
