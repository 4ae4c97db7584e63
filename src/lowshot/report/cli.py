"""``lowshot report`` (registered by ``lowshot.cli.build_parser``)."""
from __future__ import annotations

import argparse
from typing import Any


def cmd_report(args: argparse.Namespace) -> int:
    from .build import build_report
    path = build_report(args.run_dirs, args.out)
    print(f"wrote {path} and {path.with_name('report.md')}")
    return 0


def register(subparsers: Any) -> None:
    r = subparsers.add_parser("report", help="self-contained HTML + Markdown report of runs, sweeps, demo folders")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training runs, sweep folders or folders of them")
    r.add_argument("--out", required=True, help="report folder (report.html, report.md, figure PNGs)")
    r.set_defaults(func=cmd_report)
