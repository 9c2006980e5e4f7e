"""A PythonQt-compatible ``qt`` (and ``ctk``) on PySide6, so that the Slicer modules' widget code
runs in tests unchanged, and every call it makes on the GUI thread is timed.

Slicer's ``qt`` is PythonQt, which differs from PySide in what widget code relies on:

- Qt properties are Python attributes, read and written (``button.enabled = False``,
  ``combo.count`` is an int); methods stay methods (``setVisible``); ``obj.name`` is the object
  name; other attributes set on a wrapper stay on it (one wrapper per object).
- ``obj.connect("clicked(bool)", slot)`` connects by signature; here an unknown signature raises.
- a slot gets as many of the signal's arguments as it accepts.
- ``QFileDialog.getOpenFileName`` returns the path alone.

``install(app)`` puts this ``qt`` and ``ctk`` into ``sys.modules``. Every QObject the widget code
gets is a ``PythonQtObject`` over the PySide6 one. The CTK / qMRML widgets the ``.ui`` files name
are stand-ins (``slicer_widgets.py``); the file dialogs and QDesktopServices are stand-ins that
tests answer. ``CLOCK`` records the wall and CPU time of every slot call (signals, timers).
"""

from __future__ import annotations

import gc
import inspect
import os
import re
import sys
import time
import types
import weakref
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets  # noqa: E402

_PROXIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# --- the GUI-thread clock ----------------------------------------------------------------------

@dataclass
class Call:
    label: str
    wall_s: float
    cpu_s: float  # this thread's CPU time: what the call itself cost, whatever else the machine did
    gc_s: float = 0.0  # of cpu_s, the cyclic garbage collector's, which scans the whole process's heap


@dataclass
class GuiClock:
    """Every call made on the GUI thread through a signal, a timer or ``measure``."""

    calls: list = field(default_factory=list)
    errors: list = field(default_factory=list)   # (label, exception) raised out of a slot

    def measure(self, label: str, function, *args):
        start, cpu, collected = time.perf_counter(), time.thread_time(), _COLLECTOR.cpu_s
        try:
            return function(*args)
        except Exception as exc:  # Qt would print it and go on; tests look at it
            self.errors.append((label, exc))
            return None
        finally:
            self.calls.append(Call(label, time.perf_counter() - start, time.thread_time() - cpu,
                                   _COLLECTOR.cpu_s - collected))

    def longest(self, by: str = "cpu_s") -> Call | None:
        return max(self.calls, key=lambda c: getattr(c, by), default=None)

    def reset(self) -> None:
        self.calls.clear()
        self.errors.clear()


class _CollectorTime:
    """The CPU time the cyclic garbage collector has spent, so a call's share of it is reported."""

    def __init__(self):
        self.cpu_s, self._started = 0.0, 0.0
        gc.callbacks.append(self._phase)

    def _phase(self, phase: str, _info) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.cpu_s += time.thread_time() - self._started


_COLLECTOR = _CollectorTime()
CLOCK = GuiClock()


def _label(slot) -> str:
    return getattr(slot, "__qualname__", None) or repr(slot)


def _accepts(slot) -> int | None:
    """How many positional arguments ``slot`` takes (None: any number)."""
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)


def timed_slot(slot):
    """``slot`` as PythonQt calls it (only the arguments it takes), timed by CLOCK."""
    count = _accepts(slot)
    label = _label(slot)

    def call(*args):
        args = tuple(wrap(a) for a in args)
        return CLOCK.measure(label, slot, *(args if count is None else args[:count]))

    call.slot = slot
    return call


# --- wrapping ----------------------------------------------------------------------------------

def wrap(value):
    if isinstance(value, PythonQtObject):
        return value
    if isinstance(value, QtCore.QObject):
        proxy = _PROXIES.get(value)
        if proxy is None:
            proxy = _PROXIES[value] = PythonQtObject(value)
        return proxy
    if isinstance(value, list):
        return [wrap(v) for v in value]
    return value


def unwrap(value):
    if isinstance(value, PythonQtObject):
        return value.qobject
    if isinstance(value, (list, tuple)):
        return type(value)(unwrap(v) for v in value)
    return value


def _signature(text: str) -> tuple[str, list[str]]:
    match = re.fullmatch(r"\s*(\w+)\s*\((.*)\)\s*", text)
    if not match:
        raise ValueError(f"not a Qt signal signature: {text!r}")
    args = [a.strip() for a in match.group(2).split(",") if a.strip()]
    return match.group(1), args


class SignalProxy:
    def __init__(self, signal):
        self._signal = signal
        self._connected = {}

    def connect(self, slot):
        call = timed_slot(slot)
        self._connected[slot] = call
        self._signal.connect(call)

    def disconnect(self, slot=None):
        if slot is None:
            self._signal.disconnect()
        else:
            self._signal.disconnect(self._connected.pop(slot))

    def emit(self, *args):
        self._signal.emit(*unwrap(args))


class MethodProxy:
    def __init__(self, method):
        self._method = method

    def __call__(self, *args, **kwargs):
        return wrap(self._method(*unwrap(args), **{k: unwrap(v) for k, v in kwargs.items()}))


class PythonQtObject:
    """A PySide6 QObject seen the PythonQt way (see the module docstring)."""

    def __init__(self, qobject):
        object.__setattr__(self, "qobject", qobject)
        object.__setattr__(self, "_extras", {})
        object.__setattr__(self, "_signals", {})

    def __getattr__(self, name):
        qobject = object.__getattribute__(self, "qobject")
        extras = object.__getattribute__(self, "_extras")
        if name in extras:
            return extras[name]
        if name == "name":
            return qobject.objectName()
        if qobject.metaObject().indexOfProperty(name) >= 0:
            return wrap(qobject.property(name))
        attribute = getattr(qobject, name)
        if isinstance(attribute, QtCore.SignalInstance):
            signals = object.__getattribute__(self, "_signals")
            return signals.setdefault(name, SignalProxy(attribute))
        if callable(attribute):
            return MethodProxy(attribute)
        return wrap(attribute)

    def __setattr__(self, name, value):
        qobject = self.qobject
        if name == "name":
            qobject.setObjectName(value)
            return
        meta = qobject.metaObject()
        index = meta.indexOfProperty(name)
        if index >= 0:
            if not meta.property(index).isWritable():
                raise AttributeError(f"{type(qobject).__name__}.{name} is read-only")
            if not qobject.setProperty(name, unwrap(value)):
                raise TypeError(f"cannot set {type(qobject).__name__}.{name} to {value!r}")
            return
        self._extras[name] = value  # PythonQt keeps Python attributes on the wrapper

    def connect(self, signature, slot):
        """PythonQt's ``obj.connect("signal(args)", slot)``: the signal must exist as written."""
        name, args = _signature(signature)
        meta = self.qobject.metaObject()
        wanted = QtCore.QMetaObject.normalizedSignature(f"{name}({','.join(args)})").data().decode()
        found = meta.indexOfSignal(wanted) >= 0
        if not found:  # the stand-ins declare pointer-typed signals (vtkMRMLNode*) as PyObject
            stand_in = f"{name}({','.join('PyObject' if a.endswith('*') else a for a in args)})"
            found = meta.indexOfSignal(QtCore.QMetaObject.normalizedSignature(stand_in).data().decode()) >= 0
        if not found:
            raise AttributeError(f"{type(self.qobject).__name__} has no signal {signature}")
        getattr(self, name).connect(slot)
        return True

    def disconnect(self, signature, slot=None):
        name, _ = _signature(signature)
        getattr(self, name).disconnect(slot)

    def __eq__(self, other):
        return isinstance(other, PythonQtObject) and other.qobject is self.qobject

    def __hash__(self):
        return id(self.qobject)

    def __bool__(self):
        return True

    def __repr__(self):
        return f"<PythonQt {type(self.qobject).__name__} '{self.qobject.objectName()}'>"


class QtClass:
    """``qt.X``: calling it makes a wrapped X; its enums and static functions pass through."""

    def __init__(self, cls):
        self.cls = cls

    def __call__(self, *args, **kwargs):
        return wrap(self.cls(*unwrap(args), **kwargs))

    def __getattr__(self, name):
        return getattr(self.cls, name)


# --- stand-ins for what a test must answer -----------------------------------------------------

class FileDialogs:
    """``qt.QFileDialog`` with answers set by the test; every dialog opened is recorded."""

    answers: list = []
    opened: list = []

    @classmethod
    def getOpenFileName(cls, parent=None, caption="", directory="", filters=""):
        cls.opened.append(("getOpenFileName", caption, filters))
        return cls.answers.pop(0) if cls.answers else ""

    @classmethod
    def getExistingDirectory(cls, parent=None, caption="", directory=""):
        cls.opened.append(("getExistingDirectory", caption, ""))
        return cls.answers.pop(0) if cls.answers else ""


class DesktopServices:
    opened: list = []

    @classmethod
    def openUrl(cls, url):
        cls.opened.append(url.toLocalFile() if hasattr(url, "toLocalFile") else str(url))
        return True


# --- the .ui loader ----------------------------------------------------------------------------

class UiLoader:
    """``qt.QUiLoader``: PySide6's, with the CTK/qMRML stand-ins registered; the ``.ui``'s
    <connections> are made by signal and slot name (their C++ signatures name VTK types)."""

    def __init__(self, *args):
        self._loader = QtUiTools.QUiLoader()
        from slicer_widgets import STAND_INS

        for cls in STAND_INS:
            self._loader.registerCustomWidget(cls)

    def load(self, device, parent=None):
        device = unwrap(device)
        data = bytes(device.readAll())
        connections = ET.fromstring(data).find("connections")
        buffer = QtCore.QBuffer()
        buffer.setData(QtCore.QByteArray(re.sub(rb"<connections>.*</connections>", b"", data, flags=re.S)))
        buffer.open(QtCore.QIODevice.ReadOnly)
        widget = self._loader.load(buffer, unwrap(parent))
        if widget is None:
            return None
        for connection in connections if connections is not None else []:
            sender = self._find(widget, connection.findtext("sender"))
            receiver = self._find(widget, connection.findtext("receiver"))
            signal, _ = _signature(connection.findtext("signal"))
            slot, _ = _signature(connection.findtext("slot"))
            getattr(sender, signal).connect(getattr(receiver, slot))
        return wrap(widget)

    @staticmethod
    def _find(widget, name):
        found = widget if widget.objectName() == name else widget.findChild(QtCore.QObject, name)
        if found is None:
            raise ValueError(f".ui connection names {name!r}, which the .ui lacks")
        return found

    def errorString(self):
        return self._loader.errorString()


# --- the modules ---------------------------------------------------------------------------------

_OVERRIDES = {"QUiLoader": UiLoader, "QFileDialog": FileDialogs, "QDesktopServices": DesktopServices}


def _qt_getattr(name):
    if name in _OVERRIDES:
        return _OVERRIDES[name]
    for module in (QtWidgets, QtCore, QtGui, QtUiTools):
        if hasattr(module, name):
            value = getattr(module, name)
            if isinstance(value, type) and issubclass(value, QtCore.QObject):
                return QtClass(value)
            return value
    raise AttributeError(f"module 'qt' has no attribute {name!r}")


_NONE_KEPT = False


def _keep_none_alive() -> None:
    """PySide6 6.12 returns None from a void method without taking a reference to it (measured:
    100 calls of QLabel.setText drop None's reference count by 99). Python 3.12+, Slicer's, has an
    immortal None; on 3.11 a long widget test ran None's count down to zero and the interpreter
    aborted (none_dealloc). None is never freed anyway: give it the references PySide6 takes."""
    global _NONE_KEPT
    if sys.version_info < (3, 12) and not _NONE_KEPT:
        import ctypes

        ctypes.c_ssize_t.from_address(id(None)).value += 1 << 40  # ob_refcnt, the first field of every object
        _NONE_KEPT = True


def install() -> QtWidgets.QApplication:
    """``qt`` and ``ctk`` in sys.modules, and a QApplication (offscreen)."""
    from slicer_widgets import CTK_STAND_INS

    _keep_none_alive()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    qt = types.ModuleType("qt")
    qt.__getattr__ = _qt_getattr
    sys.modules["qt"] = qt
    ctk = types.ModuleType("ctk")
    for cls in CTK_STAND_INS:
        setattr(ctk, cls.__name__, QtClass(cls))
    sys.modules["ctk"] = ctk
    return app


def warm_up(ui_files) -> None:
    """Load each .ui once and walk its widgets: PySide6 builds a class's Python enum types on its
    first use (tens of milliseconds), a cost PythonQt in Slicer does not have, so the GUI clock
    would charge it to whichever handler touched the class first."""
    QtCore.Qt.CursorShape.WaitCursor  # noqa: B018 - the Qt namespace's enums, which slicer.util's wait cursor uses
    for path in ui_files:
        device = QtCore.QFile(str(path))
        device.open(QtCore.QIODevice.ReadOnly)
        widget = UiLoader().load(device)
        pending = [widget.qobject]
        while pending:
            pending += pending.pop().children()
        widget.qobject.deleteLater()


def process_events(seconds: float = 0.0) -> None:
    """Run Qt's event loop (timers fire) for ``seconds``."""
    app = QtWidgets.QApplication.instance()
    deadline = time.monotonic() + seconds
    while True:
        app.processEvents(QtCore.QEventLoop.AllEvents, 50)
        if time.monotonic() >= deadline:
            return
        time.sleep(0.01)
