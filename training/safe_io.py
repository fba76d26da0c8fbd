"""Atomic file writes and pickle-free checkpoint loading.

A crash or a kill while writing must leave the previous file intact: every write
goes to a temporary file in the same folder, is flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file


class UserFileError(ValueError):
    """A file the user pointed us to is missing, unreadable or of the wrong kind."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and atomically move the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically; metadata values must be strings."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, tmp, metadata=meta))


def write_text(path: str | os.PathLike, text: str) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
    return atomic_write(path, _write)


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (for optimizer/RNG states: tensors and plain data only)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch_weights_only(path: str | os.PathLike, what: str = "checkpoint"):
    """Load a ``.pt/.pth/.ckpt/.bin`` file without executing pickled code.

    Raises UserFileError that names the file and says how to convert it when the
    pickle contains anything but tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise UserFileError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError
        raise UserFileError(
            f"{what} {path.name} is a pickle that needs code execution to load "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). This pack never runs "
            "pickled code. Convert it once, in a Python session you trust, with "
            "`import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{path.name}', weights_only=False), '{path.stem}.safetensors')` "
            "and choose the .safetensors file."
        ) from exc
