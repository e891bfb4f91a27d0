"""Checker benchmarks: transitions per second with every invariant on, and the time to find
each seed variant from a cold start.

    python3 bench/bench_check.py [--seconds S] [--explore S] [--budget S] [--skip-variants]
                                 [--runs N]

Part 1 runs the explorer's random walks in a new process (one core) on the default
configuration of each model under the kernel's design, every invariant in force and every
state keyed after every step, and reports transitions per CPU second (process time, so other
load on the machine counts less) and the distinct states reached, then where the time goes.
The invariants of a state whose key was already checked clean are not evaluated again (equal
keys are states that behave alike: fpstate.check.world), so the rate grows as a run revisits
states; a fresh process starts with an empty memo, as ``fpstate explore`` does. With
``--explore S``, ``fpstate explore`` runs S seconds per model on every core, and its
transitions per core and wall second are reported.

With ``--instructions N``, the same walks are counted in instructions instead of seconds: N
explorer walks from a fixed seed (the same walks on every run of the same code) under
valgrind's callgrind, less a run of no walk, per transition. The machine's speed drifts from
one minute to the next; instruction counts do not, so they compare one version of the code
with another.

Part 2 starts ``fpstate explore --variant NAME`` as a fresh
process for each seed variant (every core) and reports the wall time until it exits with the
counterexample written, interpreter start-up and imports included (with ``--runs N``: N
cold starts with seeds 0..N-1, the median and the worst).
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from fpstate.check.explore import Job, _pick, default_config, random_slice
from fpstate.check.memo import own_process, settle
from fpstate.check.variants import SEED_VARIANTS
from fpstate.check.world import StepError
from fpstate.errors import FpstateError

MODELS = (("x86", "sapphire-rapids"), ("x86", "host"), ("arm64", "fvp-aem-fpmr"))


def throughput(model: str, cpu: str, seconds: float) -> dict[str, float]:
    """The explorer's random walks (`random_slice`: walks of 60 steps, swarm and focus as in
    ``fpstate explore``) for ``seconds`` of CPU time in this process; then the same walks
    instrumented, for the CPU cost of each part of a transition."""
    job = Job(model, default_config(model, cpu))
    clock = time.process_time
    start = clock()
    s = random_slice(job, 1, seconds, 60)
    if s.found is not None:
        raise SystemExit(f"{model}/{cpu}: the kernel's design violated {s.found.invariant} "
                         f"after {s.found.path}")
    out = {"transitions": s.transitions, "cpu_seconds": clock() - start, "states": len(s.keys)}
    out["per_second"] = s.transitions / out["cpu_seconds"]
    out.update(parts(job, min(seconds, 3.0)))
    return out


def parts(job: Job, seconds: float) -> dict[str, float]:
    """Microseconds per transition in each part: the model's step, the state key (hashed once
    per state), the invariants (skipped for a state whose key was checked clean), the enabled
    actions (memoised by key) and cloning the initial world for each walk."""
    w0 = job.initial()
    rng = random.Random(2)
    cost = collections.Counter()
    n = 0
    clock = time.perf_counter  # per part (cheaper to read than process time)
    start = time.process_time()
    while time.process_time() - start < seconds:
        t = clock()
        w = w0.clone()
        cost["clone"] += clock() - t
        a = None
        swarm: dict[str, bool] = {}
        for _ in range(60):
            t = clock()
            acts = w.enabled_actions()
            if not acts:  # every task has exited (arm64: killed by the kernel)
                break
            a = _pick(rng, acts, a, swarm)
            cost["enabled"] += clock() - t
            t = clock()
            try:
                w.step(a, check=False)
            except StepError:
                if w.rollback_on_illegal:
                    continue
                break
            cost["model"] += clock() - t
            t = clock()
            w.state_hash()
            cost["key"] += clock() - t
            t = clock()
            bad = w.checked()
            cost["invariants"] += clock() - t
            n += 1
            if bad:
                raise SystemExit(f"the kernel's design violated {bad[0]} after {w.history}")
        del w
        settle()  # between walks, as random_slice does
    return {f"us_{k}": v / n * 1e6 for k, v in cost.items()}


def time_to_find(variant: str, budget: float, seed: int = 0) -> tuple[float, str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "fpstate.cli", "explore", "--variant", variant, "--json",
             "--seconds", str(budget), "--seed", str(seed),
             "--out", os.path.join(tmp, "cx.yaml")],
            capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return wall, f"error: {proc.stderr.strip()[-200:]}", 0
    if not data["violations"]:
        return wall, "not found", 0
    v = data["violations"][0]
    return wall, v["invariant"], v["steps"]


#: N explorer walks (`_walk`, as random_slice takes them) from a fixed seed, in a new process.
_WALKS = """
import random, sys
from fpstate.check.explore import Job, Slice, _walk, default_config
from fpstate.check.memo import own_process, settle
own_process()
job = Job(sys.argv[1], default_config(sys.argv[1], sys.argv[2]))
initial = job.initial()
rng = random.Random(7)
out = Slice()
for _ in range(int(sys.argv[3])):
    _walk(initial, rng, 60, out)
    settle()
print(out.transitions, len(out.keys))
"""


def instructions(model: str, cpu: str, walks: int) -> tuple[float, int, int] | str:
    """(thousands of instructions per transition, transitions, states) of ``walks`` fixed
    explorer walks under callgrind (less the same process with no walk), or why not."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return "valgrind is not installed (apt-get install valgrind)"
    counts = []
    for n in (walks, 0):
        proc = subprocess.run([valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null",
                               sys.executable, "-c", _WALKS, model, cpu, str(n)],
                              capture_output=True, text=True, check=False)
        got = re.search(r"Collected : ([\d,]+)", proc.stderr)
        if proc.returncode or got is None:
            return f"the walks failed under callgrind: {proc.stderr.strip().splitlines()[-1:]}"
        counts.append((int(got.group(1).replace(",", "")), proc.stdout.split()))
    (ia, (trans, states)), (ib, _) = counts
    return (ia - ib) / int(trans) / 1000, int(trans), int(states)


def explore_rate(model: str, seconds: float) -> dict[str, Any]:
    """``fpstate explore --model MODEL --seconds S --json`` as a new process: what it did."""
    proc = subprocess.run([sys.executable, "-m", "fpstate.cli", "explore", "--model", model,
                           "--seconds", str(seconds), "--json"],
                          capture_output=True, text=True, check=False)
    return json.loads(proc.stdout)


def main() -> int:
    own_process()  # as the fpstate command does (fpstate.check.memo.settle)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="CPU seconds per model (10)")
    ap.add_argument("--budget", type=float, default=60.0, help="explorer limit per variant")
    ap.add_argument("--skip-variants", action="store_true")
    ap.add_argument("--explore", type=float, default=0.0, metavar="S",
                    help="also run fpstate explore for S seconds per model on every core")
    ap.add_argument("--instructions", type=int, default=0, metavar="N",
                    help="also count the instructions of N fixed explorer walks per model "
                         "(callgrind; about a minute for 300)")
    ap.add_argument("--runs", type=int, default=1,
                    help="cold starts per variant with seeds 0..N-1 (the search is random: "
                         "report the median and the worst)")
    args = ap.parse_args()
    print(f"transitions per second, one core, every invariant on ({args.seconds:.0f} CPU s "
          "each; microseconds per transition by part)")
    print(f"{'model':6} {'cpu':16} {'trans/s':>8} {'states':>7} {'model':>7} {'invar.':>7} "
          f"{'key':>6} {'enabled':>8} {'clone':>6}")
    for model, cpu in MODELS:
        try:
            # A fresh process per model (forked before any walk), as fpstate explore is.
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
                r = pool.submit(throughput, model, cpu, args.seconds).result()
        except FpstateError as e:  # a profile this host cannot load
            print(f"{model:6} {cpu:16} skipped: {e}")
            continue
        print(f"{model:6} {cpu:16} {r['per_second']:8.0f} {r['states']:7} {r['us_model']:7.0f} "
              f"{r['us_invariants']:7.0f} {r['us_key']:6.0f} {r['us_enabled']:8.0f} "
              f"{r['us_clone']:6.0f}")
    if args.instructions:
        print(f"\ninstructions per transition, {args.instructions} explorer walks from a fixed "
              "seed under callgrind (thousands; the same walks on every run)")
        print(f"{'model':6} {'cpu':16} {'kinstr':>7} {'transitions':>11} {'states':>7}")
        for model, cpu in MODELS:
            got = instructions(model, cpu, args.instructions)
            if isinstance(got, str):
                print(f"{model:6} {cpu:16} skipped: {got}")
                continue
            print(f"{model:6} {cpu:16} {got[0]:7.1f} {got[1]:11} {got[2]:7}")
    if args.explore:
        print(f"\nfpstate explore under the kernel's design, {args.explore:.0f} s on "
              f"{os.cpu_count()} cores (a new process; wall clock)")
        print(f"{'model':6} {'transitions':>11} {'states':>8} {'per core per s':>15} "
              f"{'violations':>10}")
        for model in ("x86", "arm64"):
            r = explore_rate(model, args.explore)
            print(f"{model:6} {r['transitions']:11} {r['states']:8} "
                  f"{r['transitions'] / r['seconds'] / (os.cpu_count() or 1):15.0f} "
                  f"{len(r['violations']):10}")
    if args.skip_variants:
        return 0
    print(f"\ntime to find each seed variant from a cold start ({os.cpu_count()} cores; "
          "fpstate explore as a new process, shrinking included)")
    print(f"{'variant':28} {'seconds':>8} {'worst':>6}  {'invariant':32} {'steps':>5}")
    for v in SEED_VARIANTS:
        runs = sorted(time_to_find(v, args.budget, seed) for seed in range(args.runs))
        wall, inv, steps = runs[len(runs) // 2]
        print(f"{v:28} {wall:8.1f} {runs[-1][0]:6.1f}  {inv:32} {steps:5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
