"""Understanding margins and classifiers: discriminability (phi), 2-D projections, sweeps.

- ``class_statistics(features, labels)``: class centres, D_inter, D_intra, phi = D_inter / D_intra
  (Liu et al., ECCV 2020, Sec. 4.1), see :mod:`lowshot.analysis.discriminability`.
- ``analyze_checkpoint(ckpt, splits)``: phi of a checkpoint's base / novel features.
- ``run_sweep(config, grid, out_dir)``: train + evaluate a grid (e.g. over head.margin), resumable.
"""
from __future__ import annotations

from .analyze import analyze_checkpoint, format_phi_table, resolve_split, split_features
from .discriminability import ClassStatistics, class_statistics, discriminability, pca_2d, project_2d
from .grid import expand_grid, parse_axis, parse_sweep_args, split_values
from ..results import point_name
from .sweep import run_sweep

__all__ = [
    "ClassStatistics",
    "analyze_checkpoint",
    "class_statistics",
    "discriminability",
    "expand_grid",
    "format_phi_table",
    "parse_axis",
    "parse_sweep_args",
    "pca_2d",
    "point_name",
    "project_2d",
    "resolve_split",
    "run_sweep",
    "split_features",
    "split_values",
]
