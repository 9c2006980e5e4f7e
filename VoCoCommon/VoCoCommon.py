"""VoCo Common: the client that VoCo Segmentation and VoCo Pretrain share (a hidden module).

Its package ``VoCoCommonLib`` reaches the engine (processes, events, the runs workspace, the
volume hand-off, the environment probe, the dependency installer, the settings). Being a module
of its own, it is installed and loaded like the others, and both modules name it in their
``dependencies``; neither module imports from the other's folder. What both modules' panels
share is here: ``showChoices``, ``showLog``, the acknowledgement that cites VoCo, and the sample
volumes registered with the SampleData module.
"""

import logging

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule
from VoCoCommonLib.release import slicer_unsupported_message


class VoCoCommon(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VoCo Common")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Developer Tools")]
        self.parent.dependencies = []
        self.parent.hidden = True
        self.parent.contributors = ["VoCo for 3D Slicer developers"]
        self.parent.helpText = _("The shared client of the VoCo modules: it has no panel of its own.")
        self.parent.acknowledgementText = acknowledgementText()
        unsupported = slicer_unsupported_message()
        if unsupported:
            logging.error(unsupported)
        else:
            slicer.app.connect("startupCompleted()", registerSampleData)


def showChoices(comboBox, choices, wanted) -> int:
    """Fill a combo box with the titles of ``choices`` (``(id, title)`` pairs) without a
    currentIndexChanged per item, and select the one whose id is ``wanted`` (else the first);
    the index selected (-1 when there is no choice)."""
    ids = [choice_id for choice_id, _title in choices]
    comboBox.blockSignals(True)
    comboBox.clear()
    for _id, title in choices:
        comboBox.addItem(title)
    comboBox.currentIndex = ids.index(wanted) if wanted in ids else (0 if ids else -1)
    comboBox.blockSignals(False)
    return comboBox.currentIndex


def acknowledgementText() -> str:
    """The acknowledgement both modules show: what the extension builds on, and how to cite VoCo."""
    return _("""
VoCo for 3D Slicer builds on VoCo: Wu L, Zhuang J, Chen H. VoCo: A Simple-yet-Effective Volume
Contrastive Learning Framework for 3D Medical Image Analysis, CVPR 2024 (arXiv:2402.17300), and
Large-Scale 3D Medical Image Pre-training with Geometric Context Priors (VoCo-v2 and VoComni),
arXiv:2410.09890; on the models its authors publish at huggingface.co/Luffy503/VoCo; and on
MONAI and PyTorch. Please cite VoCo when you use it.
""")


def showLog(textEdit, log, shown: int) -> int:
    """Append the engine log's lines added since ``shown`` to a QPlainTextEdit; the new count."""
    for line in log.since(shown):
        textEdit.appendPlainText(line)
    return log.total


def registerSampleData() -> None:
    """Offer the engine's real sample volumes in the SampleData module (category VoCo)."""
    import SampleData
    from VoCoCommonLib.samples import CATEGORY, SAMPLES

    for sample in SAMPLES:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category=CATEGORY, sampleName=sample.title, nodeNames=[sample.node_name], customDownloader=downloadSample)


_sampleDownloads = []  # (job, timers) while one runs: the references keep them alive


def downloadSample(source, client=None):
    """SampleData's download for a VoCo sample: the engine fetches it in the background (a timer
    polls it), then Slicer's own reader loads it, on the GUI thread as SampleData's own samples
    are; returns the job."""
    import qt
    from VoCoCommonLib.client import EngineClient
    from VoCoCommonLib.samples import SampleJob, sample_named

    job = SampleJob(client or EngineClient(), sample_named(source.sampleName)).start()
    pollTimer, loadTimer = qt.QTimer(), qt.QTimer()
    pollTimer.setInterval(200)
    loadTimer.setSingleShot(True)
    download = (job, pollTimer, loadTimer)

    def poll():
        job.update()
        if job.finished:
            pollTimer.stop()
            loadTimer.start(0)

    def load():
        _sampleDownloads.remove(download)
        if job.succeeded and job.path:
            job.node = slicer.util.loadVolume(job.path, {"name": source.nodeNames[0]})
        else:
            slicer.util.errorDisplay(_("Could not fetch the sample volume: {error}").format(error=job.error))

    pollTimer.connect("timeout()", poll)
    loadTimer.connect("timeout()", load)
    _sampleDownloads.append(download)
    pollTimer.start()
    return job
