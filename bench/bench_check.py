"""Checker benchmarks: transitions per second with every invariant on, and the time to find
each seed variant from a cold start.

    python3 bench/bench_check.py [--seconds S] [--budget S] [--skip-variants] [--runs N]

Part 1 runs random walks in this process (one core) on the default configuration of each model
under the kernel's design, every invariant checked and every state keyed after every step,
and reports transitions per CPU second (process time, so other load on the machine does not
count) with where the time goes. Part 2 starts ``fpstate explore --variant NAME`` as a fresh
process for each seed variant (every core) and reports the wall time until it exits with the
counterexample written, interpreter start-up and imports included (with ``--runs N``: N
cold starts with seeds 0..N-1, the median and the worst).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from fpstate.check.explore import Job, default_config
from fpstate.check.variants import SEED_VARIANTS
from fpstate.check.world import StepError
from fpstate.errors import FpstateError

MODELS = (("x86", "sapphire-rapids"), ("x86", "host"), ("arm64", "fvp-aem-fpmr"))


def throughput(model: str, cpu: str, seconds: float) -> dict[str, float]:
    """Random walks of 30 steps for ``seconds`` of CPU time; per-part CPU costs."""
    job = Job(model, default_config(model, cpu))
    w0 = job.world()
    rng = random.Random(1)
    parts = collections.Counter()
    n = 0
    clock = time.process_time
    start = clock()
    while clock() - start < seconds:
        t = clock()
        w = w0.clone()
        parts["clone"] += clock() - t
        for _ in range(30):
            t = clock()
            acts = w.enabled()
            by = collections.defaultdict(list)
            for a in acts:
                by[a.name].append(a)
            a = rng.choice(by[rng.choice(sorted(by))])
            parts["enabled"] += clock() - t
            t = clock()
            try:
                w.step(a, check=False)
            except StepError:
                break
            parts["model"] += clock() - t
            t = clock()
            bad = w.check()
            parts["invariants"] += clock() - t
            t = clock()
            hash(w.key())
            parts["key"] += clock() - t
            n += 1
            if bad:
                raise SystemExit(f"{model}/{cpu}: the kernel's design violated {bad[0]} after "
                                 f"{w.history}")
    total = clock() - start
    out = {"transitions": n, "cpu_seconds": total, "per_second": n / total}
    out.update({f"us_{k}": v / n * 1e6 for k, v in parts.items()})
    return out


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="CPU seconds per model (10)")
    ap.add_argument("--budget", type=float, default=60.0, help="explorer limit per variant")
    ap.add_argument("--skip-variants", action="store_true")
    ap.add_argument("--runs", type=int, default=1,
                    help="cold starts per variant with seeds 0..N-1 (the search is random: "
                         "report the median and the worst)")
    args = ap.parse_args()
    print(f"transitions per second, one core, every invariant on ({args.seconds:.0f} CPU s "
          "each; microseconds per transition by part)")
    print(f"{'model':6} {'cpu':16} {'trans/s':>8} {'model':>7} {'invar.':>7} {'key':>6} "
          f"{'enabled':>8} {'clone':>6}")
    for model, cpu in MODELS:
        try:
            r = throughput(model, cpu, args.seconds)
        except FpstateError as e:  # a profile this host cannot load
            print(f"{model:6} {cpu:16} skipped: {e}")
            continue
        print(f"{model:6} {cpu:16} {r['per_second']:8.0f} {r['us_model']:7.0f} "
              f"{r['us_invariants']:7.0f} {r['us_key']:6.0f} {r['us_enabled']:8.0f} "
              f"{r['us_clone']:6.0f}")
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
