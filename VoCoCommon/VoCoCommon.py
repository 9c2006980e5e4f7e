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


def showChoices(comboBox, titles, index) -> None:
    """Fill a combo box with ``titles`` and select ``index``, without a currentIndexChanged per item."""
    comboBox.blockSignals(True)
    comboBox.clear()
    for title in titles:
        comboBox.addItem(title)
    comboBox.currentIndex = index
    comboBox.blockSignals(False)
