"""Campaign throughput: states per second against the number of workers, and the costs that a
scaling model needs (docs/campaigns.md, "How a campaign scales").

    python bench/bench_campaign.py [--depth 4] [--workers 1 2] [--no-ray] [--json FILE]

One bounded-exhaustive cell (Sapphire Rapids, one CPU, one task that is the VMM of one vCPU,
the kernel's design) is explored on one process, on 2 local processes and on 2 Ray actors;
every run must find the same states. Then the pieces of a level are measured alone:

- t_transition: one successor (clone, step with every invariant, key digest), in a worker;
- t_rebuild(d): rebuilding an accepted state by replaying its path of d actions;
- s_candidate / t_codec: bytes and pickle+unpickle time of a candidate (digest and path) in
  a batch, what crosses between partitions;
- t_barrier: one empty request to every partition and back (the synchronisation each level
  pays twice), for local processes and for Ray actors;
- t_driver: the coordinator's own time per state (spilling digests, routing).

The machine is shared (2 cores): the load average is printed beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import tempfile
import time
from typing import Any

from fpstate.campaign.engines import LocalEngine, RayEngine
from fpstate.campaign.partition import (
    ACCEPT,
    CellJob,
    InlinePool,
    Partition,
    Spill,
    explore_exhaustive,
    state_digest,
)
from fpstate.check.explore import Job

CFG = {"cpu": "sapphire-rapids", "kernel": "6.18", "cpus": 1, "processes": {"p0": 1},
       "vms": {"vm0": {"vmm": "p0.t0", "vcpus": 1}}}


def run(label: str, pool: Any, cell: CellJob, depth: int) -> dict[str, Any]:
    t = time.perf_counter()
    r = explore_exhaustive(cell, pool, depth, spill=Spill(None, pool.size))
    secs = time.perf_counter() - t
    return {"engine": label, "workers": pool.size, "states": r.states,
            "transitions": r.tally.transitions, "seconds": round(secs, 3),
            "states_per_s": round(r.states / secs, 1),
            "transitions_per_s": round(r.tally.transitions / secs, 1),
            "messages": r.messages, "levels": r.levels,
            "worker_seconds": round(r.worker_seconds, 3),
            "cpu_ms_per_state": round(1000 * r.worker_cpu_seconds / r.states, 3)}


def pieces(cell: CellJob, depth: int) -> dict[str, Any]:
    """The per-item costs, measured in this process."""
    part = Partition(cell, 0, 1)
    d0 = state_digest(cell.job.world())
    frontier: list[Any] = [[(d0, ())]]
    last: tuple[int, int, float] = (0, 1, 0.0)
    for level in range(depth):
        part.accept(level, frontier)
        t = time.perf_counter()
        out, st = part.expand(level)
        last = (level, st.tally.transitions, time.perf_counter() - t)
        frontier = out
    level, transitions, el = last
    cands = frontier[0]
    paths = [p for _, p in cands[:200]]
    t = time.perf_counter()
    for p in paths:
        part.rebuild(p)
    t_rebuild = (time.perf_counter() - t) / len(paths)
    blob = pickle.dumps(cands, protocol=pickle.HIGHEST_PROTOCOL)
    t = time.perf_counter()
    for _ in range(5):
        pickle.loads(pickle.dumps(cands, protocol=pickle.HIGHEST_PROTOCOL))
    t_codec = (time.perf_counter() - t) / 5 / len(cands)
    digests = [d for d, _ in cands]
    with tempfile.TemporaryDirectory() as tmp:
        spill = Spill(tmp, 1)
        t = time.perf_counter()
        for _ in range(20):
            spill.append(0, digests)
        t_driver = (time.perf_counter() - t) / 20 / len(digests)
    return {"level_measured": level, "t_transition_ms": round(1000 * el / transitions, 3),
            "depth_rebuilt": len(paths[0]), "t_rebuild_ms": round(1000 * t_rebuild, 3),
            "s_candidate_bytes": round(len(blob) / len(cands), 1),
            "t_codec_us": round(1e6 * t_codec, 2), "t_driver_us": round(1e6 * t_driver, 3)}


def barrier(pool: Any, rounds: int = 30) -> float:
    """Milliseconds for an empty accept on every partition and back."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for p in range(pool.size):
            pool.submit(p, ACCEPT, 0, [])
        pool.collect()
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times), 3)


def model(p: dict[str, Any], levels: list[int], workers: int, t_barrier_ms: float,
          transitions: int) -> float:
    """Predicted seconds of a breadth-first cell with ``levels`` (new states per depth) on
    ``workers`` workers (docs/campaigns.md: T_level summed over the levels)."""
    expanded = sum(levels[:-1])
    b = transitions / expanded  # transitions per expanded state
    t_state = p["t_rebuild_ms"] / 1000 + b * p["t_transition_ms"] / 1000
    total = 0.0
    for f in levels[:-1]:
        share = f / workers
        # The busiest of W partitions of a level holds about share + sqrt(2 share ln W)
        # states (the maximum of W Poisson counts): the level waits for it.
        imbalance = (2 * math.log(workers) / share) ** 0.5 if workers > 1 else 0.0
        expand = share * t_state * (1 + min(imbalance, workers - 1))
        codec = share * b * p["t_codec_us"] / 1e6 * (workers - 1) / workers
        total += expand + codec + 2 * t_barrier_ms / 1000 + f * p["t_driver_us"] / 1e6
    return total + 2 * t_barrier_ms / 1000  # the last level is accepted, not expanded


def predictions(p: dict[str, Any], levels: list[int], transitions: int) -> None:
    """The model for this cell and for deeper ones (the last growth ratio per level), on a
    32-node cluster: 32 or 256 workers, a cluster barrier of 0.5 ms per worker."""
    ratio = levels[-1] / levels[-2]
    print(f"\nmodel (b = {transitions / sum(levels[:-1]):.1f} transitions per expanded "
          f"state, levels grow x{ratio:.1f}):")
    print(f"{'depth':>5} {'states':>12} " + " ".join(f"{'W=' + str(w):>9}" for w in
                                                      (1, 2, 32, 256)) + "  (seconds; speedup)")
    for extra in range(0, 4):
        lv = levels + [int(levels[-1] * ratio ** k) for k in range(1, extra + 1)]
        tr = int(transitions * sum(lv[:-1]) / sum(levels[:-1]))
        t1 = model(p, lv, 1, 0.0, tr)
        cells = []
        for w in (1, 2, 32, 256):
            t = model(p, lv, w, 0.1 if w <= 2 else 0.5 * w, tr)
            cells.append(f"{t:>9.1f}" if w == 1 else f"{t:>5.1f};{t1 / t:>3.0f}")
        print(f"{len(lv) - 1:>5} {sum(lv):>12,} " + " ".join(f"{c:>9}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    cell = CellJob(Job("x86", CFG, None))
    rows = []
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for n in a.workers:
        if n == 1:
            rows.append(run("inline", InlinePool(cell, 1), cell, a.depth))
        else:
            eng = LocalEngine(n)
            try:
                pool = eng.partition_pool(cell)
                rows.append(run("local", pool, cell, a.depth))
                local_barrier = barrier(pool)
            finally:
                eng.close()
            rows[-1]["t_barrier_ms"] = local_barrier
    if not a.no_ray:
        try:
            eng = RayEngine(max(a.workers))
        except Exception as e:  # Ray absent or unable to start: say so, keep the rest
            print(f"ray: not measured ({e})")
        else:
            try:
                pool = eng.partition_pool(cell)
                rows.append(run("ray", pool, cell, a.depth))
                rows[-1]["t_barrier_ms"] = barrier(eng.partition_pool(cell))
            finally:
                eng.close()
    assert len({(r["states"], r["transitions"]) for r in rows}) == 1, "engines disagree"
    base = rows[0]["states_per_s"]
    print(f"\ncell: {CFG['cpu']}, 1 CPU, 1 task + 1 vCPU, kernel's design, depth {a.depth}: "
          f"{rows[0]['states']} states, {rows[0]['transitions']} transitions")
    print(f"{'engine':8} {'workers':>7} {'seconds':>8} {'states/s':>9} {'speedup':>8} "
          f"{'messages':>9} {'barrier ms':>10} {'CPU ms/state':>12}")
    for r in rows:
        print(f"{r['engine']:8} {r['workers']:>7} {r['seconds']:>8.2f} {r['states_per_s']:>9.1f} "
              f"{r['states_per_s'] / base:>8.2f} {r['messages']:>9} "
              f"{r.get('t_barrier_ms', 0):>10.3f} {r['cpu_ms_per_state']:>12.3f}")
    p = pieces(cell, a.depth)
    print("\nper-item costs (one process):")
    for k, v in p.items():
        print(f"  {k:20} {v}")
    predictions(p, rows[0]["levels"], rows[0]["transitions"])
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs": rows, "pieces": p, "load": os.getloadavg()[0]}, f, indent=1)


if __name__ == "__main__":
    main()
