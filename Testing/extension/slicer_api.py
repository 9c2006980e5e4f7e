"""The Slicer API names the modules use, and the same names as Slicer's own source declares them at
the supported release tags.

``used_names()`` reads the modules' files (AST): every ``slicer.util`` / ``slicer.packaging``
function with the keyword arguments it is called with, ``slicer.i18n`` functions, the SampleData
module's logic methods, ``slicer.mrmlScene`` and ``slicer.app``
members, ``slicer.X`` classes, the ScriptedLoadableModule and parameterNodeWrapper names, the
capitalised (VTK/MRML) methods called, the module logics called through ``slicer.modules``,
the members the widgets use of their CTK/qMRML widget classes, and PyTorchUtils.

``python slicer_api.py SLICER_GIT CTK_GIT PYTORCH_GIT`` (git folders from the search tool's
``fetch`` of Slicer/Slicer, commontk/CTK and fepegar/SlicerPyTorch) derives, at each tag in
``TAGS``, which of those names Slicer's source declares, and writes ``slicer_api_names.json``:
names only, no code. It fails, naming them, when a used name is declared nowhere. The test
(test_extension_files.py) checks that every name used now is in that file for every tag, so a
new call is checked against Slicer's source before it lands.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAMES_FILE = Path(__file__).with_name("slicer_api_names.json")
TAGS = ("v5.10.0", "v5.12.3")
MODULE_FOLDERS = ("VoCoCommon", "VoCoSegmentation", "VoCoPretrain")
ENGINE_SIDE = {"environment_probe.py"}  # run by the engine's interpreter, not by Slicer
# Where Slicer declares the MRML / logic classes the modules call (C++ headers).
MRML_HEADER_FOLDERS = ("Libs/MRML/Core", "Libs/MRML/Logic", "Libs/vtkSegmentationCore", "Base/Logic",
                       "Modules/Loadable/Segmentations/Logic", "Modules/Loadable/Segmentations/MRML",
                       "Modules/Loadable/Markups/MRML", "Modules/Loadable/Volumes/Logic",
                       "Modules/Loadable/Plots/Logic", "Modules/Loadable/Colors/Logic",
                       "Modules/Loadable/Terminologies/Logic", "Modules/Loadable/Tables/Logic")
WIDGET_HEADERS = {"qMRMLNodeComboBox": ("slicer", "Libs/MRML/Widgets/qMRMLNodeComboBox.h", "QWidget"),
                  "qMRMLWidget": ("slicer", "Libs/MRML/Widgets/qMRMLWidget.h", "QWidget"),
                  "ctkCollapsibleButton": ("ctk", "Libs/Widgets/ctkCollapsibleButton.h", "QAbstractButton"),
                  "ctkPathLineEdit": ("ctk", "Libs/Widgets/ctkPathLineEdit.h", "QWidget")}
# Used only where present: dependencies.py imports slicer.packaging in a try and checks hasattr (5.12+).
GUARDED = {"slicer.packaging"}
LOGIC_HEADERS = {"segmentations": "Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic.h",
                 "plots": "Modules/Loadable/Plots/Logic/vtkSlicerPlotsLogic.h"}
APP_HEADERS = ("Base/QTCore/qSlicerCoreApplication.h", "Base/QTGUI/qSlicerApplication.h")


# --- what the modules use ----------------------------------------------------------------------

def module_files() -> list[Path]:
    return sorted(p for folder in MODULE_FOLDERS for p in (REPO / folder).rglob("*.py")
                  if "__pycache__" not in p.parts and p.name not in ENGINE_SIDE)


def dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _ui_widget_classes() -> dict[str, dict[str, str]]:
    import xml.etree.ElementTree as ET

    classes = {}
    for ui in REPO.glob("VoCo*/Resources/UI/*.ui"):
        root = ET.parse(ui).getroot()
        classes[ui.stem] = {w.get("name"): w.get("class") for w in root.iter("widget")}
    return classes


def qt_member(name: str, qt_class: str = "QWidget") -> bool:
    """A member of a Qt class (Qt's own, checked against Qt: PySide6), or PythonQt's ``connect``."""
    from PySide6 import QtWidgets

    cls = getattr(QtWidgets, qt_class)
    return name == "connect" or cls.staticMetaObject.indexOfProperty(name) >= 0 or hasattr(cls, name)


def vtk_member(name: str) -> bool:
    """A method of a VTK class the modules use (VTK's own, checked against the vtk wheel)."""
    from vtkmodules import vtkCommonCore, vtkCommonDataModel

    return any(hasattr(cls, name) for cls in (vtkCommonCore.vtkObject, vtkCommonCore.vtkDataArray,
                                                vtkCommonCore.vtkStringArray, vtkCommonDataModel.vtkImageData,
                                                vtkCommonDataModel.vtkTable, vtkCommonDataModel.vtkDataSetAttributes))


def used_names() -> dict:
    """{category: {name: sorted keyword names}} of what the modules' files use of Slicer."""
    used: dict = defaultdict(lambda: defaultdict(set))
    widgets = _ui_widget_classes()
    for path in module_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = {"Path"}
        aliases = {}  # local name -> dotted Slicer module (import slicer.packaging as packaging)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    imported.add((alias.asname or alias.name).split(".")[0])
                    if alias.name.startswith("slicer.") and alias.asname:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    imported.add(alias.asname or alias.name)
                    if node.module in ("slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "slicer.util",
                                       "slicer.i18n"):
                        used[node.module][alias.name]
                    elif node.module == "slicer" and alias.name.startswith(("vtk", "q")):
                        used["slicer"][alias.name]
        ui_classes = widgets.get(path.stem, {})
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = dotted(node.func)
                keywords = {k.arg for k in node.keywords if k.arg}
                if name:
                    parts = name.split(".")
                    if parts[0] in aliases:
                        parts = aliases[parts[0]].split(".") + parts[1:]
                    if parts[:2] in (["slicer", "util"], ["slicer", "packaging"]) and len(parts) == 3:
                        used[".".join(parts[:2])][parts[2]] |= keywords
                    elif parts[0] == "SampleData" and len(parts) == 3:
                        used["SampleData"][".".join(parts[1:])] |= keywords
                if isinstance(node.func, ast.Attribute):
                    method, base = node.func.attr, dotted(node.func.value)
                    owner = ui_classes.get(base.split(".")[2], "") if base and base.startswith("self.ui.") else ""
                    if method == "connect" and owner in WIDGET_HEADERS and node.args:
                        used[f"widget:{owner}"][node.args[0].value.split("(")[0]]
                    logic = re.fullmatch(r"slicer\.modules\.(\w+)\.logic\(\)", ast.unparse(node.func.value))
                    if logic:
                        used[f"logic:{logic.group(1)}"][method] |= keywords
                    elif method == "installTorch":
                        used["PyTorchUtilsLogic"][method] |= keywords
                    elif method[:1].isupper() and not (base and (base in imported and base != "slicer.mrmlScene"
                                                                 or base.split(".")[0] in ("qt", "ctk"))):
                        used["vtk" if vtk_member(method) else "mrml"][method]
            if isinstance(node, ast.Attribute):
                name = dotted(node)
                if not name:
                    continue
                parts = name.split(".")
                if parts[:2] == ["slicer", "mrmlScene"] and len(parts) >= 3:
                    used["mrml"][parts[2]]
                elif parts[:2] == ["slicer", "app"] and len(parts) >= 3 and not qt_member(parts[2], "QApplication"):
                    used["slicer.app"][parts[2]]
                elif parts[0] == "slicer" and len(parts) >= 2 and parts[1].startswith(("vtk", "q")):
                    used["slicer"][parts[1]]
                elif parts[0] == "ctk" and len(parts) >= 2 and parts[1].startswith("ctk"):
                    used[f"widget:{parts[1]}"].update({p: set() for p in parts[2:3]})
                elif parts[:2] == ["self", "ui"] and len(parts) >= 4:
                    cls = ui_classes.get(parts[2], "")
                    if cls in WIDGET_HEADERS and not qt_member(parts[3], WIDGET_HEADERS[cls][2]):
                        used[f"widget:{cls}"][parts[3]]
    # the .ui files' own bindings of the qMRML/CTK widgets (properties and the scene connection)
    import xml.etree.ElementTree as ET

    for ui in REPO.glob("VoCo*/Resources/UI/*.ui"):
        root = ET.parse(ui).getroot()
        for widget in root.iter("widget"):
            if widget.get("class") in WIDGET_HEADERS:
                for prop in widget.findall("property"):
                    if prop.get("stdset") != "0" and not qt_member(prop.get("name"),
                                                                   WIDGET_HEADERS[widget.get("class")][2]):
                        used[f"widget:{widget.get('class')}"][prop.get("name")]
        for connection in root.iter("connection"):
            for role, member in (("sender", "signal"), ("receiver", "slot")):
                owner = root.find(f".//widget[@name='{connection.findtext(role)}']")
                if owner is not None and owner.get("class") in WIDGET_HEADERS:
                    used[f"widget:{owner.get('class')}"][connection.findtext(member).split("(")[0]]
    return {category: {name: sorted(kw) for name, kw in names.items()} for category, names in used.items()}


TERMINOLOGY_FILES = {  # context name -> Slicer's file of it (Modules/Loadable/Terminologies/Resources)
    "Segmentation category and type - 3D Slicer General Anatomy list":
        "SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json",
    "Segmentation category and type - DICOM master list": "SegmentationCategoryTypeModifier-DICOM-Master.json",
    "Anatomic codes - DICOM master list": "AnatomicRegionAndModifier-DICOM-Master.json",
}
DEFAULT_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def terminology_key(term: dict) -> str:
    """One label's codes as ``context|category|type|modifier|region`` (scheme:code each)."""
    def code(entry):
        return f"{entry['scheme']}:{entry['code']}" if entry else ""

    category = term.get("category") or {"scheme": "SCT", "code": "123037004"}
    return "|".join([term.get("context") or DEFAULT_CONTEXT, code(category), code(term), code(term.get("modifier")),
                     code(term.get("region"))])


def used_terminology() -> list[str]:
    """The terminology codes of the shipped registry's labels."""
    registry = json.loads((REPO / "Resources" / "models.json").read_text())
    labels = [label for labels in registry.get("label_sets", {}).values() for label in labels]
    labels += [label for entry in registry["models"] if isinstance(entry.get("labels"), list) for label in entry["labels"]]
    return sorted({terminology_key(label["terminology"]) for label in labels if label.get("terminology")})


def declared_terminology(slicer_git, tag) -> set[str]:
    """Every context|category|type|modifier| and the anatomic regions (||||region) Slicer ships at ``tag``."""
    keys = set()
    for context, file in TERMINOLOGY_FILES.items():
        values = json.loads(git_show(slicer_git, tag, f"Modules/Loadable/Terminologies/Resources/{file}"))
        for category in values.get("SegmentationCodes", {}).get("Category", []):
            for kind in category.get("Type", []):
                for modifier in [None] + kind.get("Modifier", []):
                    keys.add("|".join([context, f"{category['CodingSchemeDesignator']}:{category['CodeValue']}",
                                       f"{kind['CodingSchemeDesignator']}:{kind['CodeValue']}",
                                       f"{modifier['CodingSchemeDesignator']}:{modifier['CodeValue']}" if modifier
                                       else "", ""]))
        for region in values.get("AnatomicCodes", {}).get("AnatomicRegion", []):
            keys.add(f"{context}||||{region['CodingSchemeDesignator']}:{region['CodeValue']}")
    return keys


def terminology_known(key: str, declared: set[str]) -> bool:
    """A label's codes exist in Slicer's lists: its type (with modifier) and, if any, its region."""
    *kind, region = key.split("|")
    return "|".join(kind + [""]) in declared and (not region or f"{ANATOMIC_CONTEXT}||||{region}" in declared)


# --- what Slicer's source declares ---------------------------------------------------------------

def git_show(git_dir, ref, path) -> str | None:
    done = subprocess.run(["git", "-C", str(git_dir), "show", f"{ref}:{path}"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def git_files(git_dir, ref, folder) -> list[str]:
    done = subprocess.run(["git", "-C", str(git_dir), "ls-tree", "-r", "--name-only", ref, folder],
                          capture_output=True, text=True)
    return done.stdout.split()


def python_defs(text: str | None) -> dict[str, list[str]]:
    """Top-level functions and classes (and their methods) of a Python file, with parameter names."""
    if not text:
        return {}
    defs = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef):
            args = node.args
            defs[node.name] = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        elif isinstance(node, ast.ClassDef):
            defs[node.name] = []
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    defs[f"{node.name}.{item.name}"] = [a.arg for a in item.args.args + item.args.kwonlyargs]
    return defs


_MACROS = {  # VTK macros that declare accessors: name -> (prefix, suffix) of each method they make
    "vtkGetMacro": [("Get", "")], "vtkSetMacro": [("Set", "")], "vtkGetObjectMacro": [("Get", "")],
    "vtkSetObjectMacro": [("Set", "")], "vtkGetStringMacro": [("Get", "")], "vtkSetStringMacro": [("Set", "")],
    "vtkBooleanMacro": [("", "On"), ("", "Off")], "vtkGetVector3Macro": [("Get", "")],
    "vtkSetVector3Macro": [("Set", "")], "vtkGetVectorMacro": [("Get", "")], "vtkSetVectorMacro": [("Set", "")],
    "vtkSetClampMacro": [("Set", "")], "vtkGetEnumMacro": [("Get", "")], "vtkSetEnumMacro": [("Set", "")],
    "vtkMRMLCopyBeginMacro": [],
}


def header_names(text: str) -> set[str]:
    """Identifiers a C++ header declares as methods, properties, signals or slots."""
    names = set(re.findall(r"\b([A-Za-z_]\w*)\s*\(", text))
    names |= set(re.findall(r"Q_PROPERTY\(\s*[\w:<>*]+\s+(\w+)", text))
    for body in re.findall(r"\benum\s+\w*\s*\{([^}]*)\}", text):
        names |= set(re.findall(r"\b([A-Z]\w*)\b", body))
    for macro, accessors in _MACROS.items():
        for name in re.findall(rf"\b{macro}\s*\(\s*(\w+)", text):
            names |= {f"{prefix}{name}{suffix}" for prefix, suffix in accessors}
    return names


def header_classes(text: str) -> set[str]:
    return set(re.findall(r"\bclass\s+(?:\w+_EXPORT\s+)?(\w+)\s*(?::|\{)", text))


def derive(slicer_git, ctk_git, pytorch_git) -> dict:
    used = used_names()
    out = {"sources": {"Slicer/Slicer": list(TAGS), "commontk/CTK": {}, "fepegar/SlicerPyTorch": None}}
    missing = []
    for tag in TAGS:
        ctk_ref = re.search(r"[0-9a-f]{40}", git_show(slicer_git, tag, "SuperBuild/External_CTK.cmake")).group(0)
        out["sources"]["commontk/CTK"][tag] = ctk_ref
        python = {
            "slicer.util": python_defs(git_show(slicer_git, tag, "Base/Python/slicer/util.py")),
            "slicer.packaging": python_defs(git_show(slicer_git, tag, "Base/Python/slicer/packaging.py")),
            "slicer.ScriptedLoadableModule": python_defs(git_show(slicer_git, tag,
                                                                  "Base/Python/slicer/ScriptedLoadableModule.py")),
            "slicer.i18n": python_defs(git_show(slicer_git, tag, "Base/Python/slicer/i18n.py")),
            "SampleData": python_defs(git_show(slicer_git, tag, "Modules/Scripted/SampleData/SampleData.py")),
        }
        wrapper = {}
        for name in git_files(slicer_git, tag, "Base/Python/slicer/parameterNodeWrapper"):
            wrapper.update(python_defs(git_show(slicer_git, tag, name)))
        python["slicer.parameterNodeWrapper"] = wrapper
        mrml, classes = set(), set()
        for folder in MRML_HEADER_FOLDERS + ("Libs/MRML/Widgets",):
            for name in git_files(slicer_git, tag, folder):
                if name.endswith(".h"):
                    text = git_show(slicer_git, tag, name)
                    classes |= header_classes(text)
                    if not name.startswith("Libs/MRML/Widgets"):
                        mrml |= header_names(text)
        app = set()
        for name in APP_HEADERS:
            app |= header_names(git_show(slicer_git, tag, name))
        widgets = {}
        for cls, (where, path, _) in WIDGET_HEADERS.items():
            text = git_show(slicer_git if where == "slicer" else ctk_git, tag if where == "slicer" else ctk_ref, path)
            widgets[cls] = header_names(text)
        logics = {module: header_names(git_show(slicer_git, tag, path)) for module, path in LOGIC_HEADERS.items()}
        found = defaultdict(dict)
        for category, names in used.items():
            for name, keywords in names.items():
                if category in python:
                    declared = python[category].get(name)
                    ok = declared is not None and set(keywords) <= set(declared) | {"kwargs"}
                elif category == "slicer":
                    ok = name in classes
                elif category == "slicer.app":
                    ok = name in app
                elif category == "mrml":
                    ok = name in mrml
                elif category.startswith("widget:"):
                    ok = name in widgets[category.split(":")[1]]
                elif category.startswith("logic:"):
                    ok = name in logics.get(category.split(":")[1], set())
                else:  # "vtk": VTK's own, not Slicer's; "PyTorchUtilsLogic": below
                    continue
                if ok:
                    found[category][name] = keywords
                elif not (category in GUARDED and tag != TAGS[-1]):
                    missing.append(f"{tag} {category} {name} {keywords}")
        declared = declared_terminology(slicer_git, tag)
        found["terminology"] = {key: [] for key in used_terminology() if terminology_known(key, declared)}
        missing += [f"{tag} terminology {key}" for key in used_terminology() if key not in found["terminology"]]
        out[tag] = dict(found)
    ref = subprocess.run(["git", "-C", str(pytorch_git), "rev-parse", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    out["sources"]["fepegar/SlicerPyTorch"] = ref
    torch_defs = python_defs(git_show(pytorch_git, ref, "PyTorchUtils/PyTorchUtils.py"))
    out["PyTorchUtilsLogic"] = {}
    for name, keywords in used.get("PyTorchUtilsLogic", {}).items():
        declared = torch_defs.get(f"PyTorchUtilsLogic.{name}")
        if declared is not None and set(keywords) <= set(declared):
            out["PyTorchUtilsLogic"][name] = keywords
        else:
            missing.append(f"PyTorchUtils {name} {keywords}")
    if missing:
        raise SystemExit("declared nowhere in the sources:\n  " + "\n  ".join(missing))
    return out


if __name__ == "__main__":
    NAMES_FILE.write_text(json.dumps(derive(*sys.argv[1:4]), indent=1, sort_keys=True) + "\n")
    print(f"wrote {NAMES_FILE}")
