"""Stand-ins for Slicer's module base classes outside the application (plain Python with
``slicer-core``), so the modules' Logic classes import and can be tested there, and their
self-tests run under unittest/pytest. Distinct classes, so the method resolution order of the
modules' classes stays valid."""
import logging
import os
import unittest


class _Standin:
    def __init__(self, *args, **kwargs):
        pass


class ScriptedLoadableModule(_Standin):
    pass


class ScriptedLoadableModuleWidget(_Standin):
    pass


class ScriptedLoadableModuleLogic(_Standin):
    pass


class ScriptedLoadableModuleTest(unittest.TestCase):
    """Like Slicer's: a ``unittest.TestCase`` whose ``delayDisplay`` shows a message (here: logs)."""

    def delayDisplay(self, message, msec=None):
        logging.info(message)


class VTKObservationMixin(_Standin):
    pass


def resource_path(module_dir: str, relative: str) -> str:
    """A file of ``Resources/``: next to the installed module, else the source tree's top level."""
    for base in (os.path.join(module_dir, "Resources"), os.path.join(os.path.dirname(module_dir), "Resources")):
        candidate = os.path.join(base, relative)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(module_dir, "Resources", relative)
