"""The campaign report: one JSON per cell, an index, a Markdown summary with plots.

A cell's JSON (``cells/<id>/cell.json``) holds what the cell is (profile, kernel, variant,
configuration, the world's config), how it was explored (mode, bound, seeds, engine), what
was found (states, transitions, refused actions, states per level, transitions per action and
the actions never taken, violations with their counts, shrunk counterexample scenario files
and whether the variant's expected invariant was among them, model errors), and how it went
(seconds, states per second, rounds, messages between partitions, restarts). ``summary.md``
puts the cells side by side: which seed variants were caught where, every violation with its
scenario file, the coverage gaps, and three plots (``plots/``; matplotlib's Agg backend).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fpstate.check import variants as variant_registry

STATUS_DONE = "done"


def cell_summary(report: Mapping[str, Any]) -> str:
    """One line about a finished cell (the CLI prints it)."""
    vio = ", ".join(f"{v['invariant']} x{v['count']}" for v in report["violations"]) or "none"
    caught = report.get("caught")
    mark = "" if caught is None else (" (expected: caught)" if caught else
                                      f" (expected {report['expected']}: NOT found)")
    done = "complete" if report["complete"] else f"stopped by {report['stopped_by']}"
    return (f"{report['cell']['id']}: {report['states']} states, {report['transitions']} "
            f"transitions, {done}, {report['seconds']:.1f}s; violations: {vio}{mark}")


def totals(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Campaign-wide sums over finished cells."""
    return {
        "cells": len(cells),
        "states": sum(c["states"] for c in cells),
        "transitions": sum(c["transitions"] for c in cells),
        "seconds": round(sum(c["seconds"] for c in cells), 3),
        "violations": sum(v["count"] for c in cells for v in c["violations"]),
        "kernel_design_violations": sum(v["count"] for c in cells for v in c["violations"]
                                        if c["cell"]["variant"] is None),
        "errors": sum(e["count"] for c in cells for e in c["errors"]),
        "variants_missed": sorted({c["cell"]["id"] for c in cells if c.get("caught") is False}),
    }


def write_summary(root: Path, campaign_name: str, description: str, engine: str,
                  cells: Sequence[Mapping[str, Any]], total: int) -> Path:
    """``summary.md`` and ``plots/*.png`` from the finished cells."""
    plots = _plots(root, cells)
    t = totals(cells)
    lines = [f"# Campaign {campaign_name}", ""]
    if description:
        lines += [description.strip(), ""]
    lines += [f"Engine: {engine}. Cells finished: {len(cells)} of {total}. States: "
              f"{t['states']:,}; transitions: {t['transitions']:,}; time in cells: "
              f"{t['seconds']:.1f} s. Violations under the kernel's design: "
              f"{t['kernel_design_violations']}; model errors: {t['errors']}.", ""]
    lines += _variant_table(cells)
    lines += ["## Cells", "",
              "| cell | mode | states | transitions | depth | complete | violations | s | "
              "states/s |", "|---|---|---:|---:|---:|---|---|---:|---:|"]
    for c in cells:
        vio = "<br>".join(f"{v['invariant']} x{v['count']}" for v in c["violations"]) or "-"
        depth = c.get("depth", "-")
        done = "yes" if c["complete"] else f"no ({c['stopped_by']})"
        lines.append(f"| `{c['cell']['id']}` | {c['mode']} | {c['states']:,} | "
                     f"{c['transitions']:,} | {depth} | {done} | {vio} | {c['seconds']:.1f} | "
                     f"{c['states_per_second']:,.0f} |")
    lines.append("")
    found = [(c, v) for c in cells for v in c["violations"]]
    if found:
        lines += ["## Violations (shrunk counterexamples; replay with `fpstate run FILE "
                  "--variant NAME`)", ""]
        for c, v in found:
            lines.append(f"- `{c['cell']['id']}`: **{v['invariant']}** in {v['steps']} steps "
                         f"([{v['scenario']}]({v['scenario']})): {v['detail']}")
        lines.append("")
    errors = [(c, e) for c in cells for e in c["errors"]]
    if errors:
        lines += ["## Model errors", ""]
        for c, e in errors:
            lines.append(f"- `{c['cell']['id']}`: {e['error']} x{e['count']} "
                         f"([{e['scenario']}]({e['scenario']}))")
        lines.append("")
    explored = [c for c in cells if c["transitions"]]
    never = Counter(a for c in explored for a in c["not_covered"])
    if never:
        lines += ["## Actions never taken", "",
                  "Actions of the vocabulary (after the configuration's filter) that no "
                  "transition took, with the number of cells (of those with transitions) "
                  "that never took them:", ""]
        lines += [f"- `{a}`: {n} of {len(explored)}" for a, n in sorted(never.items())]
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(root)})" for p in plots] + [""]
    path = root / "summary.md"
    from fpstate.campaign.resume import write_atomic
    write_atomic(path, "\n".join(lines))
    return path


def _variant_table(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Variants x profiles: the expected invariant caught (depth of the shortest witness)."""
    variants = sorted({c["cell"]["variant"] for c in cells if c["cell"]["variant"]})
    if not variants:
        return []
    profiles = list(dict.fromkeys(c["cell"]["profile"] for c in cells))
    lines = ["## Seed variants caught", "",
             "Each rejected design against the invariant it must break: `yes (n)` = found, "
             "with a shrunk counterexample of n steps (`yes (0)`: broken at boot); `no` = not "
             "within the bound; several kernels or configurations: the shortest.", "",
             "| variant (expected invariant) | " + " | ".join(profiles) + " |",
             "|---|" + "---|" * len(profiles)]
    for var in variants:
        expect = variant_registry.BY_NAME[var].expect
        row = []
        for prof in profiles:
            mine = [c for c in cells if c["cell"]["variant"] == var
                    and c["cell"]["profile"] == prof]
            steps = [v["steps"] for c in mine for v in c["violations"]
                     if v["invariant"] == expect]
            row.append("-" if not mine else f"yes ({min(steps)})" if steps else "no")
        lines.append(f"| {var} ({expect}) | " + " | ".join(row) + " |")
    return [*lines, ""]


def _plots(root: Path, cells: Sequence[Mapping[str, Any]]) -> list[Path]:
    if not cells:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = root / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    # 1. states and transitions per cell
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(cells) + 2), 4.5))
    ids = [c["cell"]["id"] for c in cells]
    xs = range(len(cells))
    ax.bar([x - 0.2 for x in xs], [c["states"] for c in cells], 0.4, label="states")
    ax.bar([x + 0.2 for x in xs], [c["transitions"] for c in cells], 0.4, label="transitions")
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(ids, rotation=75, ha="right", fontsize=6)
    ax.set_title("States and transitions per cell")
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out / "states.png"))
    plt.close(fig)

    # 2. new states per BFS level (exhaustive cells), one line per configuration x variant
    ex = [c for c in cells if c.get("levels")]
    if ex:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for c in ex:
            key = f"{c['cell']['configuration']} / {c['cell']['variant'] or 'kernel'}"
            groups.setdefault(key, []).append(c)
        for key, cs in sorted(groups.items())[:12]:
            depth = max(len(c["levels"]) for c in cs)
            mean = [sum(c["levels"][d] for c in cs if d < len(c["levels"])) / len(cs)
                    for d in range(depth)]
            ax.plot(range(depth), mean, marker="o", label=key)
        ax.set_yscale("log")
        ax.set_xticks(range(max(len(c["levels"]) for c in ex)))
        ax.set_xlabel("depth (actions from boot)")
        ax.set_ylabel("new states (mean over profiles and kernels)")
        ax.set_title("Breadth-first frontier")
        ax.legend(fontsize=6)
        fig.tight_layout()
        paths.append(_save(fig, out / "levels.png"))
        plt.close(fig)

    # 3. violations: variant x profile, number of violating transitions of the expected one
    variants = sorted({c["cell"]["variant"] or "(kernel)" for c in cells})
    profiles = list(dict.fromkeys(c["cell"]["profile"] for c in cells))
    grid = [[0.0] * len(profiles) for _ in variants]
    for c in cells:
        r = variants.index(c["cell"]["variant"] or "(kernel)")
        k = profiles.index(c["cell"]["profile"])
        grid[r][k] += sum(v["count"] for v in c["violations"])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(profiles) + 3),
                                    max(2.5, 0.5 * len(variants) + 1.5)))
    from matplotlib.colors import LogNorm

    im = ax.imshow([[x + 1 for x in row] for row in grid], cmap="Reds", aspect="auto",
                   norm=LogNorm(vmin=1, vmax=max(2.0, max(max(r) for r in grid) + 1)))
    ax.set_xticks(range(len(profiles)))
    ax.set_xticklabels(profiles, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(variants)))
    ax.set_yticklabels(variants, fontsize=7)
    top = max(max(row) for row in grid) + 1
    for r, row in enumerate(grid):
        for k, x in enumerate(row):
            ax.text(k, r, f"{int(x)}", ha="center", va="center", fontsize=7,
                    color="white" if x + 1 > top ** 0.6 else "black")
    ax.set_title("Violating transitions (variant x profile)")
    fig.colorbar(im, ax=ax, label="violating transitions + 1 (log)")
    fig.tight_layout()
    paths.append(_save(fig, out / "violations.png"))
    plt.close(fig)
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


__all__ = ["STATUS_DONE", "cell_summary", "totals", "write_summary"]
