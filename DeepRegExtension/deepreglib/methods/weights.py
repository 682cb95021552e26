"""A method's networks from model files: :func:`load_model` rebuilds the network class a file
names (only classes a method's spec offers, :func:`deepreglib.methods.registry.network_class`)
and loads its weights; :func:`load_network` adds the check every method makes. The files
themselves (format, checksum, models folder) are :mod:`deepreglib.io.models`.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple, Union

import torch
from torch import nn

from ..core.errors import BadInputError
from ..io.models import (models_dir, read_weights, read_weights_cached, save_model,  # noqa: F401
                         sha256_file)  # (re-exported)
from .registry import network_class


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
               verify: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a network from ``NAME.json`` and load ``NAME.pt`` into it (eval mode).

    The file is read once per process while unchanged (:func:`read_weights_cached`): a
    long-lived worker (``deepreg batch``) does not read and checksum it again for every pair.

    Raises BadInputError if a file is missing, the checksum differs (a corrupted or swapped
    file), or the network class is unknown.
    """
    path = Path(path).with_suffix(".pt")
    state, card = read_weights_cached(path, verify)
    cls = network_class(card.get("network", ""))
    if cls is None:
        raise BadInputError(f"unknown network class {card.get('network')!r} in {path.with_suffix('.json')}")
    model = cls(**card["config"])
    model.load_state_dict(state)
    return model.to(device).eval(), card


@lru_cache(maxsize=8)
def _cached_model(path: str, device: str, mtime: float):
    return load_model(path, device=device)


def load_network(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                 networks: Sequence[str] = (), what: str = "", cached: bool = False
                 ) -> Tuple[nn.Module, Dict[str, Any]]:
    """:func:`load_model`, then a check that the file holds one of ``networks`` (class names;
    empty: any). ``what`` names the expected weights in the error (``"CAR-Net weights"``).
    ``cached``: reuse the model loaded from the same unchanged file on the same device (for
    initialisers called once per run and again by the method)."""
    path = Path(path).with_suffix(".pt")
    if cached:
        mtime = path.stat().st_mtime if path.is_file() else 0.0
        model, card = _cached_model(str(path), str(torch.device(device)), mtime)
    else:
        model, card = load_model(path, device=device)
    if networks and type(model).__name__ not in networks:
        raise BadInputError(f"{path} holds a {type(model).__name__}, not {what or ' or '.join(networks)}")
    return model, card


def shipped_weights(stem: str) -> Path:
    """The shipped model file ``STEM.pt`` in :func:`models_dir`."""
    return models_dir() / f"{stem}.pt"
