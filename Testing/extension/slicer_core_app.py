"""Real MRML for tests: a scene with Slicer's own module logics, from PyPI ``slicer-core``.

Set up the way trame-slicer's ``core/slicer_app.py`` does (scene, application logic, colour,
volumes, segmentations, subject hierarchy logics, default slice orientations; the terminologies
logic needs Slicer's terminology files, which slicer-core does not ship: segments carry their
terminology as the standard tag string instead),
then exposed the way Slicer exposes them to Python: ``slicer.mrmlScene`` and
``slicer.modules.<name>.logic()``, which ``slicer.util`` functions look up. Nothing here is a
mock: every node and logic is the real C++ class.
"""

from __future__ import annotations

import types

import slicer


class SlicerCoreApp:
    def __init__(self):
        from slicer import (
            vtkMRMLColorLogic,
            vtkMRMLCrosshairNode,
            vtkMRMLScene,
            vtkMRMLSliceNode,
            vtkSlicerApplicationLogic,
            vtkSlicerSegmentationsModuleLogic,
            vtkSlicerSubjectHierarchyModuleLogic,
            vtkSlicerVolumesLogic,
        )
        from vtkmodules.vtkCommonCore import vtkCollection

        self.scene = vtkMRMLScene()
        crosshair = vtkMRMLCrosshairNode()
        crosshair.SetCrosshairName("default")
        self.scene.AddNode(crosshair)

        self.app_logic = vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().AddDefaultColorNodes()
        self.app_logic.SetSliceLogics(vtkCollection())
        self.app_logic.SetViewLogics(vtkCollection())

        self.logics = {}
        self.logics["colors"] = self._module_logic(vtkMRMLColorLogic(), "Colors")
        self.logics["volumes"] = self._module_logic(vtkSlicerVolumesLogic(), "Volumes")
        self.logics["segmentations"] = self._module_logic(vtkSlicerSegmentationsModuleLogic(), "Segmentations")
        self.logics["subjecthierarchy"] = self._module_logic(vtkSlicerSubjectHierarchyModuleLogic(), "SubjectHierarchy")
        vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene, True)

    def _module_logic(self, logic, name: str):
        if hasattr(logic, "SetMRMLApplicationLogic"):
            logic.SetMRMLApplicationLogic(self.app_logic)
        logic.SetMRMLScene(self.scene)
        self.app_logic.SetModuleLogic(name, logic)
        return logic

    def install(self) -> None:
        """Make this scene the one ``slicer.util`` and the modules' Lib code work on."""
        slicer.mrmlScene = self.scene
        slicer.modules = types.SimpleNamespace(
            **{name: types.SimpleNamespace(logic=lambda logic=logic: logic) for name, logic in self.logics.items()})

    def close(self) -> None:
        self.scene.Clear(True)
