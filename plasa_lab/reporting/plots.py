"""Render as images: val_ppl per iteration, the MAP-Elites grid, val_ppl against density
(matplotlib, Agg: no display needed)."""

import io
import math
from pathlib import Path

from ..util import atomic_write
from .analyse import best_and_median, evaluated_programs, history, map_elites_grid, pareto_front
from .load import RunView


def write_plots(view: RunView, out_dir: Path) -> dict[str, Path]:
    """The three PNGs in out_dir: {title: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, title, draw in (
        ("ppl_per_iteration.png", "best and median val_ppl per iteration", _ppl_per_iteration),
        ("map_elites_grid.png", "MAP-Elites grid: OpenEvolve's cells, coloured by val_ppl", _map_elites_grid),
        ("ppl_vs_density.png", "val_ppl against density, Pareto front marked", _ppl_vs_density),
    ):
        fig = draw(view, plt)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        written[title] = atomic_write(out_dir / name, png.getvalue())
    return written


def _ppl_per_iteration(view: RunView, plt):
    from matplotlib.ticker import MaxNLocator

    points = history(view)
    fig, ax = plt.subplots(figsize=(7, 4))
    passed = [(i, p) for i, p in points if p is not None]
    if passed:
        ax.scatter(*zip(*passed), s=14, color="0.6", label="each program")
    failed = [i for i, p in points if p is None]
    if failed:
        top = max((p for _, p in passed), default=1.0)
        ax.scatter(failed, [top] * len(failed), marker="x", color="tab:red", label="failed (no ppl)")
    curve = best_and_median(points)
    if curve:
        its, best, median = zip(*curve)
        ax.step(its, best, where="post", color="tab:blue", label="best so far")
        ax.plot(its, median, color="tab:orange", label="median so far")
    ax.set(xlabel="iteration", ylabel="val_ppl", title=f"{view.name}: val_ppl per iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if passed:
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def _map_elites_grid(view: RunView, plt):
    """Each cell OpenEvolve filled (any island), labelled with its best program: val_ppl and id."""
    from matplotlib.colors import LogNorm

    grid = map_elites_grid(view)
    (x_dim, y_dim), (x_bins, y_bins) = grid.dims, grid.bins
    values = [[math.nan] * x_bins for _ in range(y_bins)]
    for x, y in grid.cells:
        best = grid.best((x, y))
        values[y][x] = best.val_ppl if best.passed else math.nan
    filled = [v for row in values for v in row if not math.isnan(v)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    norm = LogNorm(min(filled), max(filled) * 1.0001) if filled else None
    image = ax.imshow(values, origin="lower", aspect="auto", cmap="viridis_r", norm=norm, extent=(0, x_bins, 0, y_bins))
    if filled:
        fig.colorbar(image, ax=ax, label="val_ppl of the cell's best")
    for (x, y), members in grid.cells.items():
        best = members[0]
        label = f"{best.val_ppl:.0f}" if best.passed else "failed"
        label += f"\n{best.short_id}" + (f" +{len(members) - 1}" if len(members) > 1 else "")
        ax.text(
            x + 0.5,
            y + 0.5,
            label,
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


def _ppl_vs_density(view: RunView, plt):
    fig, ax = plt.subplots(figsize=(7, 4))
    xy = [(p.metrics["density"], p.val_ppl) for p in evaluated_programs(view)]
    if xy:
        ax.scatter(*zip(*xy), s=16, color="0.5", label="programs")
        front = pareto_front(xy)
        ax.plot(
            *zip(*front),
            "o-",
            drawstyle="steps-post",
            color="tab:red",
            label="Pareto front (lower ppl and lower density are better)",
        )
        ax.set_yscale("log")
    ax.set(xlabel="density (fraction of causal keys attended)", ylabel="val_ppl", title="val_ppl against density")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig
