"""VoCo engine: volume-contrast pretraining of 3D networks, with no Slicer, Qt or VTK imports."""

__version__ = "0.1.0"
