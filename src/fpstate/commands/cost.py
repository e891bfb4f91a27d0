"""``fpstate cost [--workload FILE] [--cpu CPU] [--kernel V] [--plot DIR] [--json]``: memory per
thread and bytes moved per context switch under FPU management policies (`fpstate.tools.cost`).

Per workload mix, one table: a row per allocation policy (on-demand / always-max) and CET
supervisor policy (guests only / every thread), with the memory per thread, the mix's total,
and the bytes per switch under XSAVE (no optimisation), XSAVEC (init), modified only and XSAVES
(init + modified). ``--plot DIR`` writes cost-memory and cost-switch as PNG and SVG. The CPU is
``--cpu``, else the workload file's ``cpu``, else sapphire-rapids (AMX and CET: every policy
matters there).
"""

from __future__ import annotations

import argparse
import sys

from rich.table import Table

from fpstate.commands.layout import _console, resolve_cpu
from fpstate.kernel.x86.versions import VERSION_NAMES
from fpstate.tools.cost import (
    ALLOCATIONS,
    CET_POLICIES,
    DEFAULT_MIXES,
    OPTIMISATIONS,
    cost_table,
    load_workload,
    rows_json,
)

DEFAULT_CPU = "sapphire-rapids"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cost", help="memory and context-switch bytes of FPU management policies",
        description="FPU-state memory per thread and XSAVE/XRSTOR bytes per context switch for "
        "workload mixes under allocation, CET-supervisor and optimisation policies.")
    p.add_argument("--workload", metavar="FILE",
                   help="YAML/JSON: {cpu: NAME, mixes: [{name, threads, avx512_share, "
                   "amx_share, vcpus, modified_fraction}]} (default: four built-in mixes)")
    p.add_argument("--cpu", metavar="CPU", help=f"CPU profile (default {DEFAULT_CPU})")
    p.add_argument("--kernel", metavar="V", choices=VERSION_NAMES)
    p.add_argument("--plot", metavar="DIR", help="write PNG and SVG plots into DIR")
    p.add_argument("--json", action="store_true", help="print every row as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cpu_spec, mixes = (None, DEFAULT_MIXES)
    if args.workload:
        cpu_spec, mixes = load_workload(args.workload)
    profile = resolve_cpu(args.cpu or cpu_spec or DEFAULT_CPU)
    rows = cost_table(profile, mixes, args.kernel)
    paths = []
    if args.plot:
        from fpstate.tools.plots import plot_costs

        paths = plot_costs(rows, args.plot, profile.name)
    if args.json:
        sys.stdout.write(rows_json(rows))
    else:
        con = _console()
        for mix in mixes:
            t = Table(title=f"{mix.name} on {profile.name}")
            for head in ("allocation", "CET_S space", "memory/thread", "total"):
                t.add_column(head, justify="left" if head in ("allocation", "CET_S space")
                             else "right")
            for _, _, name in OPTIMISATIONS:
                t.add_column(f"B/switch\n{name}", justify="right")
            for a in ALLOCATIONS:
                for c in CET_POLICIES:
                    mine = [r for r in rows if r.mix == mix.name and r.policy.allocation == a
                            and r.policy.cet == c]
                    cells = [a, c, f"{mine[0].memory_per_thread:,.0f}",
                             f"{mine[0].total_memory / 1024:,.1f} KiB"]
                    for i, m, _ in OPTIMISATIONS:
                        r = next(r for r in mine
                                 if (r.policy.init_opt, r.policy.modified_opt) == (i, m))
                        cells.append(f"{r.bytes_per_switch:,.0f}")
                    t.add_row(*cells)
            con.print(t)
        con.print("modified_fraction per mix: "
                  + ", ".join(f"{m.name.split(':')[0]} {m.modified_fraction}" for m in mixes))
    for p in paths:
        sys.stderr.write(f"fpstate: wrote {p}\n")
    return 0
