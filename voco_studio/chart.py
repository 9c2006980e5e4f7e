"""The loss chart as SVG markup, from a curves table (``TrainingCurves.loss_table``).

One ``<path data-testid="loss-series" data-series=NAME data-points=N>`` per loss column,
log-free linear axes, NaN rows skipped. Pure string building: no browser library needed.
"""

from __future__ import annotations

import math
from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def table_columns(table_node) -> dict[str, list[float]]:
    """``{column name: values}`` of a vtkMRMLTableNode."""
    table = table_node.GetTable()
    columns = {}
    for c in range(table.GetNumberOfColumns()):
        array = table.GetColumn(c)
        columns[table.GetColumnName(c)] = [float(array.GetTuple1(r)) for r in range(table.GetNumberOfRows())]
    return columns


def loss_chart_svg(columns: dict[str, list[float]], width: int = 320, height: int = 180) -> str:
    steps = columns.get("step", [])
    series = {name: values for name, values in columns.items() if name != "step"}
    points = {name: [(s, v) for s, v in zip(steps, values) if math.isfinite(v) and math.isfinite(s)]
              for name, values in series.items()}
    every = [p for pts in points.values() for p in pts]
    pad = 30
    parts = [f'<svg id="loss-chart" data-testid="loss-chart" xmlns="http://www.w3.org/2000/svg" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'style="background:#fff;font:10px sans-serif">']
    if every:
        x0, x1 = min(p[0] for p in every), max(p[0] for p in every)
        y0, y1 = min(p[1] for p in every), max(p[1] for p in every)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

        def xy(s, v):
            return (pad + (s - x0) / (x1 - x0) * (width - pad - 8),
                    height - pad + 8 - (v - y0) / (y1 - y0) * (height - pad - 8))

        parts.append(f'<line x1="{pad}" y1="{height - pad + 8}" x2="{width - 8}" y2="{height - pad + 8}" stroke="#888"/>')
        parts.append(f'<line x1="{pad}" y1="8" x2="{pad}" y2="{height - pad + 8}" stroke="#888"/>')
        parts.append(f'<text x="{pad}" y="{height - 8}">{x0:g}</text>'
                     f'<text x="{width - 40}" y="{height - 8}">step {x1:g}</text>'
                     f'<text x="2" y="14">{y1:.3g}</text><text x="2" y="{height - pad + 8}">{y0:.3g}</text>')
    for i, (name, pts) in enumerate(points.items()):
        color = COLORS[i % len(COLORS)]
        d = " ".join(f"{'M' if k == 0 else 'L'}{x:.1f},{y:.1f}" for k, (x, y) in enumerate(xy(*p) for p in pts)) \
            if every else ""
        parts.append(f'<path data-testid="loss-series" data-series="{escape(name)}" data-points="{len(pts)}" '
                     f'd="{d}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        parts.append(f'<text x="{width - 90}" y="{14 + 12 * i}" fill="{color}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
