"""Self-describing model files (the one place weights are read and written): ``NAME.pt`` (a plain state dict) beside ``NAME.json`` (the
network class, its constructor arguments, the file's sha256 and the model card's numbers).

Loading never executes pickled code: ``torch.load(..., weights_only=True)`` after the checksum in
the JSON has been verified.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from collections import OrderedDict
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


#: weights read from disk in this process, by path (a long-lived worker, ``deepreg batch``'s, reads
#: each file once: :func:`read_weights_cached`)
WEIGHT_FILE_READS: Dict[str, int] = {}
#: state dicts and cards of the files read, keyed by path, verify and the modification time and
#: size of both files (``.pt`` and ``.json``); a few entries only (a shipped network is 1-2 MB)
_WEIGHTS_CACHE: "OrderedDict[tuple, Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]" = OrderedDict()
_WEIGHTS_CACHE_SIZE = 8
#: seconds since a file's last change before it is cached
_SETTLED_S = 2.0


def read_weights_cached(path: Union[str, Path], verify: bool = True
                        ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """:func:`read_weights`, read (and checksummed) once per process while the file is unchanged
    (same path, modification time and size, of both files; a file changed less than
    :data:`_SETTLED_S` ago is read every time): the second registration in a long-lived
    process takes the weights from memory. Returns a new dict over the cached (CPU) tensors
    and a copy of the card; ``load_state_dict`` copies the tensors, so callers never share
    parameters."""
    path = Path(path).with_suffix(".pt")
    try:
        st, card_st = path.stat(), path.with_suffix(".json").stat()
    except OSError:
        return read_weights(path, verify)  # the missing-file error
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, card_st.st_mtime_ns, card_st.st_size,
           bool(verify))
    hit = _WEIGHTS_CACHE.get(key)
    if hit is None:
        hit = read_weights(path, verify)
        # a file changed in the last moments is not trusted by its time stamp: file systems keep
        # times coarsely, so a rewrite of the same size right after could look unchanged
        if time.time() - max(st.st_mtime, card_st.st_mtime) > _SETTLED_S:
            _WEIGHTS_CACHE[key] = hit
            while len(_WEIGHTS_CACHE) > _WEIGHTS_CACHE_SIZE:
                _WEIGHTS_CACHE.popitem(last=False)
    else:
        _WEIGHTS_CACHE.move_to_end(key)
    state, card = hit
    return dict(state), copy.deepcopy(card)


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
    WEIGHT_FILE_READS[str(path.resolve())] = WEIGHT_FILE_READS.get(str(path.resolve()), 0) + 1
    if verify:
        digest = sha256_file(path)
        if digest != card.get("sha256"):
            raise BadInputError(f"checksum of {path} is {digest}, its model card says "
                                f"{card.get('sha256')}: the file is corrupted or was replaced.")
    return torch.load(path, map_location="cpu", weights_only=True), card
