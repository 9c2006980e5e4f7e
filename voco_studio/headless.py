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


def rendering_report(size: int = 64) -> dict:
    """Render a shaded sphere off screen the way the views do and say what drew it: the window
    class (EGL / OSMesa / X), OpenGL vendor and renderer (llvmpipe = Mesa on the CPU; a GPU's name
    on a GPU server) and how many pixels it coloured (0 = the views would stay black)."""
    configure_offscreen_rendering()
    import numpy as np
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkFiltersSources import vtkSphereSource
    from vtkmodules.vtkRenderingCore import vtkActor, vtkPolyDataMapper, vtkRenderer, vtkRenderWindow, vtkWindowToImageFilter
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL window classes)

    mapper = vtkPolyDataMapper()
    sphere = vtkSphereSource()
    mapper.SetInputConnection(sphere.GetOutputPort())
    actor = vtkActor()
    actor.SetMapper(mapper)
    renderer = vtkRenderer()
    renderer.AddActor(actor)
    window = vtkRenderWindow()
    window.SetOffScreenRendering(True)
    window.SetSize(size, size)
    window.AddRenderer(renderer)
    window.Render()
    capture = vtkWindowToImageFilter()
    capture.SetInput(window)
    capture.Update()
    pixels = vtk_to_numpy(capture.GetOutput().GetPointData().GetScalars())
    capabilities = window.ReportCapabilities() or ""
    info = {line.split(" string:", 1)[0].strip(): line.split(":", 1)[1].strip()
            for line in capabilities.splitlines() if " string:" in line}
    report = {"window": window.GetClassName(), "vendor": info.get("OpenGL vendor", "?"),
              "renderer": info.get("OpenGL renderer", "?"), "version": info.get("OpenGL version", "?"),
              "pixels_drawn": int(np.count_nonzero(pixels.reshape(len(pixels), -1).any(axis=1)))}
    window.Finalize()
    return report
