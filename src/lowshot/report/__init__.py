"""Reports: one self-contained HTML file (+ Markdown) from training runs, sweeps and demo folders.

``build_report(run_dirs, out_dir) -> Path`` of ``report.html``; see :mod:`lowshot.report.collect`
for which files are read.
"""
from __future__ import annotations

from .build import build_report
from .collect import collect

__all__ = ["build_report", "collect"]
