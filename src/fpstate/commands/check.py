"""``fpstate check``: the main job -- every scenario, every seed variant, every conform layer.

``fpstate check [--seconds S] [--budget S] [--key-walks N] [--samples N] [--scenarios DIR]
[--out DIR] [--workers N] [--no-conform] [--json]`` runs, on an embedded default configuration (this
host's CPU profile where the host is x86 and the CPU has what a check needs, else the bundled
Sapphire Rapids; the bundled FVP profile with FPMR for arm64):

1. every scenario of ``scenarios/`` under the kernel's design (must hold), and under each
   variant it lists (must violate the invariant it names);
2. every seed variant, and every variant that is the newest kernel's own unfixed code
   (`variants.UNFIXED_VARIANTS`: Linux 6.18's two suspend/resume bugs, its stale MXCSR in
   UABI buffers, and the guest XFD gap b45f72177594 leaves, whose proposed fixes the default
   configuration applies), through the explorer from the default configuration,
   no scenario hint (must find the invariant the variant breaks, within ``--budget``
   seconds);
3. the explorer under the kernel's design for ``--seconds`` per model and CPU (must find
   nothing);
4. the premise of the explorer's memos, per model and CPU: states reached again by another
   history behave alike for a few steps (`fpstate.check.keysound`, ``--key-walks`` walks);
5. ``fpstate conform`` for every registered layer (in-process; a layer the host cannot
   answer is reported skipped with its reason).

It prints one table and exits 0 when everything is as expected, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fpstate.check import executor as executors
from fpstate.check import scenario as scn
from fpstate.check import variants as vreg
from fpstate.check.explore import Job, default_config, explore, shrink
from fpstate.check.world import audited_memos
from fpstate.commands import positive_int, positive_seconds
from fpstate.errors import FpstateError

BUNDLED_X86 = "sapphire-rapids"
BUNDLED_ARM64 = "fvp-aem-fpmr"


@dataclass(slots=True)
class Row:
    kind: str
    name: str
    cpu: str
    expected: str
    outcome: str
    ok: bool
    seconds: float


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check", help="the main job: scenarios, seed variants, explorer and conform layers",
        description="Run every scenario, find every seed variant with the explorer, explore "
        "the kernel's design, and run every conform layer the host can answer; one table.")
    p.add_argument("--seconds", type=positive_seconds, default=8.0,
                   help="explorer time under the kernel's design, per model and CPU (8)")
    p.add_argument("--budget", type=positive_seconds, default=30.0,
                   help="explorer time limit per variant (30)")
    p.add_argument("--key-walks", type=positive_int, default=60,
                   help="walks per model and CPU that test the state keys (60)")
    p.add_argument("--samples", type=positive_int, default=30, help="cases per conform layer (30)")
    p.add_argument("--scenarios", metavar="DIR", help="the scenario directory (default: "
                   "./scenarios, else the one beside the package sources)")
    p.add_argument("--out", metavar="DIR", help="where counterexamples go (default: a "
                   "temporary directory)")
    p.add_argument("--workers", type=positive_int, help="processes (default: every core)")
    p.add_argument("--no-conform", action="store_true", help="skip the conform layers")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_check)


def host_x86_cpu() -> tuple[str, str]:
    """("host", "") when this machine is x86 and its profile loads, else the bundled CPU and
    why."""
    from fpstate.x86.profiles import load_profile

    try:
        load_profile("host")
    except FpstateError as e:
        return BUNDLED_X86, f"host profile unavailable ({e})"
    return "host", ""


def scenario_dir(arg: str | None) -> Path | None:
    if arg:
        p = Path(arg)
        if not p.is_dir():
            raise FpstateError(f"--scenarios {arg}: not a directory")
        return p
    for cand in (Path("scenarios"), Path(__file__).resolve().parents[3] / "scenarios"):
        if cand.is_dir() and any(cand.glob("*.yaml")):
            return cand
    return None


def check_scenarios(directory: Path | None) -> list[Row]:
    if directory is None:
        return [Row("scenario", "(none)", "-", "scenarios hold", "no scenarios directory "
                    "found (use --scenarios DIR)", False, 0.0)]
    rows = []
    for path in sorted(directory.glob("*.yaml")):
        t0 = time.perf_counter()
        try:
            s = scn.load(path)
            report = scn.run(s)
        except Exception as e:  # a bad file or a model crash is a failed row
            rows.append(Row("scenario", path.name, "-", "every invariant holds",
                            f"error: {type(e).__name__}: {e}", False, time.perf_counter() - t0))
            continue
        cpu = str(s.config.get("cpu", "default"))
        found = report.violation
        if report.ok:
            outcome, ok = f"held ({len(report.records)} steps)", True
        elif found is not None:
            outcome, ok = f"violated {found[1].invariant} at step {found[0]}", False
        else:
            outcome, ok = f"expectation failed at step {report.failed_expectation.n}", False
        rows.append(Row("scenario", path.name, cpu, "every invariant holds", outcome, ok,
                        time.perf_counter() - t0))
        for variant, inv in s.variants.items():
            t0 = time.perf_counter()
            report = scn.run(s, variant)
            hit = _first_violations(report)
            ok = inv in hit
            outcome = (f"violated {', '.join(hit)} at step {report.violation[0]}" if hit  # type: ignore[index]
                       else "no violation")
            rows.append(Row("scenario", f"{path.name} --variant {variant}", cpu,
                            f"violates {inv}", outcome, ok, time.perf_counter() - t0))
    return rows


def _first_violations(report: scn.Report) -> list[str]:
    if report.initial:
        return [v.invariant for v in report.initial]
    for r in report.records:
        if r.violations:
            return list(dict.fromkeys(v.invariant for v in r.violations))
    return []


def check_variants(ex: executors.Executor, budget: float, out: Path, host_cpu: str,
                   names: tuple[str, ...]) -> list[Row]:
    rows = []
    for name in names:
        v = vreg.get(name)
        cpu = host_cpu if v.model == "x86" else BUNDLED_ARM64
        why = vreg.missing(v, cpu)
        if why and v.model == "x86" and cpu != BUNDLED_X86:
            cpu = BUNDLED_X86
            why = vreg.missing(v, cpu)
        cfg = default_config(v.model, cpu)
        cfg.update(v.config)
        job = Job(v.model, cfg, name)
        t0 = time.perf_counter()
        try:
            res = explore(job, ex, mode=v.mode, seconds=budget, seed=0, depth=v.depth)
        except Exception as e:  # a model crash is a failed row
            rows.append(Row("variant", name, cpu, f"finds {v.expect}",
                            f"model error: {type(e).__name__}: {e}", False,
                            time.perf_counter() - t0))
            continue
        if res.found is None:
            rows.append(Row("variant", name, cpu, f"finds {v.expect}",
                            f"nothing in {res.seconds:.1f} s ({res.transitions} transitions)"
                            + (f"; {why}" if why else ""), False, time.perf_counter() - t0))
            continue
        # Shrinking replays many paths that share prefixes: every memo answer it takes is
        # recomputed, and one the state contradicts (equal keys, unequal states) fails the row.
        with audited_memos() as contradicted:
            path = shrink(job, res.found.path, res.found.invariant)
        target = out / f"{name}.yaml"
        from fpstate.check.explore import counterexample

        target.write_text(counterexample(job, path, res.found).to_yaml())
        hit = res.found.invariants or (res.found.invariant,)
        ok = v.found_by(hit) and not contradicted
        outcome = (f"found {', '.join(hit)} in {res.seconds:.1f} s, shrunk to {len(path)} "
                   f"steps ({target.name})")
        if contradicted:
            c = contradicted[0]
            outcome += f"; MEMO CONTRADICTED ({c.kind}): {c.detail}"
        rows.append(Row("variant", name, cpu, f"finds {v.expect}", outcome, ok,
                        time.perf_counter() - t0))
    return rows


def _models(host_cpu: str) -> list[tuple[str, str]]:
    """(model, CPU) of the explorer's checks: x86 on this host's CPU and on the bundled one,
    arm64 on its bundled profile."""
    cpus = [("x86", host_cpu)] + ([("x86", BUNDLED_X86)] if host_cpu != BUNDLED_X86 else [])
    cpus.append(("arm64", BUNDLED_ARM64))
    return cpus


def check_keys(walks: int, host_cpu: str) -> list[Row]:
    """The state keys the explorer's memos rest on (fpstate.check.keysound.bisimulate)."""
    from fpstate.check.keysound import bisimulate

    rows = []
    for model, cpu in _models(host_cpu):
        t0 = time.perf_counter()
        try:
            pairs, found = bisimulate(Job(model, default_config(model, cpu)).initial(),
                                      walks=walks, seed=0, limit=1)
        except Exception as e:  # a model crash is a failed row
            rows.append(Row("keys", f"{model}, equal keys behave alike", cpu, "no mismatch",
                            f"model error: {type(e).__name__}: {e}", False,
                            time.perf_counter() - t0))
            continue
        if found:
            outcome = f"MISMATCH {str(found[0]).splitlines()[0]}"
        else:
            outcome = f"{pairs} pairs of histories compared, no mismatch"
        rows.append(Row("keys", f"{model}, equal keys behave alike", cpu, "no mismatch",
                        outcome, not found, time.perf_counter() - t0))
    return rows


def check_kernel_design(ex: executors.Executor, seconds: float, host_cpu: str) -> list[Row]:
    rows = []
    for model, cpu in _models(host_cpu):
        job = Job(model, default_config(model, cpu))
        try:
            res = explore(job, ex, mode="random", seconds=seconds, seed=1)
        except Exception as e:  # a model crash is a failed row
            rows.append(Row("explore", f"{model}, the kernel's design", cpu, "no violation",
                            f"model error: {type(e).__name__}: {e}", False, 0.0))
            continue
        if res.found is None:
            outcome = (f"nothing: {res.states} states, {res.transitions} transitions in "
                       f"{res.seconds:.1f} s")
        else:
            outcome = f"VIOLATED {res.found.invariant}: {res.found.detail}"
        rows.append(Row("explore", f"{model}, the kernel's design", cpu, "no violation",
                        outcome, res.found is None, res.seconds))
    return rows


def check_conform(samples: int) -> list[Row]:
    from fpstate.commands.conform import layers

    rows = []
    for name, layer in layers().items():
        t0 = time.perf_counter()
        try:
            r = layer.run(samples, 1)
        except FpstateError as e:
            rows.append(Row("conform", name, "host", "model = host", f"error: {e}", False,
                            time.perf_counter() - t0))
            continue
        skipped = f"; {len(r.skipped)} part(s) skipped" if r.skipped else ""
        if r.cases == 0 and r.skipped:
            outcome, ok = f"skipped: {r.skipped[0]}", True
        else:
            outcome = f"{r.cases} cases, {len(r.mismatches)} mismatches{skipped}"
            ok = not r.mismatches
        rows.append(Row("conform", name, "host", "model = host", outcome, ok,
                        time.perf_counter() - t0))
    return rows


def run_check(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    host_cpu, why = host_x86_cpu()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fpstate-check-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = check_scenarios(scenario_dir(args.scenarios))
    ex = executors.local(args.workers)
    try:
        rows += check_variants(ex, args.budget, out, host_cpu,
                               vreg.SEED_VARIANTS + vreg.UNFIXED_VARIANTS)
        rows += check_kernel_design(ex, args.seconds, host_cpu)
    finally:
        ex.close()
    rows += check_keys(args.key_walks, host_cpu)
    if not args.no_conform:
        rows += check_conform(args.samples)
    ok = all(r.ok for r in rows)
    total = time.perf_counter() - start
    if args.json:
        print(json.dumps({"ok": ok, "seconds": round(total, 1), "host_cpu": host_cpu,
                          "rows": [asdict(r) for r in rows]}, indent=2))
        return 0 if ok else 1
    _print_table(rows, host_cpu, why, total, ok, out)
    return 0 if ok else 1


def _print_table(rows: list[Row], host_cpu: str, why: str, total: float, ok: bool,
                 out: Path) -> None:
    console = Console(width=160)
    table = Table(title=f"fpstate check (x86 CPU: {host_cpu}{'; ' + why if why else ''})",
                  title_justify="left")
    for col in ("", "check", "cpu", "expected", "outcome", "s"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row("ok" if r.ok else "FAIL", f"{r.kind}: {r.name}", r.cpu, r.expected,
                      r.outcome, f"{r.seconds:.1f}")
    console.print(table)
    bad = sum(not r.ok for r in rows)
    console.print(f"{'all as expected' if ok else f'{bad} check(s) not as expected'}: "
                  f"{len(rows)} checks in {total:.0f} s; counterexamples in {out}")

