"""Ray engine: a local Ray instance with two workers, started once for the module.

The same bounded-exhaustive campaign gives the same states, transitions and violations on one
process, two local processes and two Ray actors; an actor killed mid-campaign is replaced and
the campaign is still complete; random seeds run as Ray tasks give the local result.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'fpstate[ray]')")

from fpstate.campaign.engines import LocalEngine, RayEngine
from fpstate.campaign.partition import (
    EXPAND,
    CellJob,
    InlinePool,
    explore_exhaustive,
)
from fpstate.campaign.runner import run_campaign
from fpstate.campaign.walks import random_walks
from fpstate.check.explore import Job

CFG = {"cpu": "sapphire-rapids", "kernel": "6.18", "cpus": 1, "processes": {"p0": 1},
       "vms": {"vm0": {"vmm": "p0.t0", "vcpus": 1}}}


@pytest.fixture(scope="module")
def ray2():
    """ray.init(num_cpus=2, include_dashboard=False) inside the test (RayEngine does it)."""
    import ray

    assert not ray.is_initialized()
    eng = RayEngine(workers=2)
    assert ray.cluster_resources()["CPU"] == 2
    yield eng
    eng.close()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def small_results(tmp_path_factory, campaigns):
    """The small campaign (kernel's design and seed 004, depth 2) on one process and on two
    local processes."""
    c = campaigns.small(2, ["none", "pasid-write-incoherent"])
    root = tmp_path_factory.mktemp("ray-ref")
    one = run_campaign(c, LocalEngine(1), str(root / "one"))
    two_engine = LocalEngine(2)
    try:
        two = run_campaign(c, two_engine, str(root / "two"))
    finally:
        two_engine.close()
    return c, one, two


def test_one_process_two_processes_and_two_ray_workers_agree(ray2: RayEngine, small_results,
                                                             campaigns, tmp_path: Path) -> None:
    c, one, two = small_results
    on_ray = run_campaign(c, ray2, str(tmp_path / "ray"))
    assert campaigns.facts(one.cells) == campaigns.facts(two.cells) == \
        campaigns.facts(on_ray.cells)
    cell = on_ray.cells[1]
    assert cell["engine"] == "ray (local Ray instance), 2 workers"
    assert cell["messages"] > 0 and cell["restarts"] == 0
    assert [v["invariant"] for v in cell["violations"]] == ["valid-registers-match-memory"]
    assert (tmp_path / "ray" / cell["violations"][0]["scenario"]).is_file()


def test_an_actor_killed_mid_campaign_is_replaced(ray2: RayEngine, small_results, campaigns,
                                                  tmp_path: Path) -> None:
    c, one, _ = small_results
    killed = []

    def kill(event: str, info: dict) -> None:
        # In the second cell, kill partition 1's actor while it expands level 1.
        if event == "cell-start":
            killed.append(("cell", info["index"]))
        if event == "dispatched" and info["level"] == 1 and info["op"] == EXPAND \
                and killed[-1] == ("cell", 1):
            ray2.ray.kill(ray2._pool.actors[1])
            killed.append("actor")

    out = run_campaign(c, ray2, str(tmp_path / "killed"), progress=kill)
    assert "actor" in killed
    assert [cell["restarts"] for cell in out.cells] == [0, 1]
    assert campaigns.facts(out.cells) == campaigns.facts(one.cells)
    assert all(cell["complete"] for cell in out.cells)


def test_signal_frames_name_one_state_in_every_actor(ray2: RayEngine) -> None:
    """A task's signal frames are in the state key through Python's hash() of their bytes,
    salted per process: Ray actors would give one state several digests (measured: 600
    states instead of 588 at depth 5) unless every worker runs with the same PYTHONHASHSEED,
    as RayEngine arranges."""
    cell = CellJob(Job("x86", {"cpu": "sapphire-rapids", "cpus": 1, "processes": {"p0": 1},
                               "vms": {}}, None),
                   frozenset({"run", "write", "sigaction", "signal", "sigreturn", "idle",
                              "syscall"}))
    ref = explore_exhaustive(cell, InlinePool(cell, 1), 5)
    r = explore_exhaustive(cell, ray2.partition_pool(cell), 5)
    assert ref.tally.per_action["signal"] > 0 and ref.tally.per_action["sigreturn"] > 0
    assert (r.states, r.levels, r.tally.transitions) == \
        (ref.states, ref.levels, ref.tally.transitions)


def test_random_seeds_as_ray_tasks(ray2: RayEngine) -> None:
    cell = CellJob(Job("x86", CFG, "pasid-write-incoherent"))
    calls = [(cell, seed, 3, 6) for seed in (4, 5)]
    on_ray = ray2.run_tasks(random_walks, calls)
    local = LocalEngine(1).run_tasks(random_walks, calls)
    for a, b in zip(on_ray, local, strict=True):
        # The number of states, not their digests: this process hashes with its own salt.
        assert (a.seed, len(a.digests), a.tally.transitions, sorted(a.tally.violations)) == \
            (b.seed, len(b.digests), b.tally.transitions, sorted(b.tally.violations))


def test_a_partition_actor_settles_its_process(ray2: RayEngine) -> None:
    """An actor's process is fpstate's own (it runs nothing else): its garbage collector is
    settled between expansions, as in a local worker process (fpstate.check.memo)."""
    import ray

    from fpstate.check import memo

    actor = ray2._actor_cls.remote()
    try:
        assert ray.get(actor.__ray_call__.remote(lambda self: memo.SETTLE)) is True
    finally:
        ray.kill(actor)
