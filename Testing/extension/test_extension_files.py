"""The Slicer extension's files, checked without Slicer.

- every ``.ui`` loads with PySide6's QUiLoader, with stand-ins for the ctk/qMRML classes it names;
- every ``self.ui.<name>`` the module code uses is a widget of its ``.ui``, every member it uses is
  a member of the widget's Qt class (PySide6) or, for CTK/qMRML classes, of the class as CTK's and
  Slicer's headers declare it, and every widget bound to the parameter node names a field of a
  type Slicer's GUI connectors accept;
- every Slicer API name the modules use (slicer.util and slicer.packaging functions with their
  keyword arguments, ScriptedLoadableModule and parameterNodeWrapper names, slicer.app, MRML and
  module-logic methods, PyTorchUtils) is declared in Slicer's source at v5.10.0 and v5.12.3
  (slicer_api_names.json, derived by slicer_api.py from the fetched sources: names only) and,
  where slicer-core can show it, exists in Slicer's real code too;
- Slicer's module factory loads every top-level ``.py`` of a module folder as a module: each is one;
- the CMake lists name exactly the files that exist; the ExtensionsIndex entry follows the schema;
- no module file imports the engine (``voco``), and neither module imports from the other's folder.
"""

from __future__ import annotations

import ast
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import slicer_api

REPO = Path(__file__).resolve().parents[2]
MODULES = ("VoCoCommon", "VoCoSegmentation", "VoCoPretrain")
WIDGET_MODULES = ("VoCoSegmentation", "VoCoPretrain")
CATEGORIES = {"VoCoSegmentation": ["Segmentation"], "VoCoPretrain": ["Machine Learning"]}


def module_py_files(module: str) -> list[Path]:
    return sorted(p for p in (REPO / module).rglob("*.py") if "__pycache__" not in p.parts)


def all_py_files() -> list[Path]:
    return slicer_api.module_files()


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def ui_file(module: str) -> Path:
    return REPO / module / "Resources" / "UI" / f"{module}.ui"


def ui_widgets(module: str) -> dict[str, str]:
    """name -> class of every widget in the module's .ui."""
    root = ET.parse(ui_file(module)).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


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


@pytest.mark.parametrize("module", WIDGET_MODULES)
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


@pytest.mark.parametrize("module", WIDGET_MODULES)
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
        if isinstance(node, ast.Attribute) and slicer_api.dotted(node.value) == "self.ui":
            names.add(node.attr)
    return names


@pytest.mark.parametrize("module", WIDGET_MODULES)
def test_every_widget_the_module_uses_exists_in_its_ui(module):
    used = ui_names_used(REPO / module / f"{module}.py")
    widgets = ui_widgets(module)
    assert used, "the widget uses no self.ui names?"
    missing = sorted(used - set(widgets))
    assert not missing, f"{module}.py uses widgets that {module}.ui lacks: {missing}"


def derived_names(tag: str) -> dict:
    return json.loads(slicer_api.NAMES_FILE.read_text())[tag]


@pytest.mark.parametrize("module", WIDGET_MODULES)
def test_widget_members_and_signals_the_module_uses_exist_on_the_qt_classes(qapp, module):
    """``self.ui.X.attr = v`` / ``self.ui.X.attr`` must be a Qt property of X's class (PythonQt maps
    properties to attributes), ``self.ui.X.method()`` a method, and ``self.ui.X.connect("sig(args)",
    slot)`` (PythonQt) a signal of that class; for a CTK/qMRML class, a member its header declares
    at every supported release (or one of its Qt base class's)."""
    from PySide6 import QtWidgets

    widgets = ui_widgets(module)
    declared = {cls: set.intersection(*(set(derived_names(tag).get(f"widget:{cls}", {})) for tag in slicer_api.TAGS))
                for cls in slicer_api.WIDGET_HEADERS}
    problems = []
    for node in ast.walk(parse(REPO / module / f"{module}.py")):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and slicer_api.dotted(node.value.value) == "self.ui"):
            continue
        name, member = node.value.attr, node.attr
        cls_name = widgets.get(name)
        cls = getattr(QtWidgets, cls_name, None)
        if cls is None:
            base = slicer_api.WIDGET_HEADERS[cls_name][2]
            if member not in declared[cls_name] and not slicer_api.qt_member(member, base):
                problems.append(f"{name} ({cls_name}).{member}: not declared by {cls_name}")
            continue
        meta = cls.staticMetaObject
        if member == "connect":
            continue  # the signal is checked below
        if meta.indexOfProperty(member) < 0 and not callable(getattr(cls, member, None)):
            problems.append(f"{name} ({cls_name}) has no property or method {member}")
    for node in ast.walk(parse(REPO / module / f"{module}.py")):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                and isinstance(node.func.value, ast.Attribute) and slicer_api.dotted(node.func.value.value) == "self.ui"):
            name = node.func.value.attr
            signal = node.args[0].value
            cls = getattr(QtWidgets, widgets[name], None)
            if cls is None:
                if signal.split("(")[0] not in declared[widgets[name]]:
                    problems.append(f"{name} ({widgets[name]}) declares no signal {signal}")
            elif cls.staticMetaObject.indexOfSignal(signal) < 0:
                problems.append(f"{name} ({widgets[name]}) has no signal {signal}")
    assert not problems, problems


def parameter_fields(module: str) -> dict[str, str]:
    """name -> annotation source of the @parameterNodeWrapper class of the module."""
    tree = parse(REPO / module / f"{module}.py")
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(slicer_api.dotted(d) == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
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


@pytest.mark.parametrize("module", WIDGET_MODULES)
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


# --- (3) Slicer APIs: declared in Slicer's source at the supported tags, and real in slicer-core ------


def test_every_slicer_name_the_modules_use_is_declared_at_every_supported_release():
    """slicer_api_names.json holds what slicer_api.py derived from Slicer's source; a name used now
    but not there was not checked against it: run slicer_api.py on the fetched sources."""
    derived = json.loads(slicer_api.NAMES_FILE.read_text())
    assert derived["sources"]["Slicer/Slicer"] == list(slicer_api.TAGS) == ["v5.10.0", "v5.12.3"]
    problems = []
    for category, names in slicer_api.used_names().items():
        for name, keywords in names.items():
            if category == "vtk":
                continue  # VTK's own methods: checked against the vtk wheel below
            if category == "PyTorchUtilsLogic":
                declared = [derived["PyTorchUtilsLogic"]]
            else:
                tags = slicer_api.TAGS[-1:] if category in slicer_api.GUARDED else slicer_api.TAGS
                declared = [derived[tag].get(category, {}) for tag in tags]
            for names_at_tag in declared:
                if name not in names_at_tag or not set(keywords) <= set(names_at_tag[name]):
                    problems.append(f"{category}: {name}({', '.join(keywords)})")
    assert not problems, "not checked against Slicer's source (run Testing/extension/slicer_api.py): " + \
        ", ".join(sorted(set(problems)))


def test_the_names_slicer_core_can_show_exist_in_slicers_real_code():
    import slicer
    import slicer.util
    from vtkmodules import vtkCommonCore, vtkCommonDataModel, vtkCommonMath, vtkCommonTransforms

    classes = [getattr(slicer, n) for n in dir(slicer) if n.startswith("vtk")]
    classes += [vtkCommonMath.vtkMatrix4x4, vtkCommonCore.vtkObject, vtkCommonCore.vtkDataArray,
                vtkCommonCore.vtkStringArray, vtkCommonDataModel.vtkTable, vtkCommonDataModel.vtkImageData, vtkCommonDataModel.vtkDataSetAttributes,
                vtkCommonTransforms.vtkGeneralTransform]
    used = slicer_api.used_names()
    assert set(used["slicer.util"]) <= set(dir(slicer.util))
    assert all(hasattr(slicer, name) for name in used["slicer"])
    missing = [m for category in ("mrml", "vtk") for m in used.get(category, {})
               if not any(hasattr(c, m) for c in classes)]
    assert not missing, f"methods no real MRML/VTK class has: {missing}"
    logics = {"segmentations": slicer.vtkSlicerSegmentationsModuleLogic}
    for module, logic in logics.items():
        assert all(hasattr(logic, m) for m in used.get(f"logic:{module}", {}))


# --- (4) module folders as Slicer's module factory sees them -------------------------------------


@pytest.mark.parametrize("module", MODULES)
def test_every_top_level_python_file_of_a_module_folder_is_a_module(module):
    """qSlicerScriptedLoadableModuleFactory registers every top-level *.py of a module folder and
    logs "class X was not found" for one that defines no class X: helpers belong in a package."""
    for path in (REPO / module).glob("*.py"):
        classes = {n.name: n for n in parse(path).body if isinstance(n, ast.ClassDef)}
        assert path.stem in classes, f"{path.relative_to(REPO)} defines no class {path.stem}"
        assert "ScriptedLoadableModule" in {slicer_api.dotted(b) for b in classes[path.stem].bases}


def test_no_module_imports_from_the_other_modules_folder_and_the_client_from_neither():
    owners = {"VoCoSegmentationLib": "VoCoSegmentation", "VoCoPretrainLib": "VoCoPretrain",
              "VoCoSegmentation": "VoCoSegmentation", "VoCoPretrain": "VoCoPretrain"}
    for module in MODULES:
        for path in module_py_files(module):
            for node in ast.walk(parse(path)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in names:
                    owner = owners.get(name.split(".")[0])
                    assert owner in (None, module), f"{path.relative_to(REPO)} imports {name} from {owner}"


def test_both_modules_depend_on_the_hidden_common_module():
    for module in WIDGET_MODULES:
        source = (REPO / module / f"{module}.py").read_text()
        assert re.search(r'self\.parent\.dependencies = \["VoCoCommon"\]', source), module
    common = (REPO / "VoCoCommon" / "VoCoCommon.py").read_text()
    assert "self.parent.hidden = True" in common


# --- (5) CMake lists, resources and the ExtensionsIndex entry ------------------------------------


def cmake_list(text: str, variable: str, module: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    if not match:
        return []
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
    resource_files = {p.relative_to(folder).as_posix() for p in (folder / "Resources").rglob("*") if p.is_file()} \
        if (folder / "Resources").is_dir() else set()
    assert set(resources) == resource_files
    assert "slicerMacroBuildScriptedModule(" in text
    if module in WIDGET_MODULES:
        assert {f"Resources/UI/{module}.ui", f"Resources/Icons/{module}.png"} <= set(resources)
        assert "WITH_GENERIC_TESTS" in text
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
    for path in [REPO / "Resources/Icons/VoCo.png"] + [REPO / m / f"Resources/Icons/{m}.png" for m in WIDGET_MODULES]:
        header = path.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(header[16:20], "big") == int.from_bytes(header[20:24], "big") == 128, path


def test_pip_requirements_are_the_engine_dependencies_without_torch():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib is Python 3.11+")

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


# --- (6) module files: structure, and the engine stays out of Slicer's process -----------------


@pytest.mark.parametrize("module", WIDGET_MODULES)
def test_module_file_has_the_four_classes_and_a_runnable_self_test(module):
    tree = parse(REPO / module / f"{module}.py")
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for suffix, base in (("", "ScriptedLoadableModule"), ("Widget", "ScriptedLoadableModuleWidget"),
                         ("Logic", "ScriptedLoadableModuleLogic"), ("Test", "ScriptedLoadableModuleTest")):
        cls = classes.get(module + suffix)
        assert cls is not None, f"{module}{suffix} missing"
        assert base in {slicer_api.dotted(b) for b in cls.bases}
    test_methods = {n.name for n in classes[module + "Test"].body if isinstance(n, ast.FunctionDef)}
    assert "runTest" in test_methods and any(m.startswith("test_") for m in test_methods)
    source = (REPO / module / f"{module}.py").read_text()
    assert f'resourcePath("UI/{module}.ui")' in source and "childWidgetVariables" in source
    assert "qt.QTimer" in source and "tryWithErrorDisplay" in source
    calls = {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert not calls & {"skipTest", "addCleanup"}  # Reload and Test runs runTest() directly: neither would work
    categories = re.search(r"self\.parent\.categories = \[translate\(\"qSlicerAbstractCoreModule\", (\".*?\")\)\]",
                           source).group(1)
    assert [ast.literal_eval(categories)] == CATEGORIES[module]


def test_no_module_file_imports_the_engine():
    for path in slicer_api.module_files():  # all but the environment probe, which the engine's Python runs
        for node in ast.walk(parse(path)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                assert name.split(".")[0] not in ("voco", "torch", "monai", "nrrd"), \
                    f"{path.relative_to(REPO)}:{node.lineno} imports {name} into Slicer's process"


# --- (6) the conventions Slicer users expect -----------------------------------------------------

def test_every_terminology_code_of_the_shipped_models_is_in_slicers_lists_at_every_release():
    """Each coded label (type, modifier, anatomic region) is a code of the Slicer terminology
    context it names, as Slicer ships it at each supported tag (derived into slicer_api_names.json)."""
    derived = json.loads(slicer_api.NAMES_FILE.read_text())
    used = slicer_api.used_terminology()
    assert len(used) >= 18  # the VoComni labels: 18 of 20 have a code in Slicer's lists
    for tag in slicer_api.TAGS:
        assert set(used) <= set(derived[tag]["terminology"]), tag


def test_segments_get_slicers_terminology_entry_string_with_modifier_and_region():
    from VoCoSegmentationLib.results import terminology_entry

    registry = json.loads((REPO / "Resources" / "models.json").read_text())
    labels = {label["name"]: label for label in registry["label_sets"]["vocomni"]}
    left_kidney = terminology_entry(labels["left kidney"]["terminology"]).split("~")
    assert left_kidney == ["Segmentation category and type - 3D Slicer General Anatomy list",
                           "SCT^123037004^Anatomical Structure", "SCT^64033007^Kidney", "SCT^7771000^Left",
                           "Anatomic codes - DICOM master list", "^^", "^^"]
    liver_tumor = terminology_entry(labels["liver tumor"]["terminology"]).split("~")
    assert liver_tumor[:3] == ["Segmentation category and type - DICOM master list",
                               "SCT^49755003^Morphologically Altered Structure", "SCT^108369006^Neoplasm"]
    assert liver_tumor[5] == "SCT^10200004^Liver"
    assert terminology_entry(labels["COVID-19 lesion"]["terminology"]) is None


@pytest.mark.parametrize("module", MODULES)
def test_user_facing_texts_are_translatable(module):
    """Titles, help and acknowledgements go through Slicer's ``_()`` (slicer.i18n.tr, which lupdate
    reads), categories through ``translate("qSlicerAbstractCoreModule", ...)`` as Slicer's own modules do."""
    tree = parse(REPO / module / f"{module}.py")
    assigned = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute) and \
                slicer_api.dotted(node.targets[0].value) == "self.parent":
            assigned[node.targets[0].attr] = ast.unparse(node.value)
    assert assigned["title"].startswith("_(")
    assert assigned["categories"].startswith("[translate('qSlicerAbstractCoreModule', ")
    assert "_(" in assigned["helpText"] and "acknowledgementText()" in assigned["acknowledgementText"]
    messages = [ast.unparse(n.args[0]) for n in ast.walk(tree) if isinstance(n, ast.Call)
                and slicer_api.dotted(n.func) == "slicer.util.tryWithErrorDisplay"]
    assert all(message.startswith("_(") for message in messages), messages


def test_help_and_acknowledgement_say_what_the_modules_do_and_cite_voco():
    common = (REPO / "VoCoCommon" / "VoCoCommon.py").read_text()
    assert "CVPR 2024" in common and "arXiv:2410.09890" in common and "Please cite VoCo" in common
    segmentation = (REPO / "VoCoSegmentation" / "VoCoSegmentation.py").read_text()
    assert "VoComni" in segmentation and "Add to training set" in segmentation
    assert "Fine-tune a segmentation model" in (REPO / "VoCoPretrain" / "VoCoPretrain.py").read_text()


def test_license_txt_at_the_root_is_the_one_pyproject_names():
    license_text = (REPO / "LICENSE.txt").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()


def test_the_sample_volumes_offered_in_slicer_are_in_the_engines_catalogue(engine):
    import subprocess

    from VoCoCommonLib.samples import SAMPLES

    listed = subprocess.run([engine.python, "-m", "voco", "samples", "list", "--progress", "jsonl"], env=engine.env,
                            capture_output=True, text=True, timeout=300, cwd=REPO)  # the engine's Python: torch is there
    assert listed.returncode == 0, listed.stderr
    catalogue = {sample["name"]: sample["modality"] for sample in json.loads(listed.stdout)["samples"]}
    assert [catalogue[sample.engine_name] for sample in SAMPLES] == ["ct", "mri", "mri"]
