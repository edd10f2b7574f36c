"""Perplexity against evaluation length, one curve per checkpoint or per run (matplotlib, no
display needed: figures are drawn by the Agg canvas)."""

from __future__ import annotations

from dataclasses import dataclass

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator


@dataclass(frozen=True)
class Curve:
    label: str
    ppl: dict[int, float]  # length -> perplexity over all positions
    ppl_beyond: dict[int, float]  # length -> perplexity beyond the trained length


def curve_of(results: dict, label: str) -> Curve:
    """The curve of one evaluation JSON (launch.evaluate)."""
    return Curve(
        label,
        {int(n): v for n, v in results["ppl"].items()},
        {int(n): v for n, v in results["ppl_beyond"].items()},
    )


def ppl_vs_length(
    curves: list[Curve], train_length: int | None, title: str, *, ordered: bool = True
) -> Figure:
    """Two panels, perplexity over all positions and over the positions beyond the trained
    length, against the length (log2 axis); a dashed line marks the trained length. Ordered
    curves (checkpoints) get a colour gradient, unordered ones (runs) distinct colour, marker
    and line style pairs. One legend, beside the panels, so that no curve hides under it."""
    fig = Figure(figsize=(12.5, 4.6), layout="constrained")
    panels = fig.subplots(1, 2)
    gradient = colormaps["viridis"]
    lengths = sorted({n for c in curves for n in (*c.ppl, *c.ppl_beyond)})
    for ax, key, what in (
        (panels[0], "ppl", "all positions"),
        (panels[1], "ppl_beyond", "positions beyond the trained length"),
    ):
        for i, curve in enumerate(curves):
            points = sorted(getattr(curve, key).items())
            if points:
                xs, ys = zip(*points, strict=True)
                color, marker, line = f"C{i % 10}", "osD^v<>pPX*h"[i % 12], "-:"[i // 10 % 2]
                if ordered:
                    color = gradient(0.85 * i / max(len(curves) - 1, 1))  # the last not yellow
                    marker, line = "o", "-"
                ax.plot(xs, ys, marker=marker, linestyle=line, color=color, label=curve.label)
        if train_length is not None:
            ax.axvline(
                train_length, color="grey", linestyle="--", linewidth=1, label="trained length"
            )
        ax.set_xscale("log", base=2)
        if lengths:
            ax.xaxis.set_major_locator(FixedLocator(lengths))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(n) for n in lengths], rotation=45)
        ax.set_yscale("log")
        plain = FuncFormatter(lambda y, _: f"{y:.4g}")
        low, high = ax.get_ylim()
        ax.yaxis.set_major_formatter(plain)  # label minor ticks too within one decade
        ax.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title(what)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*panels[0].get_legend_handles_labels(), loc="outside right center")
    fig.suptitle(title)
    return fig
