"""The one list of registration methods, discovered from the method folders' ``SPEC``.

The CLI's ``--method`` and ``--init`` choices, ``deepreg methods``, ``deepreg train``, the model
loader, the Slicer module's method selector and the tests all read it.

Where specs come from (each a :class:`~deepreglib.methods.spec.MethodSpec` named ``SPEC`` in a
package's ``__init__.py``):

* every subpackage of :mod:`deepreglib.methods` (but ``blocks``);
* every package folder inside the folders listed in ``$DEEPREG_METHOD_PATH`` (``os.pathsep``
  separated): a method added from outside the engine, touching no file of it;
* the ``deepreglib.methods`` entry points of installed distributions (value: the package).

Discovery only imports those ``__init__.py`` files (plain data, no torch) and changes no state
but this module's cache; the code a spec names as ``"module:attribute"`` is imported when used.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from ..core.errors import BadInputError
from .spec import KINDS, LearnedInitializer, MethodInfo, MethodSpec  # noqa: F401  (re-exported)

DEFAULT_METHOD = "voxelmorph"
#: folders of method packages added from outside the engine
PLUGIN_PATH_VARIABLE = "DEEPREG_METHOD_PATH"
#: entry-point group naming method packages of other distributions
ENTRY_POINT_GROUP = "deepreglib.methods"
_NOT_METHODS = ("blocks",)

_specs: Optional[List[MethodSpec]] = None


def _spec_of(package: str) -> Optional[MethodSpec]:
    spec = getattr(importlib.import_module(package), "SPEC", None)
    return spec if isinstance(spec, MethodSpec) else None


def _builtin_packages() -> List[str]:
    here = Path(__file__).resolve().parent
    return [f"{__package__}.{m.name}" for m in pkgutil.iter_modules([str(here)])
            if m.ispkg and m.name not in _NOT_METHODS]


def _plugin_packages() -> List[str]:
    names = []
    for folder in filter(None, os.environ.get(PLUGIN_PATH_VARIABLE, "").split(os.pathsep)):
        if not Path(folder).is_dir():
            raise BadInputError(f"{PLUGIN_PATH_VARIABLE} names {folder}, which is not a folder")
        if folder not in sys.path:
            sys.path.append(folder)
        names += [m.name for m in pkgutil.iter_modules([folder]) if m.ispkg]
    return names


def _entry_point_packages() -> List[str]:
    from importlib import metadata
    eps = metadata.entry_points()
    group = eps.select(group=ENTRY_POINT_GROUP) if hasattr(eps, "select") else eps.get(ENTRY_POINT_GROUP, [])
    return [ep.value for ep in group]


def specs() -> List[MethodSpec]:
    """Every method's spec, in menu order (``SPEC.order``, then name). Cached; see :func:`refresh`."""
    global _specs
    if _specs is None:
        found = [s for s in map(_spec_of, _builtin_packages() + _plugin_packages() + _entry_point_packages())
                 if s is not None]
        _specs = sorted(found, key=lambda s: (s.order, s.info.name))
    return list(_specs)


def refresh() -> None:
    """Forget the discovered specs (after changing ``$DEEPREG_METHOD_PATH``)."""
    global _specs
    _specs = None
    METHODS.reset()


def resolve(target: str) -> Any:
    """Import ``"module:attribute"`` and return the attribute."""
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


class _MethodTable(MutableMapping):
    """``name -> MethodInfo``, filled from :func:`specs` on first use (so importing this module
    discovers nothing). Entries may be added for a test or a session; :func:`refresh` forgets them."""

    def __init__(self):
        self._table: Optional[Dict[str, MethodInfo]] = None

    def reset(self) -> None:
        self._table = None

    def _get(self) -> Dict[str, MethodInfo]:
        if self._table is None:
            self._table = {s.info.name: s.info for s in specs()}
        return self._table

    def __getitem__(self, name):
        return self._get()[name]

    def __setitem__(self, name, info):
        self._get()[name] = info

    def __delitem__(self, name):
        del self._get()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


#: ``--method`` name -> :class:`MethodInfo`
METHODS = _MethodTable()


def get_method_info(name: str) -> MethodInfo:
    if name not in METHODS:
        raise BadInputError(f"unknown method {name!r}; available: {', '.join(METHODS)} "
                            "(run `deepreg methods` for descriptions)")
    return METHODS[name]


def method_names() -> List[str]:
    return list(METHODS)


def create_method(name: str, device, **options):
    """Instantiate the method's implementation (imports it on first use)."""
    info = get_method_info(name)
    return resolve(info.implementation)(info=info, device=device, **options)


def network_class(name: str):
    """The network class a model file names (``NAME.json``'s ``network``), or None if no spec
    offers it: only networks of known methods are ever rebuilt from a file."""
    for spec in specs():
        if name in spec.networks:
            return resolve(spec.networks[name])
    return None


def training_recipes() -> Dict[str, Any]:
    """``deepreg train`` name -> :class:`~deepreglib.train.recipe.TrainingRecipe`, every method's."""
    return {name: resolve(target) for spec in specs() for name, target in spec.recipes.items()}


def learned_initializers() -> Dict[str, LearnedInitializer]:
    """``--init`` name -> :class:`LearnedInitializer`, every method's (shipped weights or not)."""
    return {name: init for spec in specs() for name, init in spec.initializers.items()}


def initialization_choices(models_folder) -> List[tuple]:
    """``(label, --init value)`` for the Slicer module's "Initial alignment" list: the classic
    ones, then each learned initializer (and its polished form) whose weights (``STEM.pt``) are in
    ``models_folder``, the same rule by which the worker registers them. Reads no weights and
    imports no torch."""
    from ..io.protocol import CLASSIC_INIT_CHOICES
    out = list(CLASSIC_INIT_CHOICES)
    for name, init in learned_initializers().items():
        if models_folder and any((Path(models_folder) / f"{stem}.pt").is_file() for stem in init.weights):
            out.append((init.label or name, name))
            if init.refined_by:
                out.append((init.refined_label or f"{name}+{init.refined_by}", f"{name}+{init.refined_by}"))
    return out
