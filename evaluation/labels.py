"""Point labels that do not overlap, for the report's and the study's scatter plots."""
from __future__ import annotations

from typing import Sequence

OFFSET_PT = (5.0, 3.0)  # label corner relative to its point, in points
STYLE = {"fontsize": 7, "zorder": 5,  # above markers and lines; the white box hides lines under it
         "bbox": {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85}}


def _shifts(limit: int = 40):
    """0, -1, +1, -2, +2, ...: label heights to move a label by, nearest first."""
    yield 0
    for k in range(1, limit):
        yield -k
        yield k


def place_labels(ax, points: Sequence[tuple[float, float]], labels: Sequence[str]) -> None:
    """Annotate each point with its label, moving a label up or down by whole label heights
    until its box overlaps no label placed before it (points taken top to bottom); a moved
    label gets a thin leader line to its point. Call after the axes' limits and the figure's
    layout are final (positions are measured on the drawn figure)."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    right_edge = ax.get_window_extent(renderer).x1
    placed = []
    order = sorted(range(len(points)), key=lambda i: -ax.transData.transform(points[i])[1])
    for i in order:
        dx, align = OFFSET_PT[0], "left"
        probe = ax.annotate(labels[i], points[i], xytext=OFFSET_PT, textcoords="offset points", **STYLE)
        box = probe.get_window_extent(renderer)
        probe.remove()
        if box.x1 > right_edge:  # it would leave the axes: put it left of its point
            dx, align = -dx, "right"
            box = box.translated(-box.width - 2 * OFFSET_PT[0] * px_per_pt, 0)
        for k in _shifts():
            moved = box.translated(0, k * box.height)
            if not any(moved.overlaps(other) for other in placed):
                break
        placed.append(moved)
        leader = {"arrowstyle": "-", "color": "0.5", "linewidth": 0.5} if k else None
        ax.annotate(labels[i], points[i], xytext=(dx, OFFSET_PT[1] + k * box.height / px_per_pt),
                    textcoords="offset points", ha=align, arrowprops=leader, **STYLE)
