"""Slicer's own Python layer (``../shared/slicer/<release>/slicer``: ``parameterNodeWrapper`` and
its serializers, unchanged from Slicer's source) over ``slicer-core``'s real MRML classes, so that
the modules' parameter nodes are built and saved the way the application builds them.

Qt and CTK have no Python package outside Slicer; only the names the wrapper touches while it is
imported and while it reads and writes parameters are needed, so ``qt`` and ``ctk`` are
stand-in modules whose every attribute is a distinct empty class.
"""
import contextlib
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED_SLICER = Path(os.environ.get("DEEPREG_SHARED_SLICER") or ROOT.parent / "shared" / "slicer")
RELEASES = ("v5.8.1", "v5.10.0")
MODULE_DIR = ROOT / "DeepRegExtension"


def available(release: str) -> bool:
    return (SHARED_SLICER / release / "slicer" / "parameterNodeWrapper" / "__init__.py").is_file()


def _standin_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    classes = {}

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr not in classes:
            classes[attr] = type(attr, (), {"__module__": name})
        return classes[attr]
    module.__getattr__ = __getattr__
    return module


@contextlib.contextmanager
def slicer_python_layer(release: str):
    """``slicer.parameterNodeWrapper`` of ``release`` importable while the block runs (and
    ``qt``/``ctk`` stand-ins); everything is removed again afterwards. Yields the wrapper package."""
    import slicer  # slicer-core
    pkg = SHARED_SLICER / release / "slicer" / "parameterNodeWrapper"
    saved = {k: v for k, v in sys.modules.items()
             if k in ("qt", "ctk") or k.startswith("slicer.parameterNodeWrapper")}
    for k in saved:
        del sys.modules[k]
    sys.modules["qt"], sys.modules["ctk"] = _standin_module("qt"), _standin_module("ctk")
    # the application's widget classes (``slicer.qMRMLNodeComboBox``...): stand-ins as well
    gui_names = set()
    for source in pkg.glob("*.py"):
        gui_names.update(re.findall(r"slicer\.(q[A-Z]\w+)", source.read_text(encoding="utf-8")))
    added = [n for n in sorted(gui_names) if not hasattr(slicer, n)]
    for n in added:
        setattr(slicer, n, type(n, (), {"__module__": "slicer"}))
    spec = importlib.util.spec_from_file_location("slicer.parameterNodeWrapper", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    wrapper = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = wrapper
    try:
        spec.loader.exec_module(wrapper)
        slicer.parameterNodeWrapper = wrapper
        yield wrapper
    finally:
        for k in [k for k in sys.modules if k in ("qt", "ctk") or k.startswith("slicer.parameterNodeWrapper")]:
            del sys.modules[k]
        sys.modules.update(saved)
        for n in added + ["parameterNodeWrapper"]:
            if hasattr(slicer, n):
                delattr(slicer, n)


def load_module_file(name: str, alias: str):
    """Execute ``DeepRegExtension/<name>.py`` as a fresh module called ``alias`` (its
    ``DeepRegistrationLib`` helpers are found beside it)."""
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    spec = importlib.util.spec_from_file_location(alias, MODULE_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module
