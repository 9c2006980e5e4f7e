"""The VoCo modules' shared client: everything both modules (and VoCo Studio) need to reach the
engine, without Qt. Import the submodules themselves (``from VoCoCommonLib.runs import Runs``):
this package imports nothing on its own, so that ``release`` runs even on an unsupported Slicer.

- ``settings``: the environment variables, read once; ``client``: the engine's processes;
- ``process``: a process group read as JSON-lines events, stopped as a tree; ``events``: names;
- ``jobs``: work a GUI thread watches but never waits for; ``environment``: devices and packages;
- ``volumes``: NRRD hand-off of volume nodes; ``training_set``: the clinician's cases;
- ``runs``: the workspace of pretraining and fine-tuning runs; ``dependencies``: the installer;
- ``signalling``: a tiny Signal for the sessions; ``release``: the supported Slicer releases.
"""
