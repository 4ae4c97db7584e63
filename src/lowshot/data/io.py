"""Image decoding with Pillow into the one uint8 ``[C,H,W]`` layout every dataset returns.

Decoding happens here and nowhere else so that a corrupt or truncated file always surfaces as a
``DataError`` naming that file (instead of a Pillow traceback from a DataLoader worker).
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

_MODES = {1: "L", 3: "RGB"}


def _check(image_size: int | None, channels: int) -> None:
    if channels not in _MODES:
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise DataError(f"image_size must be a positive int or None, got {image_size!r}")


def pil_to_tensor(img: Image.Image, image_size: int | None, channels: int) -> torch.Tensor:
    """Convert (grey or RGB), squash-resize to a square ``image_size`` and return uint8 [C,H,W].

    The resize ignores aspect ratio (the few-shot convention, e.g. 84x84 miniImageNet); Pillow's
    bilinear filter widens its support when shrinking, i.e. it is antialiased.
    """
    _check(image_size, channels)
    mode = _MODES[channels]
    if img.mode != mode:
        img = img.convert(mode)
    if image_size is not None and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    arr = np.array(img, dtype=np.uint8)  # a writable copy (Pillow's buffer is read-only)
    if arr.ndim == 2:
        return torch.from_numpy(arr).unsqueeze(0)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def decode_image(source: bytes | BinaryIO, name: str, image_size: int | None = None,
                 channels: int = 3) -> torch.Tensor:
    """Decode encoded bytes (or a binary file object); ``name`` is used in error messages."""
    _check(image_size, channels)
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with Image.open(stream) as img:
            img.load()  # force full decode here: truncation errors surface now, with the name
            return pil_to_tensor(img, image_size, channels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            EOFError) as exc:
        raise DataError(f"cannot decode image {name}: {exc}") from exc


def load_image(path: str | os.PathLike, image_size: int | None = None, channels: int = 3,
               invert: bool = False) -> torch.Tensor:
    """Read one image file as uint8 [channels, image_size, image_size] (native size if None).

    ``invert`` maps v -> 255 - v, the per-file step of readers such as Omniglot (see ``preprocess``).
    """
    _check(image_size, channels)
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            img = decode_image(fh, path, image_size, channels)
            return 255 - img if invert else img
    except FileNotFoundError as exc:
        raise DataError(f"image file {path} not found") from exc
    except IsADirectoryError as exc:
        raise DataError(f"image path {path} is a directory") from exc
    except OSError as exc:  # permissions, name too long, ...
        raise DataError(f"cannot open image {path}: {exc}") from exc


def is_image_file(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


def list_images(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand directories (recursively, sorted) into image files; explicit files are kept as given.

    Hidden files and directories (leading '.') are skipped during expansion.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                found += [os.path.join(dirpath, f) for f in filenames
                          if not f.startswith(".") and is_image_file(f)]
            out += sorted(found, key=lambda f: Path(f).parts)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise DataError(f"image path {p} does not exist")
    return out
