"""Batch augmentations on tensors, on whatever device the batch lives on.

Datasets return uint8 images; augmentation runs afterwards on whole batches (typically on the
GPU, right before the forward pass), so per-image Python work never bottlenecks training. Every
random draw uses the torch global RNG of the batch's device, so ``torch.manual_seed`` makes a
run reproducible. Random parameters are drawn per sample; the image work is one batched call.
All transforms except ``Normalize`` expect floats in [0, 1] (``ToFloat`` does that first).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .registry import DATASETS

Transform = Callable[[torch.Tensor], torch.Tensor]

# (mean, std) per dataset, for images scaled to [0, 1]. Fashion-MNIST: its 60k train images.
# Omniglot: inverted (bright strokes), 28x28, measured on images_background_small1+2.
# ImageNet: the usual ILSVRC-2012 values, also used for miniImageNet / tieredImageNet / CUB.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "omniglot": ((0.0805,), (0.2182,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": IMAGENET_STATS,
}
DATASET_STATS["cifar_fs"] = DATASET_STATS["fc100"] = DATASET_STATS["cifar100"]  # CIFAR-100 images
_LUMA = (0.299, 0.587, 0.114)


def default_stats(name: str | None, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for dataset ``name`` (or an alias) with ``channels`` entries.

    Names without their own entry (miniImageNet, tieredImageNet, CUB, ImageNet-LT, folders...)
    get ImageNet statistics.
    Grey statistics are repeated for 3 channels; RGB ones are luma-weighted for 1 channel.
    """
    key = name or "imagenet"
    if key in DATASETS:
        key = DATASETS.canonical(key)  # aliases such as "fmnist" share their dataset's statistics
    mean, std = DATASET_STATS.get(key.lower().replace("-", "_"), IMAGENET_STATS)
    if len(mean) == channels:
        return tuple(mean), tuple(std)
    if channels == 3 and len(mean) == 1:
        return mean * 3, std * 3
    if channels == 1 and len(mean) == 3:
        return ((sum(w * m for w, m in zip(_LUMA, mean)),), (sum(w * s for w, s in zip(_LUMA, std)),))
    raise ConfigError(f"no statistics for {channels} channels")


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a batch [B,C,H,W], got shape {tuple(x.shape)}")


class ToFloat:
    """uint8 [0,255] -> float32 [0,1]; float input is assumed to be in [0,1] already."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x)
        return x.float() / 255 if x.dtype == torch.uint8 else x.float()


class MatchChannels:
    """Repeat grey to RGB, or luma-average RGB to grey, so any dataset fits any backbone."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.channels:
            return x
        if c == 1 and self.channels == 3:
            return x.expand(-1, 3, -1, -1)
        if c == 3 and self.channels == 1:
            w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            return (x * w).sum(1, keepdim=True)
        raise ValueError(f"cannot convert {c} channels to {self.channels}")


class Resize:
    """Square bilinear resize with antialiasing (no-op when the size already matches)."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                             antialias=True)


class RandomResizedCrop:
    """Per-sample random crop (area fraction ``scale``, aspect ``ratio``) resized to ``size``.

    Ten candidate boxes per sample; the first that fits is used, else the whole image (clamped
    to the ratio range, centred). One ``affine_grid`` + ``grid_sample`` for the whole batch.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> None:
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ConfigError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ConfigError(f"crop ratio must satisfy 0 < min <= max, got {ratio}")
        self.size, self.scale, self.ratio, self.tries = int(size), scale, ratio, tries

    def boxes(self, b: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """[B,4] boxes (x0, y0, width, height) in pixels."""
        area = h * w * torch.empty(b, self.tries, device=device).uniform_(*self.scale)
        log_r = torch.empty(b, self.tries, device=device).uniform_(math.log(self.ratio[0]),
                                                                   math.log(self.ratio[1]))
        r = torch.exp(log_r)
        cw, ch = torch.sqrt(area * r), torch.sqrt(area / r)
        ok = (cw <= w) & (ch <= h)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1, device=device))
        # fallback: the whole image, cropped to the nearest allowed aspect ratio
        in_r = w / h
        fw, fh = (float(w), float(h))
        if in_r < self.ratio[0]:
            fh = w / self.ratio[0]
        elif in_r > self.ratio[1]:
            fw = h * self.ratio[1]
        pick = first.clamp(min=0).unsqueeze(1)
        bw = torch.where(first >= 0, cw.gather(1, pick).squeeze(1), torch.full((b,), fw, device=device))
        bh = torch.where(first >= 0, ch.gather(1, pick).squeeze(1), torch.full((b,), fh, device=device))
        u = torch.rand(b, 2, device=device)
        x0 = torch.where(first >= 0, u[:, 0] * (w - bw), (w - bw) / 2)
        y0 = torch.where(first >= 0, u[:, 1] * (h - bh), (h - bh) / 2)
        return torch.stack([x0, y0, bw, bh], 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x)
        return self.apply(x, self.boxes(x.shape[0], x.shape[2], x.shape[3], x.device))

    def apply(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Crop given pixel boxes [B,4] = (x0, y0, width, height) and resample to ``size``."""
        b, c, h, w = x.shape
        x0, y0, bw, bh = boxes.to(x.dtype).unbind(1)
        theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
        theta[:, 0, 0], theta[:, 1, 1] = bw / w, bh / h
        theta[:, 0, 2] = (2 * x0 + bw) / w - 1  # box centre in [-1, 1] coordinates
        theta[:, 1, 2] = (2 * y0 + bh) / h - 1
        grid = F.affine_grid(theta, [b, c, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(x.shape[0], device=x.device) < self.p
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def _symmetric(value: float | Sequence[float], name: str) -> tuple[float, float]:
    """``v`` -> (-v, v); a pair is taken as the (lo, hi) range itself."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ConfigError(f"affine {name} must be one value or a [lo, hi] pair, got {value!r}")
        lo, hi = float(value[0]), float(value[1])
    else:
        if value < 0:
            raise ConfigError(f"affine {name} must be >= 0 (a symmetric range), got {value!r}")
        lo, hi = -float(value), float(value)
    if lo > hi:
        raise ConfigError(f"affine {name} range must satisfy lo <= hi, got {(lo, hi)}")
    return lo, hi


class RandomAffine:
    """Per-sample random rotation, shear, scale and translation: one batched ``grid_sample``.

    The Omniglot augmentation of Koch et al. (2015, Siamese nets; rotation within +-10 deg,
    shear within +-0.3, scale in [0.8, 1.2], translation of a few pixels): handwritten strokes
    vary in exactly these ways, so new drawings of a character stay that character. Ranges:
    ``degrees`` (rotation, positive = counter-clockwise on screen), ``shear`` (x-shear angle in
    degrees; a pair draws it from [lo, hi]), ``translate`` (fraction of the width / height,
    drawn independently for x and y), ``scale`` ([lo, hi] zoom, > 1 enlarges the content).
    Each parameter is drawn uniformly per sample with the batch device's global RNG; the
    geometry is in pixel units, so non-square images rotate without distortion. Content leaving
    the frame is lost; uncovered pixels take ``padding_mode`` ("zeros": the background of
    inverted Omniglot / MNIST-style images; "border"; "reflection").
    """

    PADDING = ("zeros", "border", "reflection")

    def __init__(self, degrees: float | Sequence[float] = 0.0, translate: float | Sequence[float] = 0.0,
                 scale: Sequence[float] = (1.0, 1.0), shear: float | Sequence[float] = 0.0,
                 padding_mode: str = "zeros") -> None:
        self.degrees = _symmetric(degrees, "degrees")
        self.translate = _symmetric(translate, "translate")
        self.shear = _symmetric(shear, "shear")
        if len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1]):
            raise ConfigError(f"affine scale must be [lo, hi] with 0 < lo <= hi, got {scale!r}")
        self.scale = (float(scale[0]), float(scale[1]))
        if padding_mode not in self.PADDING:
            raise ConfigError(f"affine padding_mode must be one of {', '.join(self.PADDING)}, got {padding_mode!r}")
        self.padding_mode = padding_mode

    @property
    def is_identity(self) -> bool:
        return self.degrees == self.translate == self.shear == (0.0, 0.0) and self.scale == (1.0, 1.0)

    def params(self, b: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Random per-sample parameters ``{angle, shear (degrees), scale, tx, ty (fractions)}``, each [B]."""
        def draw(lo_hi: tuple[float, float]) -> torch.Tensor:
            return torch.empty(b, device=device).uniform_(*lo_hi)
        return {"angle": draw(self.degrees), "shear": draw(self.shear), "scale": draw(self.scale),
                "tx": draw(self.translate), "ty": draw(self.translate)}

    @staticmethod
    def matrix(params: dict[str, torch.Tensor], h: int, w: int) -> torch.Tensor:
        """``affine_grid`` theta [B,2,3]: output -> input in normalised coordinates.

        Forward map in pixel coordinates about the centre (y down): ``p' = R S K p + t`` with
        R the rotation, S the zoom, K the x-shear and t = (tx * w, ty * h). ``grid_sample`` needs
        the inverse, rescaled by D = diag(w/2, h/2) (``align_corners=False``): D^-1 M^-1 (D n - t).
        """
        a = torch.deg2rad(params["angle"].float())
        cos, sin = torch.cos(a), torch.sin(a)
        one, zero = torch.ones_like(a), torch.zeros_like(a)
        rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
        shear = torch.stack([torch.stack([one, torch.tan(torch.deg2rad(params["shear"].float()))], -1),
                             torch.stack([zero, one], -1)], -2)
        fwd = rot @ shear * params["scale"].float().view(-1, 1, 1)
        inv = torch.linalg.inv(fwd)
        half = torch.tensor([w / 2, h / 2], dtype=inv.dtype, device=inv.device)
        lin = inv * half.view(1, 1, 2) / half.view(1, 2, 1)  # D^-1 M^-1 D
        t = torch.stack([params["tx"].float() * w, params["ty"].float() * h], -1)
        shift = -(inv @ t.unsqueeze(-1)).squeeze(-1) / half
        return torch.cat([lin, shift.unsqueeze(-1)], -1)

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Warp ``x`` [B,C,H,W] with given parameters (see ``params``)."""
        _check_batch(x)
        theta = self.matrix(params, x.shape[2], x.shape[3]).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_batch(x)
        return self.apply(x, self.params(x.shape[0], x.device))


def _factor_range(value: float | tuple[float, float], name: str) -> tuple[float, float] | None:
    if isinstance(value, (tuple, list)):
        lo, hi = float(value[0]), float(value[1])
    else:
        if value < 0:
            raise ConfigError(f"{name} jitter must be >= 0, got {value}")
        lo, hi = max(0.0, 1 - float(value)), 1 + float(value)
    if not 0 <= lo <= hi:
        raise ConfigError(f"{name} jitter range must satisfy 0 <= min <= max, got {(lo, hi)}")
    return None if lo == hi == 1.0 else (lo, hi)


class ColorJitter:
    """Per-sample brightness, contrast, saturation factors (applied in that fixed order).

    ``v`` means a factor uniform in [max(0, 1-v), 1+v]; a pair gives the range directly.
    Saturation is a no-op for grey batches. Output is clamped to [0, 1].
    """

    def __init__(self, brightness: float | tuple[float, float] = 0.0,
                 contrast: float | tuple[float, float] = 0.0,
                 saturation: float | tuple[float, float] = 0.0) -> None:
        self.brightness = _factor_range(brightness, "brightness")
        self.contrast = _factor_range(contrast, "contrast")
        self.saturation = _factor_range(saturation, "saturation")

    @staticmethod
    def _factors(rng: tuple[float, float], x: torch.Tensor) -> torch.Tensor:
        return torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).uniform_(*rng)

    @staticmethod
    def _grey(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            return x
        w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.brightness is not None:
            x = (x * self._factors(self.brightness, x)).clamp(0, 1)
        if self.contrast is not None:
            mean = self._grey(x).mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * self._factors(self.contrast, x) + mean).clamp(0, 1)
        if self.saturation is not None and x.shape[1] == 3:
            grey = self._grey(x)
            x = ((x - grey) * self._factors(self.saturation, x) + grey).clamp(0, 1)
        return x


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if any(s <= 0 for s in std):
            raise ConfigError(f"std must be positive, got {tuple(std)}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.mean) != x.shape[1] or len(self.std) != x.shape[1]:
            raise ConfigError(f"normalisation has {len(self.mean)} mean / {len(self.std)} std values "
                              f"for {x.shape[1]} channels")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


class Compose:
    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({', '.join(type(t).__name__ for t in self.transforms)})"


def build_transform(train: bool, image_size: int | None, channels: int,
                    mean: Sequence[float] | None, std: Sequence[float] | None, *,
                    crop_scale: tuple[float, float] | None = (0.08, 1.0),
                    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool | float = True,
                    jitter: float | tuple[float, float, float] = 0.0,
                    affine: dict[str, Any] | None = None) -> Compose:
    """uint8/float batch [B,C,H,W] -> normalised float batch [B,channels,S,S].

    Train: random resized crop (``crop_scale=None``: plain resize), horizontal flip
    (``flip`` True = p 0.5, or a probability), colour jitter (one value for brightness,
    contrast and saturation, or a triple), random affine warp (``affine``: ``RandomAffine``
    keywords; None or identity ranges skip it). Eval: resize only. ``mean``/``std`` None skips
    normalisation; ``image_size`` None keeps the input size.
    """
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    steps: list[Transform] = [ToFloat(), MatchChannels(channels)]
    if train and crop_scale is not None:
        if image_size is None:
            raise ConfigError("random resized crop needs image_size")
        steps.append(RandomResizedCrop(image_size, tuple(crop_scale), tuple(crop_ratio)))  # type: ignore[arg-type]
    elif image_size is not None:
        steps.append(Resize(image_size))
    if train:
        p = 0.5 if flip is True else float(flip)
        if p > 0:
            steps.append(RandomHorizontalFlip(p))
        warp = RandomAffine(**affine) if affine else None
        if warp is not None and not warp.is_identity:
            steps.append(warp)
        js = tuple(jitter) if isinstance(jitter, (tuple, list)) else (jitter,) * 3
        if len(js) != 3:
            raise ConfigError(f"jitter must be one value or (brightness, contrast, saturation), got {jitter}")
        if any(j for j in js):
            steps.append(ColorJitter(*js))
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std, or neither")
    if mean is not None and std is not None:
        steps.append(Normalize(mean, std))
    return Compose(steps)
