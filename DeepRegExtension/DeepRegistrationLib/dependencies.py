"""torch and the engine's requirements: checked when a run starts, installed with the user's
consent, never when the module opens (importing torch takes seconds and installing it minutes).

Order of installers: the PyTorch extension's ``PyTorchUtils`` for torch (it picks the CUDA
build that matches the computer's driver; the extension declares ``PyTorch`` as a dependency),
then ``slicer.packaging.pip_ensure`` (Slicer 5.12+; ``slicer.pydeps`` in 5.11 previews) for the
rest, else ``slicer.util.pip_install``. The user is asked once, by :func:`ensure_dependencies`;
the installers are told not to ask again.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Callable, List, Optional

#: (import name, pip requirement) the engine needs besides torch. SimpleITK and numpy ship with
#: Slicer; they are listed so a broken environment is reported rather than failing in the worker.
ENGINE_REQUIREMENTS = (("numpy", "numpy>=1.21"), ("SimpleITK", "SimpleITK>=2.2"),
                       ("scipy", "scipy>=1.7"), ("PIL", "pillow>=8.0"), ("matplotlib", "matplotlib>=3.5"))
TORCH_REQUIREMENT = "torch>=2.1"


def _installed(import_name: str) -> bool:
    return importlib.util.find_spec(import_name) is not None


def _torch_version() -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def _torch_too_old() -> bool:
    version = _torch_version()
    if version is None:
        return False
    major, minor = (int("".join(c for c in x if c.isdigit()) or 0) for x in version.split("+")[0].split(".")[:2])
    return (major, minor) < (2, 1)


def missing_requirements() -> List[str]:
    """pip requirements that are not importable now (``[]``: ready). Cheap: finds modules
    without importing them."""
    missing = []
    if not _installed("torch") or _torch_too_old():
        missing.append(TORCH_REQUIREMENT)
    missing += [req for name, req in ENGINE_REQUIREMENTS if not _installed(name)]
    return missing


def _install_torch(log: Callable[[str], None]) -> None:
    try:
        import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS)
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        logic = PyTorchUtils.PyTorchUtilsLogic()
        if logic.torchInstalled() and _torch_too_old():
            raise RuntimeError(f"PyTorch {_torch_version()} is installed but {TORCH_REQUIREMENT} is needed; "
                               "update it in the PyTorch Utils module (Uninstall, then Install) and restart Slicer")
        if not logic.torchInstalled():
            log("Installing PyTorch with the PyTorch extension (this can take several minutes)...")
            if logic.installTorch(askConfirmation=False, torchVersionRequirement=">=2.1") is None:
                raise RuntimeError("the PyTorch extension could not install torch; see the log")
        return
    _pip([TORCH_REQUIREMENT], log)


def _pip(requirements: List[str], log: Callable[[str], None]) -> None:
    log("Installing " + ", ".join(requirements) + " ...")
    for module_name in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure"):
            from packaging.requirements import Requirement
            kwargs = {"requester": "DeepRegExtension"}
            params = inspect.signature(module.pip_ensure).parameters
            for no_prompt in ("prompt_install", "prompt"):  # the user has said yes already
                if no_prompt in params:
                    kwargs[no_prompt] = False
                    break
            module.pip_ensure([Requirement(r) for r in requirements], **kwargs)
            return
    import slicer
    slicer.util.pip_install(" ".join(requirements))


def ensure_dependencies(confirm: Callable[[str], bool], log: Callable[[str], None] = print,
                        missing: Optional[List[str]] = None, module: str = "DeepRegistration") -> bool:
    """Install what is missing after ``confirm(message)`` returns True.

    Returns True when everything is importable afterwards, False when the user declined.
    Raises ``RuntimeError`` when an installation failed (the message says what to do).
    """
    missing = missing_requirements() if missing is None else list(missing)
    if not missing:
        return True
    message = (f"{module} needs these Python packages, which are not installed yet:\n\n  "
               + "\n  ".join(missing)
               + "\n\nInstall them now? This downloads up to a few GB (PyTorch) and can take "
                 "several minutes; Slicer may need a restart afterwards.")
    if not confirm(message):
        return False
    try:
        if TORCH_REQUIREMENT in missing:
            _install_torch(log)
        rest = [r for r in missing if r != TORCH_REQUIREMENT]
        if rest:
            _pip(rest, log)
    except Exception as e:  # noqa: BLE001 - report any installer failure in one sentence
        raise RuntimeError(f"Installing {', '.join(missing)} failed: {e}. Check the internet "
                           "connection, or install them from Slicer's Python console with "
                           "slicer.util.pip_install(...).") from e
    importlib.invalidate_caches()
    still = missing_requirements()
    if still:
        raise RuntimeError("After installation these are still missing: " + ", ".join(still)
                           + ". Restart Slicer and try again.")
    return True
