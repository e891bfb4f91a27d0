"""``fpstate campaign``: run an exploration campaign (docs/campaigns.md) locally or on Ray.

``fpstate campaign FILE [--engine local|ray] [--address RAY_ADDRESS] [--workers N]
[--report DIR] [--fresh] [--json]`` runs every cell of the campaign's matrix not finished yet
in the report directory (default ``reports/<campaign name>``), showing live progress on
stderr (cells done, states per second, violations so far), and writes the report: one JSON
per cell, shrunk counterexample scenarios, ``summary.md`` with plots. FILE may also be a report
directory: the campaign stored there resumes. Ctrl-C stops after writing what is finished;
the same command resumes.

Exit status: 0 when no invariant was violated under the kernel's design and the model never
crashed (violations under the variants are what they are for), 1 otherwise, 2 for a bad
campaign file (one line naming the field), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from fpstate.campaign import campaign as cfile
from fpstate.campaign.engines import ENGINES, make_engine
from fpstate.campaign.report import cell_summary
from fpstate.campaign.resume import is_report_dir, load_from_report
from fpstate.campaign.runner import run_campaign
from fpstate.commands import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "campaign", help="run an exploration campaign (a matrix of profiles, kernels, "
        "variants, configurations) on local processes or Ray",
        description="Explore every cell of a campaign file's matrix (bounded-exhaustive split "
        "across workers by state hash, or random split by seed) and write a report; "
        "interrupted campaigns resume from their report directory.")
    p.add_argument("file", help="the campaign file (YAML, see docs/campaigns.md) or a report "
                   "directory to resume")
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="local processes (default) or Ray (default when --address is given)")
    p.add_argument("--address", metavar="RAY_ADDRESS",
                   help="an existing Ray cluster (ray://HOST:10001, HOST:6379 or 'auto'); "
                   "without it --engine ray starts a local Ray instance")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="workers: partitions of an exhaustive cell, seeds at a time (default: "
                   "every CPU of this machine, or of the Ray cluster)")
    p.add_argument("--report", metavar="DIR", help="the report directory (default "
                   "reports/<campaign name>; finished cells there are not run again)")
    p.add_argument("--fresh", action="store_true", help="discard the cells already in the "
                   "report directory")
    p.add_argument("--json", action="store_true", help="print the campaign's index and cell "
                   "reports as JSON on stdout")
    p.set_defaults(run=run_campaign_command)


class LiveProgress:
    """The live view: cells done, the running cell's states per second, violations so far."""

    def __init__(self, total_cells: int, engine: str) -> None:
        self.total = total_cells
        self.engine = engine
        self.done = 0
        self.cell = ""
        self.where = ""
        self.states = 0
        self.transitions = 0
        self.cell_violations = 0
        self.violations = 0  #: in finished cells
        self.restarts = 0
        self.rate = 0.0
        self.start = time.perf_counter()
        self.lines: list[str] = []  #: one per finished cell, printed above the live view

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "cell-start":
            self.done = int(info["done"])
            self.cell = str(info["id"])
            self.where, self.states, self.transitions, self.cell_violations = "", 0, 0, 0
            self.rate = 0.0
        elif event == "round":
            self.where = f"depth {info['level']}"
            self._numbers(info)
        elif event == "seeds":
            self.where = f"seeds {info['done']}/{info['of']}"
            self._numbers(info)
        elif event == "restart":
            self.restarts += 1
            self.lines.append(f"  worker of partition {info['partition']} lost in round "
                              f"{info['level']} ({info['reason']}): restarted")
        elif event == "cell-done":
            self.done = int(info["done"])
            report = info["report"]
            self.violations += sum(v["count"] for v in report["violations"])
            self.cell_violations = 0
            self.lines.append(f"[{self.done}/{self.total}] {cell_summary(report)}")

    def _numbers(self, info: dict[str, Any]) -> None:
        self.states = int(info["states"])
        self.transitions = int(info["transitions"])
        self.cell_violations = int(info["violations"])
        secs = float(info["seconds"])
        self.rate = self.states / secs if secs > 0 else 0.0

    def text(self) -> str:
        el = time.perf_counter() - self.start
        return (f"cells {self.done}/{self.total} | {self.cell} {self.where} | "
                f"{self.states:,} states, {self.transitions:,} transitions, "
                f"{self.rate:,.0f} states/s | violations so far "
                f"{self.violations + self.cell_violations} | restarts {self.restarts} | "
                f"{el:,.0f}s | {self.engine}")

    def __rich__(self) -> Any:
        from rich.text import Text
        return Text(self.text())


def run_campaign_command(args: argparse.Namespace) -> int:
    if is_report_dir(args.file):
        campaign = load_from_report(args.file)
        report = args.report or args.file
    else:
        campaign = cfile.load(args.file)
        report = args.report or str(Path("reports") / campaign.name)
    engine = make_engine(args.engine or ("ray" if args.address else "local"), args.workers,
                         args.address)
    from rich.console import Console
    from rich.live import Live

    console = Console(stderr=True)
    view = LiveProgress(len(campaign.cells), engine.describe())

    def progress(event: str, info: dict[str, Any]) -> None:
        view(event, info)
        while view.lines:
            console.print(view.lines.pop(0), markup=False, highlight=False, soft_wrap=True)

    console.print(f"campaign {campaign.name}: {len(campaign.cells)} cells, "
                  f"{campaign.explore.mode}, on {engine.describe()}; report {report}",
                  markup=False, highlight=False, soft_wrap=True)
    try:
        with Live(view, console=console, refresh_per_second=4, transient=True,
                  redirect_stdout=False, redirect_stderr=False):
            outcome = run_campaign(campaign, engine, report, fresh=args.fresh,
                                   progress=progress)
    except KeyboardInterrupt:
        engine.close()
        console.print(f"interrupted: {view.done} of {view.total} cells finished in {report}; "
                      f"resume with: fpstate campaign {report}", markup=False, soft_wrap=True,
                      highlight=False)
        return 130
    finally:
        engine.close()
    t = outcome.totals
    skipped = outcome.total - outcome.ran
    console.print(f"{outcome.ran} cells run" + (f", {skipped} already finished" if skipped
                                                else "")
                  + f": {t['states']:,} states, {t['transitions']:,} transitions; violations "
                  f"under the kernel's design: {t['kernel_design_violations']}, under variants: "
                  f"{t['violations'] - t['kernel_design_violations']}; model errors: "
                  f"{t['errors']}; summary: {Path(report) / 'summary.md'}",
                  markup=False, highlight=False, soft_wrap=True)
    if args.json:
        index = json.loads((Path(report) / "campaign.json").read_text())
        index["cells"] = outcome.cells
        json.dump(index, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 1 if t["kernel_design_violations"] or t["errors"] else 0
