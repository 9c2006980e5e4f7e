"""VoCo Common: the client that VoCo Segmentation and VoCo Pretrain share (a hidden module).

Its package ``VoCoCommonLib`` reaches the engine (processes, events, the runs workspace, the
volume hand-off, the environment probe, the dependency installer, the settings). Being a module
of its own, it is installed and loaded like the others, and both modules name it in their
``dependencies``; neither module imports from the other's folder. ``showChoices`` is the one
piece of widget code both modules' panels share.
"""

import logging

from slicer.ScriptedLoadableModule import ScriptedLoadableModule
from VoCoCommonLib.release import slicer_unsupported_message


class VoCoCommon(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "VoCo Common"
        self.parent.categories = ["Developer Tools"]
        self.parent.dependencies = []
        self.parent.hidden = True
        self.parent.contributors = ["VoCo for 3D Slicer developers"]
        self.parent.helpText = "The shared client of the VoCo modules: it has no panel of its own."
        self.parent.acknowledgementText = "Part of VoCo for 3D Slicer (VoCo: Wu et al., CVPR 2024)."
        unsupported = slicer_unsupported_message()
        if unsupported:
            logging.error(unsupported)


def showChoices(comboBox, choices, wanted) -> int:
    """Fill a combo box with the titles of ``choices`` (``(id, title)`` pairs) without a
    currentIndexChanged per item, and select the one whose id is ``wanted`` (else the first);
    the index selected (-1 when there is no choice)."""
    ids = [choice_id for choice_id, _ in choices]
    comboBox.blockSignals(True)
    comboBox.clear()
    for _, title in choices:
        comboBox.addItem(title)
    comboBox.currentIndex = ids.index(wanted) if wanted in ids else (0 if ids else -1)
    comboBox.blockSignals(False)
    return comboBox.currentIndex
