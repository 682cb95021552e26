"""Helpers of the DeepRegistration and DeformationQA Slicer modules that need no Qt.

``process``: runs the engine's worker (``python -m deepreglib register``) in the background and
parses its JSON-lines protocol. ``scene``: MRML nodes <-> worker files and the manifest's outputs
-> nodes. ``qa``: transform nodes -> the engine's deformation metrics. ``dependencies``: torch
and the engine's requirements, installed on first use with the user's consent.

These modules import ``slicer`` (MRML, vtk) lazily or not at all, so they run and are tested with
the ``slicer-core`` package outside the Slicer application.
"""
