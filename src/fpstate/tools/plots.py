"""Plots of the cost model (`fpstate.tools.cost`): PNG and SVG, matplotlib's Agg backend.

Two figures per run, one panel per workload mix:

- ``cost-memory``: FPU-state memory per thread (bytes) for each allocation and CET-supervisor
  policy;
- ``cost-switch``: bytes moved per context switch for each optimisation setting (XSAVE,
  XSAVEC, modified only, XSAVES), one bar per allocation and CET policy.
"""

from __future__ import annotations

from pathlib import Path

from fpstate.errors import FpstateError
from fpstate.tools.cost import ALLOCATIONS, CET_POLICIES, OPTIMISATIONS, CostRow

_COLOURS = ("#4878a8", "#98c0e0", "#c05048", "#f0a890")


def _mixes(rows: list[CostRow]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r.mix not in seen:
            seen.append(r.mix)
    return seen


def plot_costs(rows: list[CostRow], outdir: str | Path, cpu: str) -> list[Path]:
    """Write cost-memory.{png,svg} and cost-switch.{png,svg} into ``outdir``; the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(outdir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FpstateError(f"cannot create {out}: {e.strerror or e}") from None
    mixes = _mixes(rows)
    combos = [(a, c) for a in ALLOCATIONS for c in CET_POLICIES]
    written: list[Path] = []

    fig, axes = plt.subplots(1, len(mixes), figsize=(3.2 * len(mixes), 3.6), squeeze=False)
    for ax, mix in zip(axes[0], mixes, strict=True):
        values = []
        for a, c in combos:
            r = next(r for r in rows if r.mix == mix and r.policy.allocation == a
                     and r.policy.cet == c)
            values.append(r.memory_per_thread)
        ax.bar(range(len(combos)), values, color=_COLOURS)
        ax.set_xticks(range(len(combos)), [f"{a}\nCET_S {c}" for a, c in combos],
                      fontsize=6, rotation=30)
        ax.set_title(mix, fontsize=8)
        ax.set_ylabel("bytes per thread", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"FPU state memory per thread on {cpu}", fontsize=9)
    fig.tight_layout()
    written += _save(fig, out / "cost-memory")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(mixes), figsize=(3.2 * len(mixes), 3.6), squeeze=False)
    width = 0.8 / len(combos)
    for ax, mix in zip(axes[0], mixes, strict=True):
        for k, (a, c) in enumerate(combos):
            values = [next(r.bytes_per_switch for r in rows if r.mix == mix
                           and (r.policy.allocation, r.policy.cet) == (a, c)
                           and (r.policy.init_opt, r.policy.modified_opt) == (i, m))
                      for i, m, _ in OPTIMISATIONS]
            ax.bar([x + k * width for x in range(len(OPTIMISATIONS))], values, width,
                   color=_COLOURS[k], label=f"{a}, CET_S {c}")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(OPTIMISATIONS))],
                      [n for _, _, n in OPTIMISATIONS], fontsize=6, rotation=30)
        ax.set_title(mix, fontsize=8)
        ax.set_ylabel("bytes per context switch", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"XSAVE/XRSTOR bytes per context switch on {cpu}", fontsize=9)
    fig.tight_layout()
    written += _save(fig, out / "cost-switch")
    plt.close(fig)
    return written


def _save(fig: object, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=120)  # type: ignore[attr-defined]
    return paths
