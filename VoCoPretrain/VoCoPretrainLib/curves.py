"""Live training curves: progress events -> columns -> table nodes -> one plot chart.

``step`` events fill the loss columns (``step`` plus one per loss term that the engine reports:
``loss``, ``loss_pos``, ``loss_neg``, ``loss_reg``, ``loss_inter`` for pretraining; whatever
``loss*`` fields fine-tuning sends). ``val_dice`` events fill validation columns (``step``,
``val_mean`` and one per label). A term that appears later gets earlier rows as NaN.

Two halves, so that a long run's history is never parsed on the GUI thread: ``CurveColumns``
(plain Python: fed from events, or from a run folder in a worker thread) and ``TrainingCurves``
(the MRML nodes: ``show(columns)`` copies the columns into the tables as whole arrays).

Example (Slicer's Python console)::

    from VoCoPretrainLib.curves import CurveColumns, TrainingCurves
    columns = CurveColumns(); columns.add_events([{"event": "step", "step": 1, "loss": 0.8}])
    curves = TrainingCurves("run-1"); curves.show(columns)
    slicer.modules.plots.logic().ShowChartInLayout(curves.chart)   # in Slicer only
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np

import slicer
from VoCoCommonLib import events as ev

LOSS_PREFIX = "loss"
VAL_PREFIX = "val_"   # column names of the validation table: val_mean, val_<label>


def _number(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


class CurveColumns:
    """The loss and validation columns of one run, as lists of floats (``step`` first)."""

    def __init__(self):
        self.loss: dict[str, list[float]] = {"step": []}
        self.val: dict[str, list[float]] = {"step": []}

    def add_events(self, events) -> int:
        """Append the ``step`` and ``val_dice`` events among ``events``; the number of rows added."""
        added = 0
        for event in events:
            kind = event.get("event")
            if kind == ev.STEP and "step" in event:
                self._append(self.loss, event["step"], {k: v for k, v in event.items() if k.startswith(LOSS_PREFIX)})
                added += 1
            elif kind == ev.VAL_DICE and "step" in event:
                values = {"val_mean": event.get("mean")}
                values.update({f"{VAL_PREFIX}{label}": dice for label, dice in (event.get("dice") or {}).items()})
                self._append(self.val, event["step"], values)
                added += 1
        return added

    @classmethod
    def from_run(cls, run_dir) -> tuple["CurveColumns", ev.JsonLinesTail | None]:
        """A run folder's curves, and the tail of its ``events.jsonl`` to follow it with (None for
        a run started outside the front ends: its curves come from the engine's ``metrics.jsonl``,
        where pretraining records are step events and fine-tuning ones carry ``val_mean``)."""
        run_dir, columns = Path(run_dir), cls()
        if (run_dir / "events.jsonl").is_file() or not (run_dir / "metrics.jsonl").is_file():  # or not started yet
            tail = ev.JsonLinesTail(run_dir / "events.jsonl")
            columns.add_events(tail.read_new())
            return columns, tail
        events = []
        for record in ev.read_jsonl(run_dir / "metrics.jsonl"):
            events.append({"event": ev.STEP, **record})
            if "val_mean" in record:
                events.append({"event": ev.VAL_DICE, "step": record["step"], "mean": record["val_mean"],
                               "dice": record.get("val_dice") or {}})
        columns.add_events(events)
        return columns, None

    @staticmethod
    def _append(table: dict, step, values: dict) -> None:
        rows = len(table["step"])
        for name in sorted(values, key=lambda n: (n not in ("loss", "val_mean"), n)):   # total first
            table.setdefault(name, [math.nan] * rows)
        for name, column in table.items():
            column.append(_number(step) if name == "step" else _number(values.get(name)))


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

    def show(self, columns: CurveColumns) -> None:
        """Make the tables hold ``columns`` (whole arrays: cheap however long the run)."""
        self._fill(self.loss_table, columns.loss)
        self._fill(self.val_table, columns.val)

    def in_scene(self) -> bool:
        return self.loss_table.GetScene() is not None

    def columns(self, table=None) -> list[str]:
        vtable = (table or self.loss_table).GetTable()
        return [vtable.GetColumnName(i) for i in range(vtable.GetNumberOfColumns())]

    def nodes(self) -> list:
        return [self.loss_table, self.val_table, self.chart, *self.series.values()]

    def _fill(self, table, data: dict) -> None:
        from vtkmodules.util.numpy_support import numpy_to_vtk

        vtable = table.GetTable()
        for name, values in data.items():  # "step" first: a new column must match its row count
            array = numpy_to_vtk(np.asarray(values, dtype=np.float64), deep=True)
            array.SetName(name)
            column = vtable.GetColumnByName(name)
            if column is None:
                vtable.AddColumn(array)
                if name != "step":
                    self._add_series(table, name)
            else:
                column.DeepCopy(array)
        vtable.Modified()
        table.Modified()

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
