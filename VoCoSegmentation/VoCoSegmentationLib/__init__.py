"""VoCoSegmentation's logic, without Qt: MRML, ``slicer.util`` and the standard library (plus
numpy and pynrrd, which Slicer ships). The engine runs only as a process, ``python -m voco``."""

from .logic import Device, FinetuneJob, Job, SegmentationJob, SegmentationLogic, devices_from_probe
from .models import ModelEntry, list_models
from .process import EXIT_EVENT, EngineProcess, ProcessProtocol
from .results import SegmentationResult, segmentation_from_output, terminology_entry
from .roi import roi_argument, roi_ras_box
from .training_set import TrainingSet

__all__ = ["Device", "EXIT_EVENT", "EngineProcess", "FinetuneJob", "Job", "ModelEntry", "ProcessProtocol",
           "SegmentationJob", "SegmentationLogic", "SegmentationResult", "TrainingSet", "devices_from_probe",
           "list_models", "roi_argument", "roi_ras_box", "segmentation_from_output", "terminology_entry"]
