"""Qt-free logic of the VoCoPretrain module: runs (runs.py), live curves (curves.py), crop-layout
and position-prediction overlays (overlays.py), composed by ``PretrainLogic`` (logic.py)."""
