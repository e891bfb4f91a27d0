"""Running a campaign: cell after cell on an engine, each finished cell written at once.

Cells run one after another; each uses every worker of the engine (a bounded-exhaustive cell
is split into one partition per worker, a random cell's seeds go to the workers in batches).
After a cell's exploration its violations are shrunk (fpstate.check.explore.shrink) and
written as scenario files, then its ``cell.json`` (fpstate.campaign.resume explains why that
order makes interruption safe). Progress goes to a callback as events:

- ``cell-start`` {index, total, id} and ``cell-done`` {index, total, id, report};
- ``dispatched`` {level} and ``round`` {level, new, states, transitions, violations, seconds}
  (exhaustive), ``seeds`` {done, of, states, transitions, violations, seconds} (random);
- ``restart`` {level, partition, reason}: a dead worker's partition was rebuilt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fpstate.campaign.campaign import Campaign, Cell, check_worlds
from fpstate.campaign.engines import Engine
from fpstate.campaign.partition import CellJob, ExhaustiveResult, Spill, explore_exhaustive
from fpstate.campaign.report import totals, write_summary
from fpstate.campaign.resume import ReportDir
from fpstate.campaign.walks import RandomResult, explore_random
from fpstate.check import variants as variant_registry
from fpstate.check.explore import Found, counterexample, shrink
from fpstate.check.scenario import Scenario, Step, world_class

Progress = Callable[[str, dict[str, Any]], None]


@dataclass(slots=True)
class Outcome:
    """What a campaign run ended with."""

    cells: list[dict[str, Any]]  #: every finished cell's report, in campaign order
    ran: int  #: cells run now (the others were finished by an earlier run)
    total: int
    root: str

    @property
    def totals(self) -> dict[str, Any]:
        return totals(self.cells)


def cell_job(cell: Cell) -> CellJob:
    acts = cell.configuration.actions
    return CellJob(cell.job(), frozenset(acts) if acts is not None else None)


def run_cell(cell: Cell, campaign: Campaign, engine: Engine, rd: ReportDir,
             progress: Progress | None = None) -> dict[str, Any]:
    """Explore one cell, shrink and write its counterexamples, and return its report."""
    rd.begin_cell(cell.id)
    cj = cell_job(cell)
    ex, budget = campaign.explore, campaign.budget
    res: ExhaustiveResult | RandomResult
    if ex.mode == "exhaustive":
        pool = engine.partition_pool(cj)
        spill = Spill(rd.spill_dir(cell.id), pool.size)
        try:
            res = explore_exhaustive(cj, pool, ex.depth, stop=ex.stop,
                                     max_states=budget.states, max_seconds=budget.seconds,
                                     spill=spill, progress=progress)
        finally:
            pool.close()
            spill.remove()
    else:
        engine.release()
        res = explore_random(cj, ex.seeds, ex.walks, ex.walk_length, engine.run_tasks,
                             batch=engine.workers, max_states=budget.states,
                             max_seconds=budget.seconds, progress=progress)
    return _cell_report(cell, campaign, engine, rd, res)


def _cell_report(cell: Cell, campaign: Campaign, engine: Engine, rd: ReportDir,
                 res: ExhaustiveResult | RandomResult) -> dict[str, Any]:
    job = cell.job()
    t = res.tally
    expected = variant_registry.BY_NAME[cell.variant].expect if cell.variant else None
    violations = []
    for inv in sorted(t.violations):
        count, found = t.violations[inv]
        path, note = _shrunk(job, found)
        scn = counterexample(job, path, found)
        rel = rd.write_file(cell.id, f"violations/{inv}.yaml", scn.to_yaml())
        violations.append({"invariant": inv, "count": count, "detail": found.detail,
                           "found_steps": len(found.path), "steps": len(path),
                           "path": [str(a) for a in path], "also": list(found.invariants),
                           "expected": inv == expected, "scenario": rel, "shrink": note})
    errors = []
    for n, msg in enumerate(sorted(t.errors)):
        count, path = t.errors[msg]
        scn = Scenario(name=f"model error under {cell.variant or 'the kernel design'}",
                       model=job.model, config=dict(job.config),
                       steps=tuple(Step(a) for a in path),
                       variants={}, description=f"The model raised {msg}\n")
        rel = rd.write_file(cell.id, f"errors/{n}.yaml", scn.to_yaml())
        errors.append({"error": msg, "count": count, "path": [str(a) for a in path],
                       "scenario": rel})
    vocab = cell.configuration.actions or tuple(sorted(world_class(cell.model).SPECS))
    ex = campaign.explore
    report: dict[str, Any] = {
        "cell": cell.describe(), "mode": ex.mode, "status": "done",
        "states": res.states, "transitions": t.transitions, "illegal": t.illegal,
        "complete": res.complete, "stopped_by": res.stopped_by,
        "coverage": dict(sorted(t.per_action.items())),
        "not_covered": sorted(a for a in vocab if a not in t.per_action),
        "violations": violations, "errors": errors, "expected": expected,
        "caught": None if expected is None else any(v["expected"] for v in violations),
        "seconds": round(res.seconds, 3),
        "states_per_second": round(res.states / res.seconds, 1) if res.seconds else 0.0,
        "worker_seconds": round(res.worker_seconds, 3),
        "engine": engine.describe(), "workers": engine.workers,
    }
    if isinstance(res, ExhaustiveResult):
        report.update({"depth_bound": ex.depth, "stop": ex.stop, "depth": res.depth,
                       "levels": res.levels, "rounds": res.rounds, "messages": res.messages,
                       "worker_cpu_seconds": round(res.worker_cpu_seconds, 3),
                       "received": res.received, "restarts": res.restarts})
    else:
        report.update({"seeds": res.seeds, "walks": res.walks, "walk_length": ex.walk_length})
    rd.finish_cell(cell.id, report)
    return report


def _shrunk(job: Any, found: Found) -> tuple[tuple[Any, ...], str]:
    """The shrunk path (checker's delta debugging), or the path as found and why not."""
    if not found.path:
        return (), "violated at boot"
    try:
        path = shrink(job, found.path, found.invariant)
    except ValueError as e:
        return found.path, f"not shrunk: {e}"
    return path, f"shrunk from {len(found.path)} steps" if len(path) < len(found.path) \
        else "minimal as found"


def run_campaign(campaign: Campaign, engine: Engine, report_dir: str, *,
                 fresh: bool = False, progress: Progress | None = None) -> Outcome:
    """Run the cells not finished yet in ``report_dir`` and rewrite the summary. An
    interruption (KeyboardInterrupt) leaves every finished cell and the summary of them."""
    rd = ReportDir(report_dir, campaign, fresh=fresh)
    check_worlds(campaign)
    finished = rd.finished()
    total = len(campaign.cells)
    ran = 0
    start = time.perf_counter()
    try:
        for i, cell in enumerate(campaign.cells):
            if cell.id in finished:
                continue
            if progress is not None:
                progress("cell-start", {"index": i, "total": total, "id": cell.id,
                                        "done": len(finished)})
            finished[cell.id] = run_cell(cell, campaign, engine, rd, progress)
            ran += 1
            if progress is not None:
                progress("cell-done", {"index": i, "total": total, "id": cell.id,
                                       "done": len(finished), "report": finished[cell.id]})
            _write_index(rd, campaign, engine, finished, time.perf_counter() - start, False)
    except BaseException:
        _write_index(rd, campaign, engine, finished, time.perf_counter() - start, True)
        raise
    _write_index(rd, campaign, engine, finished, time.perf_counter() - start, True)
    cells = [finished[c.id] for c in campaign.cells if c.id in finished]
    return Outcome(cells, ran, total, str(rd.root))


def _write_index(rd: ReportDir, campaign: Campaign, engine: Engine,
                 finished: dict[str, dict[str, Any]], seconds: float, summary: bool) -> None:
    cells = [finished[c.id] for c in campaign.cells if c.id in finished]
    rd.write_index({
        "name": campaign.name, "fingerprint": campaign.fingerprint, "model": campaign.model,
        "engine": engine.describe(), "mode": campaign.explore.mode,
        "cells": [{"id": c.id, "status": "done" if c.id in finished else "pending",
                   "report": f"cells/{c.id}/cell.json" if c.id in finished else None}
                  for c in campaign.cells],
        "totals": totals(cells), "seconds_this_run": round(seconds, 3),
    })
    if summary or len(cells) == len(campaign.cells):
        write_summary(rd.root, campaign.name, campaign.description, engine.describe(), cells,
                      len(campaign.cells))


__all__ = ["Outcome", "cell_job", "run_campaign", "run_cell"]
