"""Off-screen rendering without a display.

vtk 9.6's PyPI wheel picks its OpenGL window at run time: X (GLX) when ``$DISPLAY`` is set,
otherwise EGL (``libEGL.so.1``: a GPU driver's, or Mesa's llvmpipe on a CPU-only machine), and
OSMesa (``libOSMesa.so.8``) when EGL cannot start. Without a display it first tries X and logs
"bad X server connection"; naming EGL up front skips that. ``VTK_DEFAULT_OPENGL_WINDOW`` set by
the user (e.g. ``vtkOSOpenGLRenderWindow`` for OSMesa) always wins.
"""

from __future__ import annotations

import os


def configure_offscreen_rendering() -> str | None:
    """Choose EGL when there is no display and nothing was chosen; the window class in effect."""
    if not os.environ.get("DISPLAY") and not os.environ.get("VTK_DEFAULT_OPENGL_WINDOW"):
        os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = "vtkEGLRenderWindow"
    return os.environ.get("VTK_DEFAULT_OPENGL_WINDOW")


def disable_depth_peeling(render_window) -> int:
    """Turn depth peeling off on every renderer of a 3D view's window (with Mesa's software
    OpenGL, volume rendering vanishes behind a translucent markups ROI otherwise); how many."""
    renderers = render_window.GetRenderers()
    renderers.InitTraversal()
    count = 0
    for _ in range(renderers.GetNumberOfItems()):
        renderer = renderers.GetNextItem()
        renderer.SetUseDepthPeeling(False)
        renderer.SetUseDepthPeelingForVolumes(False)
        count += 1
    return count
