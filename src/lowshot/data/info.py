"""Support for ``lowshot data info|download NAME``: data-root lookup, downloaders, summaries.

Readers register a downloader with ``@register_downloader("dataset_name")`` (a function
``(root: Path) -> Path``), so the CLI can fetch any dataset that knows how without knowing
the readers. ``$LOWSHOT_DATA`` is the one optional environment hook: a directory holding one
sub-folder per dataset; it is consulted only when no explicit root is given.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import DataError, LowshotError
from ..registry import Registry
from .registry import DATASETS, build_dataset

ENV_VAR = "LOWSHOT_DATA"
SUMMARY_SPLITS = ("train", "test", "base", "val", "novel", "base_test")

DOWNLOADERS: Registry[Callable[[Path], Path]] = Registry("downloadable dataset")
register_downloader = DOWNLOADERS.register


def env_root(subdir: str) -> Path | None:
    """``$LOWSHOT_DATA/<subdir>`` when the variable is set (the folder may not exist yet)."""
    base = os.environ.get(ENV_VAR)
    return Path(base).expanduser() / subdir if base else None


def download_target(root: str | os.PathLike | None, subdir: str, name: str) -> Path:
    """Where a download goes: the explicit root, else ``$LOWSHOT_DATA/<subdir>``."""
    if root is not None:
        return Path(root).expanduser()
    env = env_root(subdir)
    if env is None:
        raise DataError(f"downloading {name} needs a destination: pass root=DIR (CLI: --root DIR) "
                        f"or set ${ENV_VAR} (data then goes to ${ENV_VAR}/{subdir})")
    return env


def download_dataset(name: str, root: str | os.PathLike | None = None) -> Path:
    """Download (and verify) dataset ``name`` into ``root`` (or ``$LOWSHOT_DATA/...``)."""
    return fetch_dataset(name, root)[0]


def fetch_dataset(name: str, root: str | os.PathLike | None = None) -> tuple[Path, list[Path]]:
    """``download_dataset`` that also says which files it transferred (none: the data was already there)."""
    from .archives import FETCHED
    canonical = DATASETS.canonical(name)
    if canonical not in DOWNLOADERS:
        known = ", ".join(DOWNLOADERS.names()) or "none"
        raise DataError(f"dataset {canonical!r} cannot be downloaded automatically (downloadable: {known}); "
                        f"see its documentation for how to obtain it")
    before = len(FETCHED)
    path = DOWNLOADERS.create(canonical, None if root is None else Path(root))
    return path, list(FETCHED[before:])


def _same_data(a: object, b: object) -> bool:
    """Two splits that are one dataset (a reader that ignores the split name)."""
    import torch
    return (getattr(a, "location", None) == getattr(b, "location", None) and len(a) == len(b)  # type: ignore[arg-type]
            and list(a.class_names) == list(b.class_names)  # type: ignore[attr-defined]
            and torch.equal(a.labels, b.labels))  # type: ignore[attr-defined]


def dataset_summary(name: str, root: str | os.PathLike | Sequence[str] | None = None, **kwargs: object) -> str:
    """Human-readable counts per split (images, classes) and where the data was found."""
    canonical = DATASETS.canonical(name)
    rows, location, errors = [], None, []
    seen: list[tuple[list[str], object]] = []  # (split names, dataset): split names that read the same data share a row
    for split in SUMMARY_SPLITS:
        try:
            ds = build_dataset(canonical, split, root=os.fspath(root) if isinstance(root, os.PathLike) else root,
                               **kwargs)
        except LowshotError as exc:
            errors.append((split, str(exc)))
            continue
        location = location or ds.location
        same = next((names for names, other in seen if _same_data(ds, other)), None)
        if same is not None:
            same.append(split)
            continue
        seen.append(([split], ds))
    for names, ds in seen:
        size = "native" if ds.image_size is None else f"{ds.image_size}x{ds.image_size}"
        label = names[0] if len(names) == 1 else "/".join(names)
        rows.append(f"  {label:<10} {len(ds):>8} images  {ds.num_classes:>5} classes  "
                    f"{ds.channels}x{size}")
    if len(seen) == 1 and len(seen[0][0]) > 1:
        rows.append("  (every split name reads the same data: this reader has one split, e.g. one folder)")
    if not rows:
        # Every split failed: report a data error (usually "not found" with instructions) before a
        # split-name error, which only says this reader names its splits differently.
        data_errors = [m for s, m in errors if "split" not in m.split(":")[0] and "unknown split" not in m]
        msg = (data_errors or [m for _, m in errors] or [f"dataset {canonical!r} has no splits"])[0]
        raise DataError(msg)
    lines = [f"{canonical}" + (f" (found at {location})" if location else "")]
    lines += rows
    for split, msg in errors:
        lines.append(f"  {split:<10} n/a ({msg if len(msg) < 100 else msg[:97] + '...'})")
    return "\n".join(lines)
