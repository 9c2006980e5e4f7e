"""Live training curves: progress events -> table nodes -> one plot chart.

``step`` events fill the loss table (column ``step`` plus one column per loss term that the
engine reports: ``loss``, ``loss_pos``, ``loss_neg``, ``loss_reg``, ``loss_inter`` for
pretraining; whatever ``loss*`` fields fine-tuning sends). ``val_dice`` events fill a second
table (``step``, ``mean`` and one column per label). The chart has one line series per column.
Rows are appended as events arrive; a term that appears later gets earlier rows as NaN.

Example (Slicer's Python console)::

    from VoCoPretrainLib.curves import TrainingCurves
    curves = TrainingCurves("run-1")
    curves.add_events([{"event": "step", "step": 1, "loss": 0.8, "loss_pos": 0.3}])
    slicer.modules.plots.logic().ShowChartInLayout(curves.chart)   # in Slicer only
"""

from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path

import slicer

LOSS_PREFIX = "loss"
VAL_PREFIX = "val_"   # column names of the validation table: val_mean, val_<label>


def _number(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


class TrainingCurves:
    """A loss table, a validation table and a chart with one series per column, for one run."""

    def __init__(self, name: str = "VoCo"):
        scene = slicer.mrmlScene
        self.name = name
        self.loss_table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} losses")
        self.val_table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} validation Dice")
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} curves")
        self.chart.SetTitle(f"{name}")
        self.chart.SetXAxisTitle("step")
        self.chart.SetYAxisTitle("loss / Dice")
        self.series: dict[str, object] = {}     # column name -> vtkMRMLPlotSeriesNode
        for table in (self.loss_table, self.val_table):
            self._add_column(table, "step")

    # --- feeding -------------------------------------------------------------------------------

    def add_events(self, events) -> int:
        """Append the ``step`` and ``val_dice`` events among ``events``; the number of rows added."""
        added = 0
        for event in events:
            kind = event.get("event")
            if kind == "step" and "step" in event:
                values = {k: v for k, v in event.items() if k.startswith(LOSS_PREFIX)}
                added += self._append(self.loss_table, event["step"], values)
            elif kind == "val_dice" and "step" in event:
                values = {"val_mean": event.get("mean")}
                values.update({f"{VAL_PREFIX}{label}": dice for label, dice in (event.get("dice") or {}).items()})
                added += self._append(self.val_table, event["step"], values)
        return added

    def clear(self) -> None:
        for table in (self.loss_table, self.val_table):
            vtable = table.GetTable()
            for column in range(vtable.GetNumberOfColumns()):
                vtable.GetColumn(column).SetNumberOfTuples(0)
            vtable.Modified()
            table.Modified()

    def load_run(self, run_dir) -> int:
        """Rebuild from a run folder: ``events.jsonl`` when it exists, else the engine's ``metrics.jsonl``
        (pretraining records are step events; fine-tuning records carry ``val_mean``/``val_dice``)."""
        run_dir = Path(run_dir)
        self.clear()
        events_file, metrics_file = run_dir / "events.jsonl", run_dir / "metrics.jsonl"
        if events_file.is_file():
            return self.add_events(read_jsonl(events_file))
        events = []
        for record in read_jsonl(metrics_file):
            events.append({"event": "step", **record})
            if "val_mean" in record:
                events.append({"event": "val_dice", "step": record["step"], "mean": record["val_mean"],
                               "dice": record.get("val_dice") or {}})
        return self.add_events(events)

    # --- reading back --------------------------------------------------------------------------

    def columns(self, table=None) -> list[str]:
        vtable = (table or self.loss_table).GetTable()
        return [vtable.GetColumnName(i) for i in range(vtable.GetNumberOfColumns())]

    def nodes(self) -> list:
        return [self.loss_table, self.val_table, self.chart, *self.series.values()]

    # --- internals -----------------------------------------------------------------------------

    def _add_column(self, table, name: str):
        from vtkmodules.vtkCommonCore import vtkDoubleArray

        column = vtkDoubleArray()
        column.SetName(name)
        rows = table.GetTable().GetNumberOfRows()
        column.SetNumberOfTuples(rows)
        column.Fill(math.nan)
        table.GetTable().AddColumn(column)
        if name != "step":
            self._add_series(table, name)
        return column

    def _add_series(self, table, name: str) -> None:
        series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.name} {name}")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("step")
        series.SetYColumnName(name)
        series.SetPlotType(series.PlotTypeScatter)        # a line through the points, x from the table
        series.SetMarkerStyle(series.MarkerStyleNone)
        if table is self.val_table:
            series.SetLineStyle(series.LineStyleDash)
        hue = (len(self.series) * 0.618034) % 1.0
        series.SetColor(*colorsys.hsv_to_rgb(hue, 0.8, 0.85))
        self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
        self.series[name] = series

    def _append(self, table, step, values: dict) -> int:
        vtable = table.GetTable()
        for name in sorted(values, key=lambda n: (n not in ("loss", "val_mean"), n)):   # total first
            if vtable.GetColumnByName(name) is None:
                self._add_column(table, name)
        for i in range(vtable.GetNumberOfColumns()):
            column = vtable.GetColumn(i)
            name = column.GetName()
            column.InsertNextValue(_number(step) if name == "step" else _number(values.get(name)))
        vtable.Modified()
        table.Modified()
        return 1


def read_jsonl(path) -> list[dict]:
    """The JSON objects of a JSON-lines file; a half-written or broken line is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return json_records(text)


def json_records(text: str) -> list[dict]:
    """The JSON objects of a JSON-lines text; blank, partial or non-object lines are skipped."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
