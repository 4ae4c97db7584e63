"""``lowshot decouple``: stage 2 of Kang et al. (ICLR 2020) on a trained checkpoint.

    lowshot decouple --checkpoint runs/fmnist_lt_conv4_joint/last.pt --method tau_norm
    lowshot decouple --checkpoint RUN/last.pt --method crt epochs=10 sampler=class_aware \\
        "sampler_kwargs={samples_per_class: 4}"
    lowshot decouple --checkpoint RUN/last.pt --method crt images=true freeze_bn=false

Options are ``key=value`` (values parsed as YAML scalars / lists / mappings); ``--list-options``
prints the ones a method takes with their defaults.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..config import parse_override
from ..errors import ConfigError


def _options_text(method: str) -> str:
    from .stage2 import stage2_method_options
    pairs = [(f"{o.name}={o.default!r}", o.help) for o in stage2_method_options(method)]
    width = max(len(p) for p, _ in pairs)
    rows = [f"  {p:<{width}}  {h}" for p, h in pairs]
    return f"options of decouple {method}:\n" + "\n".join(rows)


def cmd_decouple(args: argparse.Namespace) -> int:
    from .stage2 import STAGE2_METHODS
    from .stage2 import decouple
    method = STAGE2_METHODS.canonical(args.method)
    if args.list_options:
        print(_options_text(method))
        return 0
    if not args.checkpoint:
        raise ConfigError("lowshot decouple needs --checkpoint CKPT (a training checkpoint or run directory)")
    options: dict[str, Any] = {}
    for item in args.options:
        key, value = parse_override(item)
        if key in options:
            raise ConfigError(f"decouple option {key!r} given twice")
        options[key] = value
    decouple(args.checkpoint, method, out=args.out, **options)
    return 0


def register(subparsers: Any) -> None:
    from .stage2 import list_stage2_methods
    p = subparsers.add_parser(
        "decouple", help="stage-2 classifier (cRT, tau-norm, LWS, NCM) on a trained long-tail checkpoint",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=f"methods: {', '.join(list_stage2_methods())}. Writes <run_dir>/decouple_<method>.pt and .json.")
    p.add_argument("--checkpoint", help="joint checkpoint (file or run directory)")
    p.add_argument("--method", required=True, help=f"one of {', '.join(list_stage2_methods())}")
    p.add_argument("--out", help="output checkpoint (default: <run_dir>/decouple_<method>.pt)")
    p.add_argument("--list-options", action="store_true", help="print the method's options and exit")
    p.add_argument("options", nargs="*", metavar="key=value", help="method options, e.g. tau=1.0 epochs=10")
    p.set_defaults(func=cmd_decouple)
