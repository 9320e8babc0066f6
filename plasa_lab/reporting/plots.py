"""Render as images: each program's effect per iteration, the MAP-Elites grid, the effect against
density, and the whole population's lineage (matplotlib, Agg: no display needed).

The effect is what compares like with like: the change of val_ppl against the initial program,
paired on the seeds both were trained on, in a run that records val_loss per seed; else val_loss,
which is never capped (val_ppl stops at 10000, where every smoke-profile program sits)."""

import io
import math
from pathlib import Path

from ..util import atomic_write
from .analyse import (
    best_and_median,
    effect,
    evaluated_programs,
    history,
    is_initial,
    lineage_layout,
    map_elites_grid,
    pairs_by_seed,
    pareto_front,
)
from .load import RunView
from .text import effect_label


def write_plots(view: RunView, out_dir: Path) -> dict[str, Path]:
    """The four PNGs in out_dir: {title: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    by_seed = pairs_by_seed(view)
    label = effect_label(by_seed)
    written = {}
    for name, title, draw in (
        ("effect_per_iteration.png", f"{label} per iteration", _per_iteration),
        ("map_elites_grid.png", f"MAP-Elites grid: OpenEvolve's cells, coloured by {label}", _map_elites_grid),
        ("effect_vs_density.png", f"{label} against density, Pareto front marked", _vs_density),
        ("lineage.png", f"lineage of the whole population, coloured by {label}", _lineage),
    ):
        fig = draw(view, plt, by_seed)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        written[title] = atomic_write(out_dir / name, png.getvalue())
    return written


def _per_iteration(view: RunView, plt, by_seed: bool):
    from matplotlib.ticker import MaxNLocator

    points, label = history(view, by_seed), effect_label(by_seed, short=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    measured = [p for p in points if p.value is not None]
    for one, style in ((True, dict(facecolors="none", edgecolors="0.4")), (False, dict(color="0.4"))):
        shown = [(p.iteration, p.value) for p in measured if (p.seeds == 1) == one]
        if shown:
            ax.scatter(*zip(*shown), s=16, label="each program, 1 seed" if one else "each program, 2+ seeds", **style)
    failed = [p.iteration for p in points if not p.passed]
    if failed:
        top = max((p.value for p in measured), default=0.0)
        ax.scatter(failed, [top] * len(failed), marker="x", color="tab:red", label="failed (drawn at the top)")
    curve = best_and_median(points)
    if curve:
        its, best, median = zip(*curve)
        ax.step(its, best, where="post", color="tab:blue", label="lowest so far")
        ax.plot(its, median, color="tab:orange", label="median so far")
    if by_seed:
        ax.axhline(0.0, color="0.7", linewidth=0.8, linestyle="--", label="the initial program")
    ax.set(xlabel="iteration", ylabel=label, title=f"{view.name}: {effect_label(by_seed)}, per iteration")
    ax.title.set_fontsize(9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return fig


def _map_elites_grid(view: RunView, plt, by_seed: bool):
    """Each cell OpenEvolve filled (any island), labelled with its best program's effect and id."""
    grid, label = map_elites_grid(view), effect_label(by_seed, short=True)
    (x_dim, y_dim), (x_bins, y_bins) = grid.dims, grid.bins
    values = [[math.nan] * x_bins for _ in range(y_bins)]
    for x, y in grid.cells:
        value = effect(view, grid.best((x, y)).metrics, by_seed)
        values[y][x] = math.nan if value is None else value
    fig, ax = plt.subplots(figsize=(7, 4.5))
    image = ax.imshow(values, origin="lower", aspect="auto", cmap="viridis_r", extent=(0, x_bins, 0, y_bins))
    if any(not math.isnan(v) for row in values for v in row):
        fig.colorbar(image, ax=ax, label=f"the cell's best: {label}")
    for (x, y), members in grid.cells.items():
        best = members[0]
        value = effect(view, best.metrics, by_seed)
        text = (
            "failed" if not best.passed else "-" if value is None else f"{value:+.2f}%" if by_seed else f"{value:.3f}"
        )
        text += f"\n{best.short_id}" + (f" +{len(members) - 1}" if len(members) > 1 else "")
        ax.text(
            x + 0.5,
            y + 0.5,
            text,
            ha="center",
            va="center",
            fontsize=5.5,
            color="white",
            bbox=dict(facecolor="black" if best.passed else "tab:red", alpha=0.5, linewidth=0, pad=1),
        )

    def axis_label(dim):
        span = grid.ranges.get(dim)
        if span is None:
            return f"{dim} bin"
        kind = ",.0f" if max(abs(span[0]), abs(span[1])) >= 100 else ".3f"
        return f"{dim} bin ({span[0]:{kind}} .. {span[1]:{kind}} at {view.checkpoint.name})"

    dropped = f"; {grid.dropped} entries not in the population left out" if grid.dropped else ""
    ax.set(
        xlabel=axis_label(x_dim),
        ylabel=axis_label(y_dim),
        title=f"MAP-Elites grid ({len(grid.cells)} of {x_bins * y_bins} cells filled, all islands{dropped})",
    )
    ax.set_xticks(range(x_bins + 1))
    ax.set_yticks(range(y_bins + 1))
    ax.grid(color="0.85", linewidth=0.5)
    return fig


def _vs_density(view: RunView, plt, by_seed: bool):
    fig, ax = plt.subplots(figsize=(7, 4))
    label = effect_label(by_seed, short=True)
    xy = [(p.metrics["density"], effect(view, p.metrics, by_seed)) for p in evaluated_programs(view)]
    xy = [(x, y) for x, y in xy if y is not None]
    if xy:
        ax.scatter(*zip(*xy), s=16, color="0.5", label="programs")
        ax.plot(
            *zip(*pareto_front(xy)),
            "o-",
            drawstyle="steps-post",
            color="tab:red",
            label="Pareto front (lower on both axes is better)",
        )
    title = f"{effect_label(by_seed)} against density"
    ax.set(xlabel="density (fraction of causal keys attended)", ylabel=label, title=title)
    ax.title.set_fontsize(9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def _lineage(view: RunView, plt, by_seed: bool):
    """Every known program at (iteration, its row in a depth-first walk), an elbow from each parent
    down its own iteration and across to each child; coloured by the effect, failures as red
    crosses, the best's chain drawn thick."""
    layout, label = lineage_layout(view), effect_label(by_seed, short=True)
    fig, ax = plt.subplots(figsize=(9, max(3.5, min(16.0, 0.12 * len(layout) + 2))))
    chain = {p.id for p in view.chain}
    for pid, (x, y) in layout.items():
        parent = view.known[pid].parent_id
        if parent in layout:
            on_chain = pid in chain and parent in chain
            px, py = layout[parent]
            style = dict(color="tab:red", linewidth=2.5) if on_chain else dict(color="0.75", linewidth=0.8)
            ax.plot([px, px, x], [py, y, y], **style)
    programs = [view.known[pid] for pid in layout]
    valued = [(p, effect(view, p.metrics, by_seed)) for p in programs]
    shown = [(layout[p.id], v) for p, v in valued if v is not None]
    if shown:
        (xs, ys), values = zip(*(pos for pos, _ in shown)), [v for _, v in shown]
        dots = ax.scatter(xs, ys, c=values, cmap="viridis_r", s=30, edgecolors="black", linewidths=0.3, zorder=3)
        fig.colorbar(dots, ax=ax, label=label)
    failed = [layout[p.id] for p in programs if not p.passed]
    if failed:
        ax.scatter(*zip(*failed), marker="x", color="tab:red", s=30, zorder=3, label="failed")
    unmeasured = [layout[p.id] for p, v in valued if v is None and p.passed]
    if unmeasured:
        ax.scatter(*zip(*unmeasured), color="0.6", s=20, zorder=3, label="no seed shared with the initial program")
    names = {view.best.id: f"best {view.best.short_id}"}
    if view.initial is not None and not is_initial(view, view.best):
        names[view.initial.id] = f"initial {view.initial.short_id}"
    for pid, name in names.items():
        if pid in layout:
            ax.annotate(name, layout[pid], xytext=(6, 4), textcoords="offset points", fontsize=7)
    ax.set(
        xlabel="iteration",
        ylabel="programs, depth-first by lineage",
        title=f"{view.name}: the population's lineage, parent -> child, the best's chain in red",
    )
    ax.set_yticks([])
    ax.invert_yaxis()
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    return fig
