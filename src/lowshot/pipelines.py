"""Analysis runs together with their figures: the layer above ``lowshot.analysis`` (which computes
and writes results) and ``lowshot.report`` (which draws them). ``lowshot analyze`` / ``lowshot
sweep`` and ``lowshot demo`` call these; library users may call ``run_sweep`` /
``analyze_checkpoint`` directly and render later (``report.sweep.write_summary(sweep_dir)``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


def analyze_with_figures(checkpoint: str | Path, splits: Sequence[str] | None = None, *,
                         projection: str | None = None, **kw: Any) -> dict[str, Any]:
    """``analyze_checkpoint`` with its projection PNGs drawn by ``report.figures.plot_projection``."""
    from .report.figures import plot_projection, require_matplotlib
    from .analysis.analyze import analyze_checkpoint
    if projection is not None:
        require_matplotlib(f"--projection {projection}")
    return analyze_checkpoint(checkpoint, splits, projection=projection, draw=plot_projection, **kw)


def sweep_with_summary(config: Any, grid: Mapping[str, Sequence[Any]], out_dir: str | Path | None = None, *,
                       log: Callable[[str], None] = print, **kw: Any) -> list[dict[str, Any]]:
    """``run_sweep`` plus ``sweep.md`` / ``sweep.png`` (``report.sweep.write_summary``): the partial
    table after every point, the table and figure at the end (what ``lowshot sweep`` writes)."""
    from .report.figures import require_matplotlib
    from .report.sweep import write_summary
    from .analysis.sweep import run_sweep
    require_matplotlib("lowshot sweep (sweep.png)")  # before training the grid, not after

    def update(out: Path, summary: Any, final: bool) -> None:
        write_summary(out, summary, figure=final, log=log if final else None)

    return run_sweep(config, grid, out_dir, log=log, on_update=update, **kw)
