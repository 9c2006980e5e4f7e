"""The Slicer extension's files, checked without Slicer.

- every ``.ui`` loads with PySide6's QUiLoader, with stand-ins for the ctk/qMRML classes it names;
- every ``self.ui.<name>`` the module code uses is a widget of its ``.ui``, and every widget bound
  to the parameter node (``SlicerParameterName``) names a field of the right type;
- every ``slicer.util`` function, ``slicer.mrmlScene`` method, ``slicer`` class and MRML/VTK
  method the modules and their Lib packages call exists in Slicer's real code (PyPI slicer-core);
  the few that slicer-core cannot show are listed in ``CHECKED_BY_HAND`` with where they were read;
- the CMake lists name exactly the files that exist; the ExtensionsIndex entry follows the schema;
- no module file imports the engine (``voco``): it runs only in its own process.
"""

from __future__ import annotations

import ast
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ("VoCoSegmentation", "VoCoPretrain")
CATEGORIES = {"VoCoSegmentation": ["Segmentation"], "VoCoPretrain": ["Machine Learning"]}

# Names that slicer-core (no Qt, no application, no Slicer 5.12 packaging) cannot show, each read
# by name in Slicer's own source (GitHub Slicer/Slicer main, Aug 2026) or the PyTorch extension.
CHECKED_BY_HAND = {
    # Base/Python/slicer/packaging.py (Slicer 5.12+): def pip_ensure(requirements, constraints,
    # skip_packages, prompt_install, prompt_restart, requester, ...), def load_requirements(path)
    "slicer.packaging.pip_ensure", "slicer.packaging.load_requirements",
    # fepegar/SlicerPyTorch PyTorchUtils/PyTorchUtils.py: class PyTorchUtilsLogic, installTorch(askConfirmation,
    # forceComputationBackend, torchVersionRequirement, torchvisionVersionRequirement)
    "PyTorchUtils.PyTorchUtilsLogic",
    # Base/Python/slicer/parameterNodeWrapper/{wrapper,validators}.py __all__
    "slicer.parameterNodeWrapper.parameterNodeWrapper", "slicer.parameterNodeWrapper.WithinRange",
    "slicer.parameterNodeWrapper.Choice",
    # Base/Python/slicer/ScriptedLoadableModule.py: the four base classes (resourcePath, getParameterNode,
    # delayDisplay, runTest are methods of theirs)
    "slicer.ScriptedLoadableModule.ScriptedLoadableModule", "slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget",
    "slicer.ScriptedLoadableModule.ScriptedLoadableModuleLogic", "slicer.ScriptedLoadableModule.ScriptedLoadableModuleTest",
}


def module_py_files(module: str) -> list[Path]:
    return sorted(p for p in (REPO / module).rglob("*.py") if "__pycache__" not in p.parts)


def all_py_files() -> list[Path]:
    return [p for module in MODULES for p in module_py_files(module)]


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def ui_file(module: str) -> Path:
    return REPO / module / "Resources" / "UI" / f"{module}.ui"


def ui_widgets(module: str) -> dict[str, str]:
    """name -> class of every widget in the module's .ui."""
    root = ET.parse(ui_file(module)).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


# --- (1) the .ui files load --------------------------------------------------------------------


@pytest.fixture(scope="module")
def qapp():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() or QApplication([])


def load_ui(module: str):
    """Load the .ui with PySide6, registering a QWidget stand-in for each of its <customwidgets>."""
    from PySide6.QtCore import QFile, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QWidget

    root = ET.parse(ui_file(module)).getroot()
    loader = QUiLoader()
    custom = [c.findtext("class") for c in root.iter("customwidget")]
    for name in custom:
        loader.registerCustomWidget(type(name, (QWidget,), {}))
    file = QFile(str(ui_file(module)))
    assert file.open(QIODevice.ReadOnly)
    widget = loader.load(file)
    file.close()
    return loader, widget, custom


@pytest.mark.parametrize("module", MODULES)
def test_ui_file_loads_with_stand_ins_for_the_slicer_widgets(qapp, module):
    from PySide6.QtCore import QObject
    from PySide6.QtUiTools import QUiLoader

    loader, widget, custom = load_ui(module)
    assert widget is not None, loader.errorString()
    assert loader.errorString() in ("", "Unknown error")
    assert type(widget).__name__ == "qMRMLWidget" and widget.objectName() == module

    # Every class is a standard Qt one or declared as a custom widget; the Slicer ones are declared.
    known = set(QUiLoader().availableWidgets())
    for name, cls in ui_widgets(module).items():
        assert cls in known or cls in custom, f"{module}.ui: {name} has undeclared class {cls}"
        if cls.startswith(("ctk", "qMRML", "qSlicer")):
            assert cls in custom, f"{module}.ui: {cls} must be in <customwidgets>"
        assert widget.findChild(QObject, name) is not None or name == module, f"{name} was not created"
    assert {"ctkCollapsibleButton", "qMRMLWidget", "qMRMLNodeComboBox"} <= set(custom)
    widget.deleteLater()


@pytest.mark.parametrize("module", MODULES)
def test_every_node_combo_box_gets_the_scene_from_the_top_widget(module):
    root = ET.parse(ui_file(module)).getroot()
    combos = {n for n, c in ui_widgets(module).items() if c == "qMRMLNodeComboBox"}
    connected = set()
    for c in root.iter("connection"):
        assert c.findtext("sender") == module
        assert c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        assert c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
        connected.add(c.findtext("receiver"))
    assert combos and combos == connected


# --- (2) widget names and parameter-node bindings ------------------------------------------------


def ui_names_used(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Attribute) and dotted(node.value) == "self.ui":
            names.add(node.attr)
    return names


@pytest.mark.parametrize("module", MODULES)
def test_every_widget_the_module_uses_exists_in_its_ui(module):
    used = ui_names_used(REPO / module / f"{module}.py")
    widgets = ui_widgets(module)
    assert used, "the widget uses no self.ui names?"
    missing = sorted(used - set(widgets))
    assert not missing, f"{module}.py uses widgets that {module}.ui lacks: {missing}"


# Members of Slicer's own widget classes the modules use, read in their headers (CTK Libs/Widgets,
# Slicer Libs/MRML/Widgets): ctkPathLineEdit Q_PROPERTY filters; qMRMLWidget slot setMRMLScene.
CUSTOM_MEMBERS = {"ctkPathLineEdit": {"filters"}, "qMRMLWidget": {"setMRMLScene"}}


@pytest.mark.parametrize("module", MODULES)
def test_widget_members_and_signals_the_module_uses_exist_on_the_qt_classes(qapp, module):
    """``self.ui.X.attr = v`` / ``self.ui.X.attr`` must be a Qt property of X's class (PythonQt maps
    properties to attributes), ``self.ui.X.method()`` a method, and ``self.ui.X.connect("sig(args)",
    slot)`` (PythonQt) a signal of that class."""
    from PySide6 import QtWidgets

    widgets = ui_widgets(module)
    problems = []
    for node in ast.walk(parse(REPO / module / f"{module}.py")):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and dotted(node.value.value) == "self.ui"):
            continue
        name, member = node.value.attr, node.attr
        cls_name = widgets.get(name)
        cls = getattr(QtWidgets, cls_name, None)
        if cls is None:
            if member not in CUSTOM_MEMBERS.get(cls_name, set()):
                problems.append(f"{name} ({cls_name}).{member}: not checked")
            continue
        meta = cls.staticMetaObject
        if member == "connect":
            continue  # the signal is checked below
        if meta.indexOfProperty(member) < 0 and not callable(getattr(cls, member, None)):
            problems.append(f"{name} ({cls_name}) has no property or method {member}")
    for node in ast.walk(parse(REPO / module / f"{module}.py")):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                and isinstance(node.func.value, ast.Attribute) and dotted(node.func.value.value) == "self.ui"):
            name = node.func.value.attr
            signal = node.args[0].value
            cls = getattr(QtWidgets, widgets[name], None)
            if cls is None or cls.staticMetaObject.indexOfSignal(signal) < 0:
                problems.append(f"{name} ({widgets[name]}) has no signal {signal}")
    assert not problems, problems


def parameter_fields(module: str) -> dict[str, str]:
    """name -> annotation source of the @parameterNodeWrapper class of the module."""
    tree = parse(REPO / module / f"{module}.py")
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(dotted(d) == "parameterNodeWrapper" for d in node.decorator_list):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError(f"{module}.py has no @parameterNodeWrapper class")


# Which widget class each annotation binds to, as Slicer's parameterNodeWrapper/guiConnectors.py
# (canRepresent) accepts them; QComboBox <-> str needs a Choice annotation.
def connector_accepts(widget_class: str, annotation: str) -> bool:
    base = re.sub(r"^Annotated\[(\w+(?:\.\w+)?),.*\]$", r"\1", annotation)
    if base.startswith("vtkMRML"):
        return widget_class == "qMRMLNodeComboBox"
    return {
        "bool": widget_class in ("QCheckBox", "ctkCheckBox", "QPushButton"),
        "int": widget_class in ("QSpinBox", "QSlider") or (widget_class == "QComboBox" and "Choice" in annotation),
        "float": widget_class in ("QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox"),
        "str": widget_class in ("QLineEdit", "QLabel", "QTextEdit")
        or (widget_class in ("QComboBox", "ctkComboBox") and "Choice" in annotation),
        "Path": widget_class == "ctkPathLineEdit", "pathlib.Path": widget_class == "ctkPathLineEdit",
    }.get(base, False)


@pytest.mark.parametrize("module", MODULES)
def test_widgets_bound_to_the_parameter_node_name_a_field_of_a_fitting_type(module):
    fields = parameter_fields(module)
    root = ET.parse(ui_file(module)).getroot()
    bound = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    assert bound
    for name, cls in bound.items():
        assert name in fields, f"{module}.ui binds {name!r}, which the parameter node lacks"
        assert connector_accepts(cls, fields[name]), f"{module}.ui: {cls} cannot show {name}: {fields[name]}"


# --- (3) Slicer APIs exist in Slicer's real code -------------------------------------------------


@pytest.fixture(scope="module")
def slicer_core():
    import slicer
    import slicer.util
    from vtkmodules import vtkCommonCore, vtkCommonDataModel, vtkCommonMath, vtkCommonTransforms

    classes = [slicer.vtkMRMLScene, slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLLabelMapVolumeNode,
               slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLSegmentationDisplayNode, slicer.vtkSegmentation,
               slicer.vtkSegment, slicer.vtkMRMLMarkupsROINode, slicer.vtkMRMLMarkupsDisplayNode,
               slicer.vtkMRMLColorTableNode, slicer.vtkMRMLTableNode, slicer.vtkMRMLPlotSeriesNode,
               slicer.vtkMRMLPlotChartNode, slicer.vtkMRMLScalarVolumeDisplayNode, slicer.vtkMRMLTransformNode,
               slicer.vtkMRMLSelectionNode, slicer.vtkMRMLLayoutNode, slicer.vtkMRMLSliceCompositeNode,
               slicer.vtkMRMLScriptedModuleNode, slicer.vtkSlicerApplicationLogic,
               slicer.vtkSlicerSegmentationsModuleLogic, slicer.vtkSlicerVolumesLogic, slicer.vtkMRMLColorLogic,
               slicer.vtkMRMLStorageNode, slicer.vtkOrientedImageData,
               vtkCommonMath.vtkMatrix4x4, vtkCommonCore.vtkCommand, vtkCommonCore.vtkObject,
               vtkCommonCore.vtkDoubleArray, vtkCommonCore.vtkStringArray, vtkCommonDataModel.vtkTable,
               vtkCommonDataModel.vtkImageData, vtkCommonDataModel.vtkPointData, vtkCommonTransforms.vtkGeneralTransform,
               vtkCommonTransforms.vtkTransform]
    for optional in ("vtkSlicerPlotsLogic", "vtkSlicerMarkupsLogic", "vtkSlicerTablesLogic"):
        if hasattr(slicer, optional):
            classes.append(getattr(slicer, optional))
    return slicer, classes


def calls_in(paths) -> list[tuple[Path, int, str]]:
    """(file, line, dotted name) of every attribute that is called or read off ``slicer``/nodes."""
    found = []
    for path in paths:
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Attribute):
                name = dotted(node)
                if name:
                    found.append((path, node.lineno, name))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "slicer":
                for alias in node.names:
                    found.append((path, node.lineno, f"{node.module}.{alias.name}"))
    return found


def test_every_slicer_util_function_and_scene_method_exists_in_slicer(slicer_core):
    slicer, _ = slicer_core
    checked, problems, by_hand = set(), [], set()
    for path, line, name in calls_in(all_py_files()):
        where = f"{path.relative_to(REPO)}:{line}"
        parts = name.split(".")
        if parts[:2] == ["slicer", "util"] and len(parts) >= 3:
            checked.add(name)
            if not hasattr(slicer.util, parts[2]):
                problems.append(f"{where}: slicer.util.{parts[2]}")
        elif parts[:2] == ["slicer", "mrmlScene"] and len(parts) >= 3:
            checked.add(name)
            if not hasattr(slicer.vtkMRMLScene, parts[2]):
                problems.append(f"{where}: vtkMRMLScene.{parts[2]}")
        elif parts[0] == "slicer" and len(parts) == 2 and parts[1].startswith("vtk"):
            checked.add(name)
            if not hasattr(slicer, parts[1]):
                problems.append(f"{where}: slicer.{parts[1]}")
        elif parts[:2] in (["slicer", "packaging"], ["slicer", "parameterNodeWrapper"],
                           ["slicer", "ScriptedLoadableModule"]) and len(parts) >= 3:
            by_hand.add(".".join(parts[:3]))
    assert not problems, "not in Slicer's slicer.util / MRML: " + ", ".join(problems)
    assert by_hand <= CHECKED_BY_HAND, f"not checked: {sorted(by_hand - CHECKED_BY_HAND)}"
    assert "slicer.util.loadUI" in checked and "slicer.util.tryWithErrorDisplay" in checked


def mrml_methods_called(paths) -> set[tuple[str, str]]:
    """(method, where) for every call ``something.Method(...)`` whose name looks like a VTK/MRML
    method (starts with a capital letter), except constructors read off modules."""
    found = set()
    for path in paths:
        tree = parse(path)
        # Names bound to modules or classes by imports: ``queue.Queue()``, ``qt.QTimer()`` are constructors.
        imported = {"Path"}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                method = node.func.attr
                base = dotted(node.func.value)
                if not method[:1].isupper():
                    continue
                if base and (base in imported or base.split(".")[0] in ("qt", "ctk")):
                    continue
                found.add((method, f"{path.relative_to(REPO)}:{node.lineno}"))
    return found


def test_every_mrml_method_called_exists_on_a_real_mrml_or_vtk_class(slicer_core):
    slicer, classes = slicer_core
    called = mrml_methods_called(all_py_files())
    assert any(m == "GetSegmentation" for m, _ in called)
    missing = sorted({f"{m} ({where})" for m, where in called if not any(hasattr(c, m) for c in classes)})
    assert not missing, f"methods no real MRML/VTK class has: {missing}"


def test_module_logics_called_through_slicer_modules_exist(slicer_core):
    slicer, _ = slicer_core
    logics = {"segmentations": slicer.vtkSlicerSegmentationsModuleLogic, "volumes": slicer.vtkSlicerVolumesLogic,
              "colors": slicer.vtkMRMLColorLogic}
    if hasattr(slicer, "vtkSlicerPlotsLogic"):
        logics["plots"] = slicer.vtkSlicerPlotsLogic
    pattern = re.compile(r"slicer\.modules\.(\w+)\.logic\(\)\.(\w+)")
    seen = []
    for path in all_py_files():
        for module, method in pattern.findall(path.read_text()):
            seen.append(module)
            assert module in logics, f"{path.name}: slicer.modules.{module} is not checked"
            assert hasattr(logics[module], method), f"{path.name}: {module} logic has no {method}"
    assert "segmentations" in seen


# --- (4) CMake lists, resources and the ExtensionsIndex entry ------------------------------------


def cmake_list(text: str, variable: str, module: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"no set({variable} ...)"
    items = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    return [item.replace("${MODULE_NAME}", module) for item in items if item]


@pytest.mark.parametrize("module", MODULES)
def test_cmake_lists_every_script_and_resource_of_the_module(module):
    folder = REPO / module
    text = (folder / "CMakeLists.txt").read_text()
    assert re.search(rf"set\(MODULE_NAME {module}\)", text)
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS", module)
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES", module)
    on_disk = {p.relative_to(folder).as_posix() for p in module_py_files(module)}
    assert sorted(set(scripts)) == sorted(on_disk), "MODULE_PYTHON_SCRIPTS and the .py files differ"
    assert len(scripts) == len(set(scripts))
    resource_files = {p.relative_to(folder).as_posix() for p in (folder / "Resources").rglob("*") if p.is_file()}
    assert set(resources) == resource_files
    assert {f"Resources/UI/{module}.ui", f"Resources/Icons/{module}.png"} <= set(resources)
    assert "WITH_GENERIC_TESTS" in text and "slicerMacroBuildScriptedModule(" in text
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT \$\{MODULE_NAME\}\.py\s*\)", text)


def test_top_level_cmake_declares_the_extension_and_installs_the_engine():
    text = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"project\(VoCo\)", text)
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text)
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', text), key
    assert re.findall(r"add_subdirectory\((\w+)\)", text) == list(MODULES)
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text and "include(${Slicer_EXTENSION_CPACK})" in text
    # The engine package beside the modules, with its model registry where registry.py looks.
    assert "voco/*.py" in text and "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in text
    for resource in re.search(r"RESOURCES ([^\n]+)", text).group(1).split():
        assert (REPO / resource).is_file(), resource
    assert (REPO / "Resources" / "Icons" / "VoCo.png").is_file()


def test_png_icons_are_128_pixels_square():
    for path in [REPO / "Resources/Icons/VoCo.png"] + [REPO / m / f"Resources/Icons/{m}.png" for m in MODULES]:
        header = path.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(header[16:20], "big") == int.from_bytes(header[20:24], "big") == 128, path


def test_pip_requirements_are_the_engine_dependencies_without_torch():
    import tomllib

    def name(requirement):
        return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()

    lines = (REPO / "Resources" / "requirements.txt").read_text().splitlines()
    pip = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    engine = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch" not in {name(r) for r in pip}
    assert sorted(pip) == sorted(r for r in engine if name(r) != "torch")


def test_extensions_index_entry_follows_the_catalog_schema():
    # Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json: required and allowed keys.
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
    entry = json.loads((REPO / "Resources" / "ExtensionsIndex" / "VoCo.json").read_text())
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["build_dependencies"] == ["PyTorch"]
    category = re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', (REPO / "CMakeLists.txt").read_text()).group(1)
    assert entry["category"] == category
    assert 1 <= entry.get("tier", 1) <= 5


# --- (5) module files: structure, and the engine stays out of Slicer's process -----------------


@pytest.mark.parametrize("module", MODULES)
def test_module_file_has_the_four_classes_and_a_runnable_self_test(module):
    tree = parse(REPO / module / f"{module}.py")
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for suffix, base in (("", "ScriptedLoadableModule"), ("Widget", "ScriptedLoadableModuleWidget"),
                         ("Logic", "ScriptedLoadableModuleLogic"), ("Test", "ScriptedLoadableModuleTest")):
        cls = classes.get(module + suffix)
        assert cls is not None, f"{module}{suffix} missing"
        assert base in {dotted(b) for b in cls.bases}
    test_methods = {n.name for n in classes[module + "Test"].body if isinstance(n, ast.FunctionDef)}
    assert "runTest" in test_methods and any(m.startswith("test_") for m in test_methods)
    source = (REPO / module / f"{module}.py").read_text()
    assert f'resourcePath("UI/{module}.ui")' in source and "childWidgetVariables" in source
    assert "qt.QTimer" in source and "tryWithErrorDisplay" in source
    categories = re.search(r"self\.parent\.categories = (\[.*?\])", source).group(1)
    assert ast.literal_eval(categories) == CATEGORIES[module]


def test_no_module_file_imports_the_engine():
    for path in all_py_files():
        for node in ast.walk(parse(path)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                assert name.split(".")[0] not in ("voco", "torch", "monai"), \
                    f"{path.relative_to(REPO)}:{node.lineno} imports {name} into Slicer's process"


# --- (6) the self-tests a Slicer user runs, run here on real MRML and the real engine ------------


@pytest.mark.parametrize("module", MODULES)
def test_module_self_test_passes_on_real_mrml_with_the_engine(module):
    """The module's ScriptedLoadableModuleTest end to end (tiny model / 2-step run on the CPU), with
    stand-ins only for the Slicer application (see slicer_selftest_runner.py)."""
    import subprocess
    import sys

    runner = Path(__file__).with_name("slicer_selftest_runner.py")
    done = subprocess.run([sys.executable, str(runner), module], capture_output=True, text=True, timeout=1200,
                          cwd=REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["ok"] and not summary["skipped"]
    shown = [next(iter(call)) for call in summary["calls"]]
    if module == "VoCoPretrain":
        assert shown == ["setSliceViewerLayers", "ShowChartInLayout", "setSliceViewerLayers"]
