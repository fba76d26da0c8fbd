"""Building blocks every reward model's loader shares: key tests, wrapper prefixes, strict loading,
and building a module without its random initialisation. A leaf: it imports no other reward module."""

from __future__ import annotations

import torch

from ..safe_io import UserFileError

WRAPPER_PREFIXES = ("module.", "model.", "mps.")


def has_keys(state_dict, keys) -> bool:
    return all(k in state_dict for k in keys)


def strip_prefixes(state_dict: dict) -> dict:
    """Drop wrapper prefixes (``module.``, ``model.``, ``mps.``) shared by every key. MPS keeps its
    own ``model.*``: its ``cross_model.*`` keys never share that prefix."""
    while state_dict:
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                break
        else:
            return state_dict
    return state_dict


def describe_keys(state_dict, limit: int = 6) -> str:
    tops = sorted({k.split(".")[0] for k in state_dict})
    return (f"{len(state_dict)} tensors; top-level names {tops[:limit]}{' ...' if len(tops) > limit else ''}; "
            f"e.g. {sorted(state_dict)[:3]}")


def load_strict(module: torch.nn.Module, state_dict, what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the missing/unexpected keys."""
    result = module.load_state_dict(state_dict, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:4]})")
        raise UserFileError(
            f"the checkpoint does not match the {what} architecture inferred from its shapes: "
            + "; ".join(parts) + ". The file is truncated, modified or of another model; nothing is loaded "
            "partially (weights would silently stay random)."
        )


def build_uninitialised(factory, fill_buffers) -> torch.nn.Module:
    """Build ``factory()`` without its random initialisation (1B parameters take ~20 s to
    initialise on a small CPU, only to be overwritten): construct on the meta device, allocate,
    then ``fill_buffers(module)`` recomputes the non-persistent buffers (they are not in a
    checkpoint). Every other tensor must then come from a strict ``load_state_dict``."""
    with torch.device("meta"):
        module = factory()
    persistent = set(module.state_dict())
    module = module.to_empty(device="cpu")
    filled = fill_buffers(module)
    missing = {n for n, _ in module.named_buffers() if n not in persistent} - set(filled)
    if missing:  # a library version added a buffer we cannot recompute: initialise normally
        return factory()
    return module
