"""Local engine: worker processes give the in-process result; a killed worker is replaced."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from fpstate.campaign.engines import LocalEngine, make_engine
from fpstate.campaign.partition import EXPAND, CellJob, InlinePool, Spill, explore_exhaustive
from fpstate.campaign.runner import run_campaign
from fpstate.campaign.walks import random_walks
from fpstate.check.explore import Job
from fpstate.errors import FpstateError

CFG = {"cpu": "sapphire-rapids", "kernel": "6.18", "cpus": 1, "processes": {"p0": 1},
       "vms": {"vm0": {"vmm": "p0.t0", "vcpus": 1}}}
CELL = CellJob(Job("x86", CFG, "pasid-write-incoherent"))


def facts(r):
    return (r.states, r.levels, r.tally.transitions, r.tally.illegal,
            sorted(r.tally.per_action.items()),
            {k: (n, f.path) for k, (n, f) in r.tally.violations.items()}, r.complete)


@pytest.fixture(scope="module")
def local2():
    eng = LocalEngine(2)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference():
    return facts(explore_exhaustive(CELL, InlinePool(CELL, 1), 2))


def test_two_processes_match_one(local2: LocalEngine, reference) -> None:
    pool = local2.partition_pool(CELL)
    r = explore_exhaustive(CELL, pool, 2)
    assert facts(r) == reference
    assert r.messages > 0 and r.restarts == 0
    assert len(set(pool.pids())) == 2 and os.getpid() not in pool.pids()


@pytest.mark.parametrize("level", [0, 1])
def test_a_killed_worker_is_replaced_and_the_result_is_complete(local2: LocalEngine,
                                                                reference, tmp_path: Path,
                                                                level: int) -> None:
    pool = local2.partition_pool(CELL)
    killed = []

    def kill(event: str, info: dict) -> None:
        # SIGKILL partition 1's worker while it expands the level (the request is in flight).
        if event == "dispatched" and info["level"] == level and info["op"] == EXPAND \
                and not killed:
            killed.append(pool.pids()[1])
            os.kill(killed[0], signal.SIGKILL)

    r = explore_exhaustive(CELL, pool, 2, progress=kill, spill=Spill(tmp_path / "s", 2))
    assert killed and killed[0] not in pool.pids()
    assert r.restarts == 1
    assert facts(r) == reference


def test_a_worker_that_keeps_dying_is_an_error(local2: LocalEngine) -> None:
    pool = local2.partition_pool(CELL)
    restart = pool.restart

    def kill(event: str, info: dict) -> None:
        if event == "dispatched" and info.get("op") == EXPAND:
            os.kill(pool.pids()[0], signal.SIGKILL)

    def restart_and_kill(index: int, visited: list[int]) -> None:
        restart(index, visited)
        os.kill(pool.pids()[index], signal.SIGKILL)

    pool.restart = restart_and_kill
    with pytest.raises(FpstateError, match="partition 0: its worker died 2 times"):
        explore_exhaustive(CELL, pool, 2, progress=kill, max_restarts=1)


def test_random_seeds_do_not_depend_on_the_workers(local2: LocalEngine) -> None:
    calls = [(CELL, seed, 3, 6) for seed in (1, 2, 3)]
    two = local2.run_tasks(random_walks, calls)
    one = LocalEngine(1).run_tasks(random_walks, calls)
    for a, b in zip(one, two, strict=True):
        assert (a.seed, a.walks, a.digests, a.tally.transitions, a.tally.per_action) == \
            (b.seed, b.walks, b.digests, b.tally.transitions, b.tally.per_action)
    assert random_walks(*calls[0]).digests == one[0].digests


def test_campaign_on_one_and_two_processes(campaigns, tmp_path: Path) -> None:
    c = campaigns.small(2, ["none", "pasid-write-incoherent"])
    one = run_campaign(c, make_engine("local", 1), str(tmp_path / "one"))
    eng = make_engine("local", 2)
    try:
        two = run_campaign(c, eng, str(tmp_path / "two"))
    finally:
        eng.close()
    assert campaigns.facts(one.cells) == campaigns.facts(two.cells)
    pasid = one.cells[1]
    assert [v["invariant"] for v in pasid["violations"]] == ["valid-registers-match-memory"]
    assert two.cells[1]["engine"] == "local, 2 workers"


def test_random_campaign_on_one_and_two_processes(campaigns, tmp_path: Path) -> None:
    c = campaigns.random_small([0, 1, 2], variants=["pasid-write-incoherent"])
    one = run_campaign(c, make_engine("local", 1), str(tmp_path / "one"))
    eng = make_engine("local", 2)
    try:
        two = run_campaign(c, eng, str(tmp_path / "two"))
    finally:
        eng.close()
    assert campaigns.facts(one.cells) == campaigns.facts(two.cells)
    assert one.cells[0]["seeds"] == [0, 1, 2] and one.cells[0]["walks"] == 12


def test_unknown_engine_is_named() -> None:
    with pytest.raises(FpstateError, match="unknown engine 'spark'"):
        make_engine("spark")


ARM64 = """
name: arm
model: arm64
matrix:
  profiles: [fvp-aem-fpmr, neoverse-v2]
  variants: [none, fpmr-ungated]
  configurations:
    - {name: one-cpu, cpus: 1}
explore: {mode: exhaustive, depth: 2}
"""


def test_arm64_campaign_on_one_and_two_processes(campaigns, tmp_path: Path) -> None:
    """Seed 002 on arm64: FPMR reachable by a guest that was not offered it, on the FPMR
    profile only (Neoverse V2 has no FPMR); the same on one and two processes."""
    from fpstate.campaign.campaign import loads

    c = loads(ARM64, "arm.yaml")
    one = run_campaign(c, make_engine("local", 1), str(tmp_path / "one"))
    eng = make_engine("local", 2)
    try:
        two = run_campaign(c, eng, str(tmp_path / "two"))
    finally:
        eng.close()
    assert campaigns.facts(one.cells) == campaigns.facts(two.cells)
    caught = {cell["cell"]["profile"]: cell["caught"] for cell in one.cells
              if cell["cell"]["variant"]}
    assert caught == {"fvp-aem-fpmr": True, "neoverse-v2": False}
    assert one.cells[0]["cell"]["kernel"] is None and one.cells[0]["messages"] == 0
