"""``fpstate explore``: search a model for invariant violations, with no scenario hint.

``fpstate explore [--model x86|arm64] [--variant NAME] [--cpu PROFILE] [--config YAML]
[--seconds S] [--seed N] [--mode random|exhaustive] [--depth D] [--workers N] [--out FILE]
[--plot FILE] [--json]`` explores the model from its default configuration (x86: 2 CPUs, 2
processes of 2 threads, 1 VM with 1 vCPU, Sapphire Rapids; arm64: the FVP profile with FPMR, a
VMM and one other task, 1 VM with 1 vCPU) using every core. ``--config`` merges configuration
keys of the model's scenarios over it (a YAML mapping, inline or in a file: ``--config
'{compat: [p0]}'`` makes p0 a 32-bit program); ``--variant`` also takes the variant's
configuration, mode and depth (fpstate variants --json), which the options override. On a
violation it shrinks the path to one from
which no step can be removed, writes it as a scenario (``--out``, default
``counterexample-<design>-<invariant>.yaml``), prints its trace and exits 1. Otherwise it prints
the coverage (states, transitions, per-action counts) and exits 0.

``--json`` prints ``{"violations": [{"invariant", "scenario_file", "steps"}], "states",
"transitions", "seconds", ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fpstate.check import executor as executors
from fpstate.check import scenario as scn
from fpstate.check import variants as vreg
from fpstate.check.explore import Job, Result, counterexample, default_config, explore, shrink
from fpstate.commands import positive_int, positive_seconds
from fpstate.errors import FpstateError
from fpstate.kernel.x86.versions import PROPOSED_FIXES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explore", help="search a model for invariant violations (random or exhaustive)",
        description="Explore the model's actions from its default configuration, checking "
        "every invariant after every step; shrink and write any violation as a scenario.")
    add_explore_arguments(p)
    p.set_defaults(run=run_explore)


def add_explore_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=sorted(scn.MODELS),
                   help="the model (default: the variant's, else x86)")
    p.add_argument("--variant", metavar="NAME", help="a rejected design (fpstate variants)")
    p.add_argument("--cpu", metavar="PROFILE", help="the CPU profile (x86: a bundled name, "
                   "'host' or a dump; arm64: a bundled arm64 profile)")
    p.add_argument("--config", metavar="YAML", help="configuration keys merged over the "
                   "default (a YAML mapping or a file holding one), e.g. '{compat: [p0]}'")
    p.add_argument("--seconds", type=positive_seconds, default=10.0,
                   help="time budget (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--mode", choices=("random", "exhaustive"),
                   help="random walks or breadth-first search (default: the variant's, else "
                   "random)")
    p.add_argument("--depth", type=positive_int,
                   help="exhaustive mode: maximum actions (default: the variant's, else 6)")
    p.add_argument("--workers", type=positive_int, help="processes (default: every core)")
    p.add_argument("--out", metavar="FILE", help="where to write the counterexample scenario")
    p.add_argument("--plot", metavar="FILE", help="draw the counterexample's timeline")
    p.add_argument("--json", action="store_true", help="print JSON")


def config_overrides(text: str | None) -> dict[str, Any]:
    """``--config``: a YAML mapping given inline or as the path of a file holding one."""
    if text is None:
        return {}
    import os

    import yaml

    from fpstate.inputs import read_text, reason

    if os.path.exists(text):
        try:
            text = read_text(text)
        except (OSError, UnicodeDecodeError) as e:
            raise FpstateError(f"--config: cannot read {text}: {reason(e)}") from None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise FpstateError(f"--config: not YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise FpstateError(f"--config: must be a mapping of configuration keys, not {value!r}")
    return value


def job_for(model: str | None, variant: str | None, cpu: str | None,
            overrides: dict[str, Any] | None = None) -> Job:
    if variant is not None:
        v = vreg.get(variant)
        if model is not None and model != v.model:
            raise FpstateError(f"variant {variant} is a variant of model {v.model}, not {model}")
        model = v.model
    model = model or "x86"
    cfg = default_config(model, cpu)
    if variant is not None:
        cfg.update(vreg.get(variant).config)
        if cpu is not None:
            cfg["cpu"] = cpu
    cfg.update(overrides or {})
    return Job(model, cfg, variant)


def report_violation(job: Job, res: Result, out: str | None, plot: str | None,
                     quiet: bool = False) -> dict[str, Any]:
    """Shrink the violation of ``res``, write its scenario, print its trace; the JSON entry."""
    assert res.found is not None
    path = shrink(job, res.found.path, res.found.invariant)
    scenario = counterexample(job, path, res.found)
    report = scn.run(scenario, job.variant, frames=bool(plot))
    found = report.violation
    detail = found[1].detail if found else res.found.detail
    scenario = counterexample(job, path, type(res.found)(res.found.invariant, detail, path))
    design = job.variant or "kernel"
    target = Path(out or f"counterexample-{design}-{res.found.invariant}.yaml")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(scenario.to_yaml())
    if not quiet:
        print(f"violation: {res.found.invariant}: {detail}")
        print(f"shrunk from {len(res.found.path)} to {len(path)} steps (no step can be "
              f"removed); scenario written to {target}")
        print("\n".join(scn.format_report(report)))
    if plot:
        from fpstate.check.timeline import draw

        written = draw(report.frames, plot, f"{scenario.name}")
        if not quiet:
            print("timeline: " + ", ".join(map(str, written)), file=sys.stderr)
    return {"invariant": res.found.invariant, "scenario_file": str(target), "steps": len(path),
            "detail": detail, "found_after_steps": len(res.found.path)}


def run_explore(args: argparse.Namespace) -> int:
    job = job_for(args.model, args.variant, args.cpu, config_overrides(args.config))
    scn.make_world(job.model, job.config, job.variant)  # bad configuration: one line, exit 2
    v = vreg.get(args.variant) if args.variant else None
    mode = args.mode or (v.mode if v else "random")
    depth = args.depth or (v.depth if v else 6)
    ex = executors.local(args.workers)
    try:
        res = explore(job, ex, mode=mode, seconds=args.seconds, seed=args.seed, depth=depth)
    finally:
        ex.close()
    violations = []
    if res.found is not None:
        violations.append(report_violation(job, res, args.out, args.plot, quiet=args.json))
    fixes = list(job.config.get("fixes") or [])
    if args.json:
        print(json.dumps({
            "violations": violations, "states": res.states, "transitions": res.transitions,
            "seconds": round(res.seconds, 3), "model": job.model, "variant": job.variant,
            "cpu": job.config.get("cpu"), "fixes": fixes, "mode": res.mode, "depth": res.depth,
            "complete": res.complete, "walks": res.walks,
            "per_action": dict(sorted(res.per_action.items())),
        }, indent=2))
    elif res.found is None:
        design = f"variant {job.variant}" if job.variant else "the kernel's design"
        proposed = [f for f in fixes if f in PROPOSED_FIXES]
        later = [f for f in fixes if f not in PROPOSED_FIXES]
        with_fixes = (f", proposed fixes {', '.join(proposed)}" if proposed else "") + (
            f", later fixes {', '.join(later)}" if later else "")
        print(f"no violation: model {job.model} ({design}, cpu {job.config.get('cpu')}"
              f"{with_fixes}), {res.mode} mode, {res.seconds:.1f} s")
        print(f"  states {res.states}  transitions {res.transitions}"
              + (f"  walks {res.walks}" if res.mode == "random" else
                 f"  depth {res.depth}{' (complete)' if res.complete else ''}"))
        for name, n in sorted(res.per_action.items(), key=lambda kv: -kv[1]):
            print(f"  {name:18} {n}")
    return 1 if res.found is not None else 0
