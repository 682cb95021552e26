"""Self-describing model files (the one place weights are read and written): ``NAME.pt`` (a plain state dict) beside ``NAME.json`` (the
network class, its constructor arguments, the file's sha256 and the model card's numbers).

Loading never executes pickled code: ``torch.load(..., weights_only=True)`` after the checksum in
the JSON has been verified.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..core.errors import BadInputError

def models_dir() -> Path:
    """Where the shipped weights live (one folder, never a copy):

    1. ``$DEEPREG_MODELS`` (the Slicer module sets it for its worker);
    2. the Slicer extension's ``Resources/Models`` beside the engine
       (``qt-scripted-modules/Resources/Models`` next to ``qt-scripted-modules/deepreglib``);
    3. the source tree's ``Resources/Models`` (a checkout, an editable install);
    4. the pip package's ``deepreglib/models`` (``pip install deepreglib``).
    """
    env = os.environ.get("DEEPREG_MODELS")
    if env:
        return Path(env)
    engine_file = Path(__file__).resolve()  # <root>/deepreglib/io/models.py
    for candidate in (engine_file.parents[2] / "Resources" / "Models",   # Slicer: qt-scripted-modules/
                      engine_file.parents[3] / "Resources" / "Models"):  # source tree: the repository
        if candidate.is_dir():
            return candidate
    try:
        import deepreglib.models as packaged
        return Path(packaged.__file__).resolve().parent
    except ImportError:  # pragma: no cover - only when no layout exists
        return engine_file.parents[3] / "Resources" / "Models"


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name, dir=str(path.parent))
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; shipped files must be readable by all
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_model(model: nn.Module, path: Union[str, Path], card: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``path`` (``.pt`` state dict) and ``path.with_suffix('.json')`` (class, config,
    sha256, card). The model must carry its constructor arguments in ``model.config``."""
    path = Path(path).with_suffix(".pt")
    if not hasattr(model, "config"):
        raise ValueError(f"{type(model).__name__} has no .config (its constructor arguments)")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda p: torch.save(state, p))
    meta = {"network": type(model).__name__, "config": model.config, "weights": path.name,
            "sha256": sha256_file(path), "parameters": sum(p.numel() for p in model.parameters())}
    meta.update(card or {})
    _atomic_write(path.with_suffix(".json"),
                  lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=False)))
    return path


def read_model_card(path: Union[str, Path]) -> Dict[str, Any]:
    js = Path(path).with_suffix(".json")
    if not js.is_file():
        raise BadInputError(f"model description {js} is missing; a model needs NAME.pt and NAME.json")
    return json.loads(js.read_text())


def read_weights(path: Union[str, Path], verify: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The state dict of ``NAME.pt`` and the card of ``NAME.json``, checksum verified; loading
    never executes pickled code (``weights_only=True``).

    Raises BadInputError if a file is missing or the checksum differs (a corrupted or swapped file).
    """
    path = Path(path).with_suffix(".pt")
    if not path.is_file():
        raise BadInputError(f"weights file {path} is missing. Reinstall the extension, or train the "
                            f"model with `deepreg train` and point DEEPREG_MODELS at its folder.")
    card = read_model_card(path)
    if verify:
        digest = sha256_file(path)
        if digest != card.get("sha256"):
            raise BadInputError(f"checksum of {path} is {digest}, its model card says "
                                f"{card.get('sha256')}: the file is corrupted or was replaced.")
    return torch.load(path, map_location="cpu", weights_only=True), card
