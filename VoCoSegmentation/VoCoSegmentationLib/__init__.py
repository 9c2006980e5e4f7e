"""VoCoSegmentation's Qt-free layer: the session a front end shows (``session``), the model list
(``models``), the engine's output as a segmentation node (``results``), an ROI as the engine's
box (``roi``) and the segmentation jobs (``jobs``). MRML, ``slicer.util``, numpy and the shared
client (VoCoCommonLib); the engine runs only as a process, ``python -m voco``."""
