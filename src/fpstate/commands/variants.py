"""``fpstate variants``: the rejected designs the checker can run, one line each.

``fpstate variants [--json]``: name, model, seed, the invariant it breaks, and what it does;
a variant the explorer reaches only in some runs says so (its scenario shows it).
"""

from __future__ import annotations

import argparse
import json

from fpstate.check.variants import VARIANTS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "variants", help="list the rejected designs (variants) the checker knows",
        description="The designs the seed threads rejected, selectable with --variant.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_variants)


def run_variants(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([{"name": v.name, "model": v.model, "seed": v.seed,
                           "breaks": v.expect, "description": v.description,
                           "explorer_finds": v.explorer_finds, "mode": v.mode,
                           "config": dict(v.config)}
                          for v in VARIANTS], indent=2))
        return 0
    width = max(len(v.name) for v in VARIANTS)
    for v in VARIANTS:
        rare = "" if v.explorer_finds else " (the explorer reaches it in some runs only)"
        print(f"{v.name:{width}}  {v.model:5}  {v.seed:27}  breaks {v.expect}: "
              f"{v.description}{rare}")
    return 0
