"""``fpstate run``: run a scenario file against a model with every invariant checked.

``fpstate run FILE [--variant NAME] [--plot FILE] [--json]`` prints the trace (one line per
step with what the step observed) and the verdict. Exit status 1 when an invariant is violated
(the line names it) or an expectation fails (expected and observed are printed), 0 when every
step ran and every invariant held. A bad file (YAML, unknown key, action or field) or an action
the model refuses in its state is one line on stderr and exit status 2.
``fpstate run --list-actions [MODEL]`` prints the action vocabulary of a model.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fpstate.check import scenario as scn
from fpstate.check.world import ScenarioError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="run a scenario (YAML) with every invariant checked",
        description="Run the actions of a scenario file on the model (the kernel's design, or "
        "a rejected design with --variant) and check every invariant after every step.")
    p.add_argument("file", nargs="?", help="the scenario file (see docs/scenarios.md)")
    p.add_argument("--variant", metavar="NAME", help="run a rejected design instead of the "
                   "kernel's (see 'fpstate variants')")
    p.add_argument("--plot", metavar="FILE", help="draw the timeline (FILE.png or FILE.svg; "
                   "both when FILE has neither extension)")
    p.add_argument("--json", action="store_true", help="print the trace as JSON")
    p.add_argument("--list-actions", nargs="?", const="all", metavar="MODEL",
                   help="list the actions of MODEL (x86, arm64) or of every model")
    p.set_defaults(run=run_run)


def list_actions(model: str) -> list[str]:
    models = list(scn.MODELS) if model == "all" else [model]
    lines = []
    for name in models:
        cls = scn.world_class(name)
        lines.append(f"model {name}:")
        for spec in cls.SPECS.values():
            fields = ", ".join(f"{k}{'' if f.required else '?'}: {f.kind.__name__}"
                               for k, f in spec.fields.items())
            lines.append(f"  {spec.name}({fields})  {spec.doc}")
    return lines


def report_json(report: scn.Report) -> dict[str, Any]:
    found = report.violation
    fail = report.failed_expectation
    return {
        "scenario": report.scenario.name, "model": report.scenario.model,
        "variant": report.variant,
        "steps": [{"step": r.n, "action": str(r.action), "observed": dict(r.observed),
                   "violations": [{"invariant": v.invariant, "detail": v.detail}
                                  for v in r.violations],
                   "mismatches": [{"key": m.key, "expected": m.expected,
                                   "observed": m.observed} for m in r.mismatches]}
                  for r in report.records],
        "violation": None if found is None else {"step": found[0],
                                                 "invariant": found[1].invariant,
                                                 "detail": found[1].detail},
        "failed_expectation": None if fail is None else fail.n,
        "ok": report.ok,
    }


def run_run(args: argparse.Namespace) -> int:
    if args.list_actions:
        print("\n".join(list_actions(args.list_actions)))
        return 0
    if not args.file:
        raise ScenarioError("a scenario file is required (or --list-actions)")
    scenario = scn.load(args.file)
    report = scn.run(scenario, args.variant, frames=bool(args.plot))
    if args.json:
        print(json.dumps(report_json(report), indent=2, default=str))
    else:
        print("\n".join(scn.format_report(report)))
    if args.plot:
        from fpstate.check.timeline import draw

        design = f"variant {args.variant}" if args.variant else "the kernel's design"
        written = draw(report.frames, args.plot, f"{scenario.name} ({design})")
        print("timeline: " + ", ".join(map(str, written)), file=sys.stderr)
    return 0 if report.ok else 1
