"""The counterexample picture: a timeline of where each context's state lives, step by step.

One lane per CPU (whose state its registers hold, and what runs there) and one lane per
context (a task, a vCPU): its state in the registers of CPU n only (solid, the CPU's colour),
in memory with a valid copy in CPU n's registers (hatched), or in memory only (grey). Each
cell names who wrote the values it holds (registers) or would see (context); where a valid
register copy and the memory image disagree, both are shown in red; the step that broke
an invariant is marked in red with the invariant's name. Drawn with matplotlib's Agg backend
(no display needed), as PNG or SVG by the file's extension.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fpstate.check.world import WHERE_BOTH, WHERE_GONE, WHERE_MEMORY, WHERE_REGS, Frame
from fpstate.errors import FpstateError

CPU_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")
MEMORY_COLOUR = "#c7c7c7"
VIOLATION_COLOUR = "#d62728"


def plot_paths(target: str) -> list[Path]:
    """The files ``--plot target`` writes: the one named (.png or .svg), or both alongside
    when it ends in neither."""
    p = Path(target)
    if p.suffix.lower() in (".png", ".svg"):
        return [p]
    return [p.with_name(p.name + ".png"), p.with_name(p.name + ".svg")]


def _short(writers: Sequence[tuple[str, str]]) -> str:
    by: dict[str, list[str]] = {}
    for comp, who in writers:
        by.setdefault(who, []).append(comp)
    return "\n".join(f"{'/'.join(c)}:{w}" for w, c in sorted(by.items()))


def _involved(frames: Sequence[Frame], name: str) -> bool:
    """Whether a context takes part: named by an action, or its state moves or changes."""
    if any(name in f.action for f in frames):
        return True
    views = {(c.where, c.cpu, c.writers) for f in frames for c in f.contexts if c.name == name}
    return len(views) > 1 or any(w[2] for w in views)


def draw(frames: Sequence[Frame], target: str, title: str) -> list[Path]:
    """Draw ``frames`` (step 0 = the configuration) and write the picture(s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    if not frames:
        raise FpstateError("nothing to plot: no steps")
    ncpu = len(frames[0].cpus)
    names: list[str] = []
    for f in frames:
        for c in f.contexts:
            if c.where != WHERE_GONE and c.name not in names and _involved(frames, c.name):
                names.append(c.name)
    lanes = [f"CPU {n}" for n in range(ncpu)] + names
    nsteps = len(frames)
    width = max(9.0, 1.35 * nsteps + 2.5)
    height = 0.75 * len(lanes) + 3.0
    fig, ax = plt.subplots(figsize=(width, height))
    y_of = {lane: len(lanes) - 1 - i for i, lane in enumerate(lanes)}

    def colour(cpu: int | None) -> str:
        return CPU_COLOURS[(cpu or 0) % len(CPU_COLOURS)]

    for x, f in enumerate(frames):
        for c in f.cpus:
            y = y_of[f"CPU {c.nr}"]
            held = c.holds or "-"
            ax.add_patch(Rectangle((x, y + 0.05), 0.96, 0.9, facecolor=colour(c.nr), alpha=0.25,
                                   edgecolor="white"))
            label = f"runs {c.running}\nholds {held}"
            if c.writers:
                label += "\n" + _short(c.writers)
            ax.text(x + 0.48, y + 0.5, label, ha="center", va="center", fontsize=6.0)
        for c in f.contexts:
            if c.name not in y_of or c.where == WHERE_GONE:
                continue
            y = y_of[c.name]
            if c.where == WHERE_REGS:
                patch = Rectangle((x, y + 0.1), 0.96, 0.8, facecolor=colour(c.cpu), alpha=0.85,
                                  edgecolor="white")
            elif c.where == WHERE_BOTH:
                patch = Rectangle((x, y + 0.1), 0.96, 0.8, facecolor=MEMORY_COLOUR,
                                  edgecolor=colour(c.cpu), hatch="///", linewidth=0)
            else:
                patch = Rectangle((x, y + 0.1), 0.96, 0.8, facecolor=MEMORY_COLOUR,
                                  edgecolor="white")
            ax.add_patch(patch)
            if c.image:
                ax.text(x + 0.48, y + 0.5, f"regs: {_short(c.writers) or 'init'}\n"
                        f"mem: {_short(c.image) or 'init'}", ha="center", va="center",
                        fontsize=6.0, color=VIOLATION_COLOUR, fontweight="bold",
                        bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none",
                              "pad": 1.5})
            else:
                text = _short(c.writers) or "init"
                if c.note:
                    text += f"\n{c.note}"
                ax.text(x + 0.48, y + 0.5, text, ha="center",
                        va="center", fontsize=6.0,
                        bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none",
                              "pad": 1.0})
        if f.violation:
            ax.add_patch(Rectangle((x - 0.02, -0.05), 1.0, len(lanes) + 0.1, fill=False,
                                   edgecolor=VIOLATION_COLOUR, linewidth=2.2))
            ax.text(x + 0.48, len(lanes) + 0.15, f"violated:\n{f.violation}", ha="center",
                    va="bottom", fontsize=8, color=VIOLATION_COLOUR, fontweight="bold")
    ax.set_xlim(-0.1, nsteps + 0.1)
    ax.set_ylim(-0.2, len(lanes) + 1.1)
    ax.set_yticks([y_of[lane] + 0.5 for lane in lanes])
    ax.set_yticklabels(lanes, fontsize=8)
    ax.set_xticks([x + 0.48 for x in range(nsteps)])
    ax.set_xticklabels([f"{f.step}: {f.action}" for f in frames], rotation=28, ha="right",
                       fontsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    legend = [Patch(facecolor=colour(n), alpha=0.85, label=f"in CPU {n}'s registers only")
              for n in range(ncpu)]
    legend.append(Patch(facecolor=MEMORY_COLOUR, edgecolor=colour(0), hatch="///",
                        label="memory, with a valid copy in a CPU's registers"))
    legend.append(Patch(facecolor=MEMORY_COLOUR, label="memory only"))
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7,
              frameon=False)
    ax.set_title(title, fontsize=10, loc="left")
    bad = next((f for f in frames if f.violation), None)
    if bad is not None and bad.detail:
        import textwrap

        caption = textwrap.fill(f"step {bad.step}, {bad.violation}: {bad.detail}",
                                width=int(width * 14))
        fig.text(0.01, 0.005, caption, fontsize=7.5, color=VIOLATION_COLOUR, va="bottom")
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    out = plot_paths(target)
    for p in out:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=110)
    plt.close(fig)
    return out


__all__ = ["WHERE_MEMORY", "draw", "plot_paths"]
