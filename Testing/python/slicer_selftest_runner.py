"""Run one module's ScriptedLoadableModuleTest (the self-test a Slicer user runs) outside Slicer.

``python slicer_selftest_runner.py VoCoSegmentation|VoCoPretrain``: the test runs on slicer-core's
real MRML and the real engine (as a subprocess); only the application pieces slicer-core lacks are
stood in for: the ScriptedLoadableModule base classes, the parameter-node wrapper, the ``qt``
module, the slice-view layers and the plot view (their calls are recorded and printed as JSON on
the last line). Exit code 0 when the self-test passed.
"""

import json
import sys
import types
import unittest
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "Testing" / "python"), str(REPO / "VoCoSegmentation"), str(REPO / "VoCoPretrain")]

import slicer  # noqa: E402
import slicer.util  # noqa: E402
from slicer_core_app import SlicerCoreApp  # noqa: E402


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleWidget:
    pass


class ScriptedLoadableModuleLogic:
    def __init__(self):
        pass


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, *args, **kwargs):
        print(">>", message, flush=True)


def install_stand_ins(calls: list) -> None:
    module = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    sys.modules["slicer.ScriptedLoadableModule"] = module
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.WithinRange = wrapper.Choice = lambda *args: None
    sys.modules["slicer.parameterNodeWrapper"] = wrapper
    sys.modules["qt"] = types.ModuleType("qt")
    slicer.util.setSliceViewerLayers = lambda **kwargs: calls.append({"setSliceViewerLayers": sorted(kwargs)})
    plots = types.SimpleNamespace(ShowChartInLayout=lambda chart: calls.append({"ShowChartInLayout": chart.GetName()}))
    slicer.modules.plots = types.SimpleNamespace(logic=lambda: plots)


def main(name: str) -> int:
    app = SlicerCoreApp()
    app.install()
    calls = []
    install_stand_ins(calls)
    module = __import__(name)
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(getattr(module, name + "Test")("runTest"))
    print(json.dumps({"ok": result.wasSuccessful(), "skipped": len(result.skipped), "calls": calls}))
    return 0 if result.wasSuccessful() and not result.skipped else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
