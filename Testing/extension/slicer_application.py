"""The pieces of the 3D Slicer application that PyPI's slicer-core lacks, as stand-ins, so that the
modules' own files (module, widget, logic, self-test) run in tests on real MRML.

What is real: MRML and the module logics (slicer-core), Slicer's own ``slicer/util.py`` (from
slicer-core: ``loadUI``, ``childWidgetVariables``, ``tryWithErrorDisplay``, ``errorDisplay``,
``VTKObservationMixin``... run as they are), Qt (PySide6 through ``pythonqt``), the engine.

What stands in, each following what Slicer's source does (Base/Python/slicer/
ScriptedLoadableModule.py and parameterNodeWrapper/ at v5.10.0 and v5.12.3; names derived, no
code copied):

- ``slicer.app``: version, testing mode (message boxes are logged, as in Slicer's --testing),
  override cursor, settings, restart (recorded), ``translate`` (Qt's, every call recorded in
  ``translated``) and ``connect`` (the slots connected to its signals, e.g. startupCompleted());
- ``slicer.i18n``: ``translate(context, text)`` and ``tr(text)`` with the context Slicer derives
  from the calling file (Base/Python/slicer/i18n.py);
- the SampleData module's ``SampleDataLogic.registerCustomSampleDataSource`` (sources recorded);
- ``slicer.app.coreIOManager()`` for volumes only: as Slicer's volume reader (qSlicerVolumesReader)
  does, the real vtkSlicerVolumesLogic reads the file, so slicer.util.loadVolume runs as it is;
- the four ScriptedLoadableModule base classes; ``runTest`` is called directly, as Slicer's
  Reload and Test does (outside unittest: a SkipTest is an error there, cleanups never run);
- ``slicer.parameterNodeWrapper``: typed fields stored in the real vtkMRMLScriptedModuleNode,
  validators, and GUI binding of widgets with a ``SlicerParameterName`` property through the same
  widget properties and signals as Slicer's connectors;
- ``slicer.util.setSliceViewerLayers`` and the Plots module's ``ShowChartInLayout`` (no views):
  recorded in ``DISPLAYED``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import typing
import unittest
from dataclasses import dataclass
from pathlib import Path

import slicer
import slicer.util
import vtk

REPO = Path(__file__).resolve().parents[2]
MODULE_FOLDERS = ("VoCoCommon", "VoCoSegmentation", "VoCoPretrain")
DISPLAYED: list = []  # what the modules asked Slicer's views to show


# --- slicer.app --------------------------------------------------------------------------------

class _Settings:
    def __init__(self, values=None):
        self.values = dict(values or {})

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value):
        self.values[key] = value


class SlicerApplication:
    """``slicer.app`` (qSlicerApplication): what the modules and slicer.util use of it."""

    def __init__(self, version=(5, 10)):
        self.majorVersion, self.minorVersion = version
        self.applicationName = "Slicer"
        self.restarts = 0
        self.cursor_depth = 0
        self._settings = _Settings({"Developer/SelfTestDisplayMessageDelay": "100"})
        self.translated: list[tuple[str, str]] = []
        self.connections: dict[str, list] = {}

    def translate(self, context, text):
        from PySide6.QtCore import QCoreApplication

        self.translated.append((context, text))
        return QCoreApplication.translate(context, text)

    def connect(self, signal, slot):
        self.connections.setdefault(signal, []).append(slot)

    def coreIOManager(self):
        return _VolumesIO()

    def testingEnabled(self):
        return True

    def setOverrideCursor(self, cursor):
        self.cursor_depth += 1

    def restoreOverrideCursor(self):
        self.cursor_depth -= 1

    def processEvents(self, *args):
        from pythonqt import process_events

        process_events()

    def topLevelWidgets(self):
        return []

    def userSettings(self):
        return self._settings

    def settings(self):
        return self._settings

    def restart(self):
        self.restarts += 1


class _VolumesIO:
    def fileType(self, filename):
        return "VolumeFile"

    def loadNodes(self, filetype, properties, loaded, messages):
        logic = slicer.modules.volumes.logic()
        name = properties.get("name") or Path(properties["fileName"]).name.split(".")[0]
        node = logic.AddArchetypeVolume(properties["fileName"], name) if filetype == "VolumeFile" else None
        if node is not None:
            loaded.AddItem(node)
        return node is not None


# --- ScriptedLoadableModule --------------------------------------------------------------------

class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title, parent.categories, parent.dependencies = "", [], []
        parent.contributors, parent.helpText, parent.acknowledgementText = [], "", ""
        slicer.selfTests[self.moduleName] = self.runTest

    def resourcePath(self, filename):
        return str(Path(self.parent.path).parent / "Resources" / filename)

    def runTest(self, msec=100, **kwargs):
        module = importlib.import_module(self.__module__)
        test = getattr(module, self.moduleName + "Test")()
        test.messageDelay = msec
        test.runTest(**kwargs)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        import qt

        self.moduleName = self.__class__.__name__[: -len("Widget")]
        if parent is None:
            parent = slicer.qMRMLWidget()
            parent.setLayout(qt.QVBoxLayout())
            parent.setMRMLScene(slicer.mrmlScene)
        self.parent = parent
        self.layout = parent.layout()

    def resourcePath(self, filename):
        return str(Path(slicer.util.modulePath(self.moduleName)).parent / "Resources" / filename)

    def setup(self):
        pass  # Slicer adds its developer section (Reload, Reload and Test) here

    def cleanup(self):
        pass

    def onReload(self):
        module = sys.modules[self.moduleName]
        importlib.reload(module)
        getattr(module, self.moduleName)(types.SimpleNamespace(path=module.__file__))  # re-registers its self-test

    def onReloadAndTest(self, **kwargs):
        """As Slicer's: reload, then the registered self-test inside tryWithErrorDisplay."""
        with slicer.util.tryWithErrorDisplay("Reload and Test failed."):
            self.onReload()
            test = slicer.selfTests[self.moduleName]
            test(msec=int(slicer.app.userSettings().value("Developer/SelfTestDisplayMessageDelay")), **kwargs)


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__[: -len("Logic")]

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is not None:
            if node.GetAttribute("ModuleName") != self.moduleName:
                node.SetAttribute("ModuleName", self.moduleName)
            return node
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return slicer.mrmlScene.AddNode(node)


class ScriptedLoadableModuleTest(unittest.TestCase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.moduleTestNames = [m for m in dir(self) if "test" in m and callable(getattr(self, m))]

    def delayDisplay(self, message, requestedDelay=None, msec=None):
        msec = getattr(self, "messageDelay", None) or msec or requestedDelay or 100
        slicer.util.delayDisplay(message, msec)

    def setUp(self):
        pass

    def tearDown(self):
        pass

    def runTest(self):
        for name in self.moduleTestNames:
            self.setUp()
            getattr(self, name)()
            self.tearDown()


# --- parameterNodeWrapper ----------------------------------------------------------------------

@dataclass
class WithinRange:
    minimum: float
    maximum: float

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{value} is not within [{self.minimum}, {self.maximum}]")


@dataclass
class Choice:
    choices: list

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f"{value!r} is not one of {self.choices}")


@dataclass
class _Field:
    name: str
    type: type
    validators: list
    default: object

    @property
    def is_node(self) -> bool:
        return isinstance(self.type, type) and issubclass(self.type, slicer.vtkMRMLNode)

    def read(self, node):
        if self.is_node:
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        if self.type is bool:
            return text == "True"
        return self.type(text)

    def write(self, node, value):
        for validator in self.validators:
            validator.validate(value)
        if self.is_node:
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        else:
            node.SetParameter(self.name, str(self.type(value)))


def _connector(widget, field: _Field):
    """(read, write, changed-signal name) for a bound widget, as Slicer's GUI connectors do it."""
    kind = type(widget.qobject).__name__
    if kind == "QCheckBox" and field.type is bool:
        return (lambda: widget.checked), (lambda v: setattr(widget, "checked", v)), "toggled"
    if kind == "QSpinBox" and field.type is int:
        for validator in field.validators:
            if isinstance(validator, WithinRange):
                widget.setRange(validator.minimum, validator.maximum)
        return (lambda: widget.value), (lambda v: setattr(widget, "value", v)), "valueChanged"
    if kind == "QComboBox":
        choices = next(v.choices for v in field.validators if isinstance(v, Choice))
        widget.clear()
        for choice in choices:
            widget.addItem(str(choice))
        return ((lambda: choices[widget.currentIndex]), (lambda v: setattr(widget, "currentIndex", choices.index(v))),
                "currentIndexChanged")
    if kind == "QLineEdit" and field.type is str:
        return (lambda: widget.text), (lambda v: setattr(widget, "text", v)), "textChanged"
    if kind == "ctkPathLineEdit" and field.type is Path:
        return ((lambda: Path(widget.currentPath)), (lambda v: setattr(widget, "currentPath", str(v))),
                "currentPathChanged")
    if kind == "qMRMLNodeComboBox" and field.is_node:
        widget.nodeTypes = [field.type.__name__]
        return widget.currentNode, widget.setCurrentNode, "currentNodeChanged"
    raise TypeError(f"no GUI connector for {kind} and {field.type} ({field.name})")


def parameterNodeWrapper(cls):
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {}
    for name, hint in hints.items():
        extras = list(getattr(hint, "__metadata__", ()))
        base = typing.get_args(hint)[0] if extras else hint
        default = getattr(cls, name) if hasattr(cls, name) else (None if issubclass(base, slicer.vtkMRMLNode)
                                                                   else base())
        fields[name] = _Field(name, base, extras, default)
        setattr(cls, name, property(lambda self, f=fields[name]: f.read(self.parameterNode),
                                    lambda self, value, f=fields[name]: f.write(self.parameterNode, value)))

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        self._guis, self._next_tag, self._updating = {}, 0, False
        for field in fields.values():
            if not field.is_node and not parameterNode.GetParameter(field.name):
                field.write(parameterNode, field.default)

    def connectGui(self, gui):
        bound = {}  # name -> (widget, read, write, changed signal)
        for widget in vars(gui).values():
            if hasattr(widget, "qobject") and widget.qobject.property("SlicerParameterName"):
                name = widget.qobject.property("SlicerParameterName")
                if name not in fields:
                    raise ValueError(f"the GUI binds {name!r}, which the parameter node lacks")
                bound[name] = (widget, *_connector(widget, fields[name]))
        tag, self._next_tag = self._next_tag, self._next_tag + 1
        self._guis[tag] = bound

        def to_gui(*_):
            if self._updating or tag not in self._guis:
                return
            self._updating = True
            try:
                for name, (_, _, write, _) in bound.items():
                    write(getattr(self, name))
            finally:
                self._updating = False

        for name, (widget, read, _, signal) in bound.items():
            def from_gui(*_, name=name, read=read):
                if not self._updating and tag in self._guis:
                    setattr(self, name, read())

            getattr(widget, signal).connect(from_gui)
        to_gui()
        self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, to_gui)
        return tag

    def disconnectGui(self, tag):
        self._guis.pop(tag, None)

    cls.__init__ = __init__
    cls.allParameters = fields
    cls.connectGui = connectGui
    cls.disconnectGui = disconnectGui
    cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback,
                                                                                                   priority)
    cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    cls.Modified = lambda self: self.parameterNode.Modified()
    return cls


# --- installing and loading --------------------------------------------------------------------

def _translation_context(source_file: str) -> str:
    """Slicer's context name: ``Package.File`` for a file of a package, else the file's name."""
    path = Path(source_file)
    return f"{path.parent.name}.{path.stem}" if (path.parent / "__init__.py").is_file() else path.stem


def _tr(text):
    import inspect

    caller = inspect.currentframe().f_back
    return slicer.app.translate(_translation_context(inspect.getsourcefile(caller) or inspect.getfile(caller)), text)


class SampleDataLogic:
    sources: dict = {}  # category -> the keyword arguments of each registration

    @staticmethod
    def registerCustomSampleDataSource(category="Custom", **source):
        SampleDataLogic.sources.setdefault(category, []).append(source)


def _set_slice_viewer_layers(**layers):
    DISPLAYED.append(("setSliceViewerLayers", sorted(layers)))


class _PlotsLogic:
    def ShowChartInLayout(self, chart):
        DISPLAYED.append(("ShowChartInLayout", chart.GetName()))


def install(version=(5, 10)) -> SlicerApplication:
    """The stand-ins into ``slicer`` and sys.modules (after pythonqt.install and the MRML app)."""
    import pythonqt
    from slicer_widgets import QMRML_STAND_INS

    for folder in MODULE_FOLDERS:
        if str(REPO / folder) not in sys.path:
            sys.path.insert(0, str(REPO / folder))
    module = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    sys.modules["slicer.ScriptedLoadableModule"] = module
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper, wrapper.WithinRange, wrapper.Choice = parameterNodeWrapper, WithinRange, Choice
    sys.modules["slicer.parameterNodeWrapper"] = wrapper
    for cls in QMRML_STAND_INS:
        setattr(slicer, cls.__name__, pythonqt.QtClass(cls))
    i18n = types.ModuleType("slicer.i18n")
    i18n.translate, i18n.tr = (lambda context, text: slicer.app.translate(context, text)), _tr
    sys.modules["slicer.i18n"] = slicer.i18n = i18n
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = SampleDataLogic
    SampleDataLogic.sources = {}
    sys.modules["SampleData"] = sample_data
    slicer.app = SlicerApplication(version)
    slicer.selfTests = {}
    slicer.util.setSliceViewerLayers = _set_slice_viewer_layers
    slicer.modules.plots = types.SimpleNamespace(logic=lambda plots=_PlotsLogic(): plots)
    DISPLAYED.clear()
    return slicer.app


def load_module(name: str):
    """Import ``<name>/<name>.py`` as Slicer's module factory does and make its module object;
    (python module, module object)."""
    path = REPO / name / f"{name}.py"
    sys.modules.pop(name, None)
    spec = importlib.util.spec_from_file_location(name, path)
    python_module = importlib.util.module_from_spec(spec)
    sys.modules[name] = python_module
    spec.loader.exec_module(python_module)
    parent = types.SimpleNamespace(path=str(path), hidden=False)
    module = getattr(python_module, name)(parent)
    setattr(slicer.modules, name.lower(), parent)
    return python_module, module


def make_widget(python_module, name: str):
    """The module's widget as Slicer makes it: a qMRMLWidget parent with a layout, then setup()."""
    import qt

    parent = slicer.qMRMLWidget()
    parent.setLayout(qt.QVBoxLayout())
    parent.setMRMLScene(slicer.mrmlScene)
    parent.isEntered = False
    widget = getattr(python_module, f"{name}Widget")(parent)
    widget.setup()
    parent.show()  # as the module panel is (offscreen): a widget's `visible` reads true only then
    return widget
