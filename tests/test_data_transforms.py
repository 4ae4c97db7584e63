"""Batch transforms: exact eval normalisation, seeded determinism, flip, identity crop, jitter."""
from __future__ import annotations

import pytest
import torch

from lowshot.data.transforms import (
    ColorJitter,
    MatchChannels,
    Normalize,
    RandomAffine,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    build_transform,
    default_stats,
)
from lowshot.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _batch(b: int = 6, c: int = 3, s: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, s, s), generator=g, dtype=torch.uint8)


def test_eval_transform_is_exact_normalisation() -> None:
    x = _batch()
    out = build_transform(False, 16, 3, MEAN, STD)(x)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and torch.equal(out, (x.float() / 255 - mean) / std)
    # hand value: pixel 255 in the red channel -> (1 - 0.485) / 0.229
    one = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    assert build_transform(False, None, 3, MEAN, STD)(one)[0, 0, 0, 0].item() == pytest.approx(0.515 / 0.229)
    floats = x.float() / 255  # float input is taken to be in [0, 1] already
    assert torch.equal(build_transform(False, 16, 3, MEAN, STD)(floats), out)


def test_train_transform_shapes_and_seeded_determinism() -> None:
    x = _batch(8, 1, 28)
    t = build_transform(True, 20, 3, *default_stats("fashion_mnist", 3), jitter=0.4)
    torch.manual_seed(123)
    a = t(x)
    torch.manual_seed(123)
    b = t(x)
    assert a.shape == (8, 3, 20, 20) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, t(x))  # a fresh draw differs
    assert not torch.equal(a[0], a[1])  # parameters are per sample


def test_flip() -> None:
    x = _batch().float()
    assert torch.equal(RandomHorizontalFlip(1.0)(x), x.flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(x), x)
    torch.manual_seed(0)
    mixed = RandomHorizontalFlip(0.5)(_batch(64).float())
    ref = _batch(64).float()
    flipped = [torch.equal(m, r.flip(-1)) for m, r in zip(mixed, ref)]
    kept = [torch.equal(m, r) for m, r in zip(mixed, ref)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_full_crop_is_identity_and_boxes_respect_bounds() -> None:
    x = _batch().float() / 255
    out = RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))(x)
    assert torch.allclose(out, x, atol=1e-5)
    crop = RandomResizedCrop(8, scale=(0.2, 0.5))
    torch.manual_seed(1)
    boxes = crop.boxes(500, 30, 40, torch.device("cpu"))
    x0, y0, w, h = boxes.unbind(1)
    assert bool((x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 40 + 1e-4).all() and (y0 + h <= 30 + 1e-4).all())
    area = w * h / (30 * 40)
    assert bool((area > 0.2 - 1e-4).all() and (area < 0.5 + 1e-4).all())
    assert bool(((w / h) > 0.75 - 1e-4).all() and ((w / h) < 4 / 3 + 1e-4).all())


def test_crop_samples_the_given_box() -> None:
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16)
    crop = RandomResizedCrop(8)
    boxes = torch.tensor([[4.0, 2.0, 8.0, 8.0], [0.0, 8.0, 8.0, 8.0]])
    out = crop.apply(x, boxes)  # scale 1: output pixels are the input pixels of the box
    assert torch.allclose(out[0], x[0, :, 2:10, 4:12]) and torch.allclose(out[1], x[1, :, 8:16, 0:8])
    # a 16x16 box into 8x8: every output pixel is the mean of a 2x2 input block (bilinear midpoint)
    half = crop.apply(x, torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2))
    assert torch.allclose(half, torch.nn.functional.avg_pool2d(x, 2))


def test_crop_fallback_is_centred_ratio_clamped() -> None:
    # a 2:1 box can never have the full area of a square image: all tries fail -> centred fallback
    crop = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(2.0, 2.0))
    assert crop.boxes(3, 20, 20, torch.device("cpu")).tolist() == [[0.0, 5.0, 20.0, 10.0]] * 3
    x = torch.zeros(1, 1, 20, 20)
    x[:, :, 5:15] = 1.0  # the centred band is exactly the fallback box
    assert torch.allclose(crop(x), torch.ones(1, 1, 8, 8))


def test_color_jitter_hand_values() -> None:
    x = torch.tensor([0.1, 0.2, 0.6]).view(1, 3, 1, 1).expand(2, 3, 2, 2).clone()
    assert torch.allclose(ColorJitter(brightness=(2.0, 2.0))(x), torch.tensor([0.2, 0.4, 1.0]).view(1, 3, 1, 1)
                          .expand(2, 3, 2, 2))
    grey = 0.299 * 0.1 + 0.587 * 0.2 + 0.114 * 0.6
    sat0 = ColorJitter(saturation=(0.0, 0.0))(x)
    assert torch.allclose(sat0, torch.full_like(x, grey), atol=1e-6)
    y = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    assert torch.allclose(ColorJitter(contrast=(0.0, 0.0))(y), torch.full_like(y, 0.5))
    assert torch.allclose(ColorJitter(contrast=(0.5, 0.5))(y), torch.tensor([0.25, 0.75]).view(1, 1, 1, 2).expand(1, 1, 2, 2))
    g = torch.rand(4, 1, 5, 5)
    assert torch.equal(ColorJitter(saturation=0.9)(g), g)  # no-op for grey
    with pytest.raises(ConfigError):
        ColorJitter(brightness=-0.1)


def test_resize_normalize_match_channels_and_stats() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert Resize(8)(x) is x and Resize(4)(x).shape == (2, 3, 4, 4)
    assert torch.allclose(Resize(4)(torch.full((1, 1, 8, 8), 0.3)), torch.full((1, 1, 4, 4), 0.3))
    n = Normalize((0.5,), (0.25,))(torch.tensor([[[[0.0, 1.0]]]]))
    assert n.flatten().tolist() == [-2.0, 2.0]
    assert MatchChannels(3)(torch.ones(1, 1, 2, 2)).shape == (1, 3, 2, 2)
    rgb = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert MatchChannels(1)(rgb).item() == pytest.approx(0.299)
    assert default_stats("fashion-mnist", 1) == ((0.2860,), (0.3530,))
    assert default_stats("fashion_mnist", 3) == ((0.2860,) * 3, (0.3530,) * 3)
    assert default_stats("mini_imagenet", 3) == (MEAN, STD)
    assert default_stats("fmnist", 1) == ((0.2860,), (0.3530,))  # aliases resolve
    assert default_stats("cifar_fs", 3)[0] == (0.5071, 0.4865, 0.4409)
    m, _ = default_stats("imagenet", 1)
    assert m[0] == pytest.approx(0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406)
    with pytest.raises(ConfigError, match="mean"):
        build_transform(False, 8, 3, MEAN, None)
    with pytest.raises(ConfigError, match="channels must be 1 or 3, got 2"):
        build_transform(False, 8, 2, MEAN, STD)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_transform_runs_on_gpu_and_stays_there() -> None:
    x = _batch(4, 3, 32).cuda()
    t = build_transform(True, 24, 3, MEAN, STD, jitter=0.4,
                        affine={"degrees": 10, "shear": 15, "scale": [0.8, 1.2], "translate": 0.1})
    torch.manual_seed(0)
    a = t(x)
    torch.manual_seed(0)
    assert a.is_cuda and a.shape == (4, 3, 24, 24) and torch.equal(a, t(x))
    cpu = build_transform(False, 32, 3, MEAN, STD)
    assert torch.allclose(cpu(x).cpu(), cpu(x.cpu()), atol=1e-6)


# ----------------------------------------------------------------------------- RandomAffine

def _affine_params(b: int = 1, **kw: float) -> dict[str, torch.Tensor]:
    base = {"angle": 0.0, "shear": 0.0, "scale": 1.0, "tx": 0.0, "ty": 0.0} | kw
    return {k: torch.full((b,), float(v)) for k, v in base.items()}


def _dot(side: int, row: int, col: int) -> torch.Tensor:
    img = torch.zeros(1, 1, side, side)
    img[0, 0, row, col] = 1.0
    return img


def test_affine_identity_params_give_the_input_back() -> None:
    x = _batch(3, 3, 12).float() / 255
    warp = RandomAffine(degrees=30, translate=0.2, scale=(0.5, 2.0), shear=20)
    assert torch.allclose(warp.apply(x, _affine_params(3)), x, atol=1e-6)
    # non-square too (the geometry is in pixel units)
    y = torch.rand(2, 1, 6, 10)
    assert torch.allclose(warp.apply(y, _affine_params(2)), y, atol=1e-6)
    # zero ranges are skipped by build_transform: the train transform is then crop-free resize only
    t = build_transform(True, 12, 3, None, None, crop_scale=None, flip=False, affine={"degrees": 0.0})
    assert [type(s).__name__ for s in t.transforms] == ["ToFloat", "MatchChannels", "Resize"]


def test_affine_rotation_moves_a_dot_counter_clockwise() -> None:
    # 5x5 image, dot one pixel above the centre (row 1, col 2).
    warp = RandomAffine()
    img = _dot(5, 1, 2)
    out = warp.apply(img, _affine_params(angle=90))      # counter-clockwise on screen: to the left
    assert torch.allclose(out, _dot(5, 2, 1), atol=1e-5)
    out = warp.apply(img, _affine_params(angle=-90))     # clockwise: to the right
    assert torch.allclose(out, _dot(5, 2, 3), atol=1e-5)
    out = warp.apply(img, _affine_params(angle=180))
    assert torch.allclose(out, _dot(5, 3, 2), atol=1e-5)


def test_affine_translation_scale_and_shear_hand_values() -> None:
    warp = RandomAffine()
    x = torch.rand(1, 1, 5, 8)
    # +1 pixel right (tx = 1/8 of the width), +2 pixels down (ty = 2/5 of the height)
    out = warp.apply(x, _affine_params(tx=1 / 8, ty=2 / 5))
    assert torch.allclose(out[..., 2:, 1:], x[..., :-2, :-1], atol=1e-6)
    assert out[..., :2, :].abs().max() == 0 and out[..., :, :1].abs().max() == 0  # zeros come in
    # zoom x2 about the centre: a dot 1 px right of the centre lands 2 px right of it
    out = warp.apply(_dot(7, 3, 4), _affine_params(scale=2.0))
    assert out[0, 0, 3, 5].item() == pytest.approx(1.0, abs=1e-5)
    assert out[0, 0, 3, 4].item() == pytest.approx(0.5, abs=1e-5)  # p_in = 0.5 px: bilinear half
    # x-shear by 45 deg: x' = x + y, so a dot 1 px below the centre moves 1 px right
    out = warp.apply(_dot(7, 4, 3), _affine_params(shear=45))
    assert torch.allclose(out, _dot(7, 4, 4), atol=1e-5)
    # translation is applied after the rotation: rotate the dot, then shift it right by one pixel
    out = warp.apply(_dot(5, 1, 2), _affine_params(angle=90, tx=1 / 5))
    assert torch.allclose(out, _dot(5, 2, 2), atol=1e-5)


def test_affine_random_draws_are_seeded_per_sample_and_in_range() -> None:
    warp = RandomAffine(degrees=10, translate=0.1, scale=(0.8, 1.2), shear=(-5, 20))
    torch.manual_seed(3)
    p = warp.params(1000, torch.device("cpu"))
    assert p["angle"].abs().max() <= 10 and p["angle"].std() > 4
    assert p["tx"].abs().max() <= 0.1 and p["ty"].abs().max() <= 0.1 and not torch.equal(p["tx"], p["ty"])
    assert 0.8 <= p["scale"].min() and p["scale"].max() <= 1.2
    assert -5 <= p["shear"].min() and p["shear"].max() <= 20 and p["shear"].mean() > 5
    x = _batch(4, 1, 16).float() / 255
    torch.manual_seed(0)
    a = warp(x)
    torch.manual_seed(0)
    assert torch.equal(a, warp(x))
    assert not torch.allclose(a[0], a[1])  # per-sample parameters: a repeated image warps differently
    same = x[:1].expand(4, -1, -1, -1)
    b = warp(same)
    assert not torch.allclose(b[0], b[1])


def test_affine_bad_ranges_raise() -> None:
    with pytest.raises(ConfigError, match="affine degrees must be >= 0"):
        RandomAffine(degrees=-1)
    with pytest.raises(ConfigError, match="affine scale must be"):
        RandomAffine(scale=(1.2, 0.8))
    with pytest.raises(ConfigError, match="padding_mode"):
        RandomAffine(padding_mode="wrap")
