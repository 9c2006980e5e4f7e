"""Stand-ins for the CTK and qMRML widget classes the modules' ``.ui`` files name (PySide6).

Each has the Qt properties, signals and slots of the real class that the modules, their ``.ui``
files and Slicer's parameter-node GUI connectors use, with the names read in CTK's and Slicer's
headers (ctkCollapsibleButton.h, ctkPathLineEdit.h, qMRMLNodeComboBox.h, qMRMLWidget.h). The
node combo box lists real MRML nodes of the scene it is given.
"""

from __future__ import annotations

from PySide6 import QtCore, QtWidgets


class qMRMLWidget(QtWidgets.QWidget):
    mrmlSceneChanged = QtCore.Signal(object)  # (vtkMRMLScene*)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    @QtCore.Slot(object)
    def setMRMLScene(self, scene):
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class ctkCollapsibleButton(QtWidgets.QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._text, self._collapsed = "", False

    def _get_text(self):
        return self._text

    def _set_text(self, text):
        self._text = text

    def _get_collapsed(self):
        return self._collapsed

    def _set_collapsed(self, collapsed):
        self._collapsed = bool(collapsed)

    text = QtCore.Property(str, _get_text, _set_text)
    collapsed = QtCore.Property(bool, _get_collapsed, _set_collapsed)


class ctkPathLineEdit(QtWidgets.QWidget):
    # ctkPathLineEdit::Filter (the values of QDir::Filter)
    Dirs, Files, Drives, NoSymLinks, Readable, Writable, Executable = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40
    currentPathChanged = QtCore.Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._path, self._filters = "", self.Dirs | self.Files | self.Drives

    def _get_path(self):
        return self._path

    def _set_path(self, path):
        if path != self._path:
            self._path = path
            self.currentPathChanged.emit(path)

    def _get_filters(self):
        return self._filters

    def _set_filters(self, filters):
        self._filters = int(filters)

    currentPath = QtCore.Property(str, _get_path, _set_path)
    filters = QtCore.Property(int, _get_filters, _set_filters)


class qMRMLNodeComboBox(QtWidgets.QWidget):
    currentNodeChanged = QtCore.Signal(object)  # (vtkMRMLNode*)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene, self._node, self._types = None, None, []
        self._flags = {"noneEnabled": False, "addEnabled": True, "removeEnabled": True, "renameEnabled": False,
                       "showChildNodeTypes": True, "selectNodeUponCreation": True}
        self._none_display = ""

    @QtCore.Slot(object)
    def setMRMLScene(self, scene):
        self._scene = scene
        if self._node is not None and (scene is None or scene.GetNodeByID(self._node.GetID()) is not self._node):
            self.setCurrentNode(None)

    def mrmlScene(self):
        return self._scene

    def nodes(self) -> list:
        """The scene's nodes this box offers (its node types, subclasses if showChildNodeTypes)."""
        if self._scene is None:
            return []
        found = []
        for node_type in self._types:
            for node in self._scene.GetNodesByClass(node_type):
                if self._flags["showChildNodeTypes"] or node.GetClassName() == node_type:
                    found.append(node)
        return found

    def currentNode(self):
        if self._node is not None and (self._scene is None or self._node.GetScene() is not self._scene):
            self._node = None  # removed from the scene
        return self._node

    def currentNodeID(self):
        node = self.currentNode()
        return node.GetID() if node is not None else ""

    @QtCore.Slot(object)
    def setCurrentNode(self, node):
        if node is not None and not any(node.IsA(t) for t in self._types):
            raise TypeError(f"{node.GetClassName()} is not one of {self._types}")
        if node is not self._node:
            self._node = node
            self.currentNodeChanged.emit(node)

    def setCurrentNodeID(self, node_id):
        self.setCurrentNode(self._scene.GetNodeByID(node_id) if node_id and self._scene else None)

    def _get_types(self):
        return list(self._types)

    def _set_types(self, types):
        self._types = [str(t).strip() for t in types if str(t).strip()]

    def _flag(name):  # noqa: N805 - a property factory used in the class body
        return QtCore.Property(bool, lambda self: self._flags[name], lambda self, v: self._flags.__setitem__(name, bool(v)))

    nodeTypes = QtCore.Property("QStringList", _get_types, _set_types)
    noneEnabled = _flag("noneEnabled")
    addEnabled = _flag("addEnabled")
    removeEnabled = _flag("removeEnabled")
    renameEnabled = _flag("renameEnabled")
    showChildNodeTypes = _flag("showChildNodeTypes")
    selectNodeUponCreation = _flag("selectNodeUponCreation")
    noneDisplay = QtCore.Property(str, lambda self: self._none_display,
                                  lambda self, v: setattr(self, "_none_display", v))


CTK_STAND_INS = (ctkCollapsibleButton, ctkPathLineEdit)
QMRML_STAND_INS = (qMRMLWidget, qMRMLNodeComboBox)
STAND_INS = CTK_STAND_INS + QMRML_STAND_INS
