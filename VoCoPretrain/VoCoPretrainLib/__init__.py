"""VoCoPretrain's Qt-free layer: the session a front end shows (``session``), live loss curves
(``curves``), crop-layout and position-prediction overlays (``overlays``) and their jobs
(``jobs``). Runs live in the shared client's workspace (VoCoCommonLib.runs)."""
