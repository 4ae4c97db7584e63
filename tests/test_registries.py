"""One registry contract for every kind (timm style: parametrised over every ``list_*()``).

Each registered name builds with its defaults (on tiny inputs where that is cheap), an unknown
option is a ConfigError with a did-you-mean, a wrong-typed option is a ConfigError naming the
option, and aliases resolve to the registered name with the same metadata.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, Literal

import pytest
import torch

import lowshot.data  # noqa: F401  (registers the readers)
from lowshot.backbones import BACKBONES, create_backbone, list_backbones
from lowshot.data import DATASETS, build_dataset, list_datasets
from lowshot.data.samplers import SAMPLERS, create_sampler, list_samplers, needs_horizon
from lowshot.errors import ConfigError
from lowshot.fewshot import EVALUATORS, create_evaluator, list_evaluators, sample_episodes
from lowshot.heads import HEADS, Head, create_head, finetune_head_options, head_family, list_heads, register_head
from lowshot.longtail import STAGE2_METHODS, create_stage2_method, list_stage2_methods
from lowshot.longtail.stage2 import stage2_method_options
from lowshot.registry import Registry, convert

LABELS = torch.tensor([0] * 12 + [1] * 6 + [2] * 3)


def _create(kind: str, name: str, **kw: Any) -> Any:
    """Build ``name`` of ``kind`` the way its callers do (tiny, cheap arguments)."""
    if kind == "head":
        return create_head(name, 3, 4, **kw)
    if kind == "backbone":
        return create_backbone(name, **kw)
    if kind == "sampler":
        return create_sampler(name, LABELS, horizon=3, **kw)
    if kind == "evaluator":
        return create_evaluator(name, **kw)
    if kind == "stage2":
        return create_stage2_method(name, **kw)
    return build_dataset(name, "train", **kw)


REGISTRIES = {"head": (HEADS, list_heads, 2), "backbone": (BACKBONES, list_backbones, 0),
              "sampler": (SAMPLERS, list_samplers, 1), "evaluator": (EVALUATORS, list_evaluators, 0),
              "stage2": (STAGE2_METHODS, list_stage2_methods, 0), "dataset": (DATASETS, list_datasets, 0)}
ALL = [(kind, name) for kind, (_, lister, _) in REGISTRIES.items() for name in lister()]
POSITIONAL = {"dataset": {"split"}}  # given by the wrapper, not an option of the call


def _checked_options(kind: str, name: str) -> list[str]:
    reg, _, skip = REGISTRIES[kind]
    opts = list(reg.options(name).values())[skip:]
    return [o.name for o in opts if not convert(object(), o.hint)[0] and o.name not in POSITIONAL.get(kind, set())]


@pytest.mark.parametrize("name", list_heads())
def test_every_head_builds_with_defaults_and_gives_logits(name):
    head = create_head(name, 3, 4).eval()
    assert isinstance(head, Head) and head(torch.randn(5, 4)).shape == (5, 3)
    assert head_family(name) == HEADS.meta(name)["family"]


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_builds_with_defaults(name):
    assert isinstance(create_backbone(name).out_dim, int)


@pytest.mark.parametrize("name", list_samplers())
def test_every_sampler_builds_with_defaults(name):
    sampler = create_sampler(name, LABELS, horizon=3)
    assert len(list(sampler)) == len(LABELS)
    assert needs_horizon(name) == (name == "progressive")
    if needs_horizon(name):
        assert sampler.total_epochs == 3
        with pytest.raises(ConfigError, match="total_epochs"):
            create_sampler(name, LABELS)


@pytest.mark.parametrize("name", list_evaluators())
def test_every_evaluator_builds_with_defaults_and_scores(name):
    features = torch.randn(40, 6, dtype=torch.float64)
    labels = torch.arange(4).repeat_interleave(10)
    episodes = sample_episodes(labels, way=3, shot=1, query=2, episodes=2, seed=0)
    scores = create_evaluator(name).scores(features, episodes, 1)
    assert scores.shape == (2, 6, 3) and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", list_stage2_methods())
def test_every_stage2_method_builds_with_defaults_and_documents_its_options(name):
    method = create_stage2_method(name)
    options = stage2_method_options(name)
    assert [o.name for o in options if o.help] == [o.name for o in options]  # every option has its help
    assert set(method.options()) == {o.name for o in options}
    assert {o.name: o.default for o in options} == method.options()


@pytest.mark.parametrize("name", list_datasets())
def test_every_dataset_declares_its_reader_options(name):
    opts = DATASETS.options(name)
    assert list(opts)[:4] == ["split", "root", "image_size", "download"]


@pytest.mark.parametrize("kind,name", ALL)
def test_unknown_option_is_a_config_error_with_did_you_mean(kind, name):
    reg = REGISTRIES[kind][0]
    options = [o for o in list(reg.options(name))[REGISTRIES[kind][2]:] if o not in POSITIONAL.get(kind, set())]
    if reg._spec(reg.get(name))[1]:
        pytest.skip(f"{kind} {name!r} forwards **options to code that checks them")
    typo = options[-1] + "z"
    with pytest.raises(ConfigError, match=rf"{name}.*no option '{typo}'.*did you mean '{options[-1]}'|"
                                          rf"{name}.*no option '{typo}' \(valid: .*\); did you mean"):
        _create(kind, name, **{typo: 1})


@pytest.mark.parametrize("kind,name", ALL)
def test_wrong_typed_option_is_a_config_error_naming_it(kind, name):
    checked = _checked_options(kind, name)
    assert checked, f"{kind} {name!r} has no typed option"
    key = checked[-1]
    with pytest.raises(ConfigError, match=rf"{name}.* option '{key}' expects .*, got <object"):
        _create(kind, name, **{key: object()})


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_aliases_resolve_with_the_same_metadata(kind):
    reg = REGISTRIES[kind][0]
    names = reg.names()
    for alias in set(reg.names(include_aliases=True)) - set(names):
        assert reg.canonical(alias) in names and reg.meta(alias) == reg.meta(reg.canonical(alias))
        assert alias in reg.aliases(reg.canonical(alias))


# ----------------------------------------------------------------------------- the type checks


def test_registry_checks_and_converts_typed_values():
    reg = Registry("widget")

    @reg.register("w", "alias", colour="red")
    def make(flag: bool = False, n: int = 1, x: float = 0.5, s: str = "a", maybe: float | None = None,
             grid: list[float] | None = None, kw: dict[str, Any] | None = None,
             mode: Literal["a", "b"] = "a", center: str | bool = "all", free=None,
             angles: Sequence[int] | None = None) -> dict[str, Any]:
        return dict(flag=flag, n=n, x=x, s=s, maybe=maybe, grid=grid, kw=kw, mode=mode, center=center, free=free,
                    angles=angles)

    out = reg.create("alias", x=2, maybe=3, grid=(1, 2.5), kw={"k": 1}, mode="b", center=False, free=object,
                     angles=90)  # a protocol hint is the factory's to check (omniglot: a bare angle is its DataError)
    assert out["angles"] == 90
    assert out["x"] == 2.0 and isinstance(out["x"], float) and isinstance(out["maybe"], float)
    assert out["grid"] == [1.0, 2.5] and out["center"] is False and out["free"] is object
    assert reg.meta("alias") == {"colour": "red"} and reg.aliases("w") == ["alias"]
    bad = {"flag": (1, "true/false"), "n": (1.5, "an integer"), "x": ("1", "a number"), "s": (3, "a string"),
           "maybe": ("x", "a number or null"), "grid": ([1, "a"], "a list of numbers or null"),
           "kw": ([1], "a mapping"), "mode": ("c", "one of 'a', 'b'"), "center": (1, "a string or true/false")}
    for key, (value, expects) in bad.items():
        with pytest.raises(ConfigError) as err:
            reg.create("w", **{key: value})
        msg = str(err.value)
        assert msg.startswith(f"widget 'w' option '{key}' expects {expects}") and "\n" not in msg


def test_class_factories_check_base_options_through_kwargs_and_dataclasses_are_typed():
    reg = Registry("thing")

    class Base:
        def __init__(self, labels: Any, *, seed: int = 0) -> None:
            self.seed = seed

    @reg.register("child")
    class Child(Base):
        def __init__(self, labels: Any, *, q: float = 0.5, **kw: Any) -> None:
            super().__init__(labels, **kw)
            self.q = q

    @reg.register("opts")
    @dataclasses.dataclass
    class Opts:
        epochs: int = dataclasses.field(default=3, metadata={"help": "passes"})

    assert reg.create("child", [0], seed=2, q=1).seed == 2
    with pytest.raises(ConfigError, match="thing 'child' has no option 'sed'; did you mean 'seed'"):
        reg.create("child", [0], sed=1)
    with pytest.raises(ConfigError, match="'seed' expects an integer"):
        reg.create("child", [0], seed="0")
    assert reg.options("opts")["epochs"].help == "passes" and reg.create("opts", epochs=4).epochs == 4
    with pytest.raises(ConfigError, match="'epochs' expects an integer"):
        reg.create("opts", epochs=1.5)


# ----------------------------------------------------------------------------- a new head is one file


class ScaledHead(Head):
    """A plug-in inner-product head defined here, in the test module only: logits = 2 W x."""

    head_name = "test_scaled"

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self._check(features, labels)
        return 2.0 * features @ self.weight.t()

    def linear_parts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return 2.0 * self.weight.detach(), None


@pytest.fixture
def plugin_heads():
    register_head("test_scaled", "test_scaled_alias", family="neg_softmax")(
        lambda num_classes, embedding_size: ScaledHead(num_classes, embedding_size))
    register_head("test_new_family", family="test_family", finetune={"head": "cosine", "scale": 10.0})(
        lambda num_classes, embedding_size: ScaledHead(num_classes, embedding_size))
    yield
    HEADS.unregister("test_scaled")
    HEADS.unregister("test_new_family")


def test_a_head_registered_in_one_file_gets_its_finetune_options_and_linear_parts(plugin_heads):
    from lowshot.fewshot import method_kwargs_for_head
    from lowshot.longtail.methods import tau_norm

    assert head_family("test_scaled_alias") == "neg_softmax"
    assert method_kwargs_for_head("test_scaled", "finetune") == {"head": "linear", "bias": False, "scale": 5.0}
    assert finetune_head_options("test_new_family") == {"head": "cosine", "scale": 10.0}
    head = create_head("test_scaled", 3, 4).eval()
    x = torch.randn(6, 4)
    w, b = head.linear_parts()
    torch.testing.assert_close(x @ w.t(), head(x))
    # tau-norm asks the head for (W, b): a fake run with fixed tau and no validation split
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ctx = SimpleNamespace(model=SimpleNamespace(head=head), features=lambda split: (x, y))
    fit = tau_norm(ctx, {**create_stage2_method("tau_norm", tau=1.0, val_split=None).options(),
                         "test_split": "test"})
    torch.testing.assert_close(fit.head_state["weight"], w / w.norm(dim=1, keepdim=True))


def test_heads_without_linear_parts_refuse_naming_the_head():
    with pytest.raises(ConfigError, match="'cosine'.*use crt or ncm"):
        create_head("cosine", 3, 4).linear_parts()
    with pytest.raises(ValueError, match="family"):
        register_head("test_bad_family", family="nope")
