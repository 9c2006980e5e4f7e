"""Which Slicer releases VoCo supports, checked before anything else of VoCo is imported.

Slicer 5.10 and newer (Python 3.12). On an older Slicer (5.8 and before ship Python 3.9, which
cannot even parse the modules' Lib packages) each module says so in one line, in its help text
and its panel, instead of a traceback. Keep this file Python 3.9 compatible: it is the one that
runs there.
"""

MINIMUM = (5, 10)


def unsupported_message(major, minor):
    """None when Slicer ``major.minor`` is supported, else the one line to show."""
    if (int(major), int(minor)) >= MINIMUM:
        return None
    return (f"VoCo needs 3D Slicer {MINIMUM[0]}.{MINIMUM[1]} or newer; this is Slicer {major}.{minor}. "
            "Please install a current Slicer release from download.slicer.org.")


def slicer_unsupported_message():
    """The message for the running Slicer (``slicer.app``), or None."""
    import slicer

    return unsupported_message(slicer.app.majorVersion, slicer.app.minorVersion)
