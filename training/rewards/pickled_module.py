"""Read the official ``MPS_overall_checkpoint.pth`` (a whole pickled module) without running its code.

The official file needs ``weights_only=False`` (arbitrary code execution, the MPS repo
on the import path and transformers 4.27). Here a restricted unpickler rebuilds only
tensors and storages; every other class the pickle names becomes an inert stub that
merely records its state, so nothing from the file is imported or called. The module
tree is then walked through the recorded ``_parameters`` / ``_buffers`` / ``_modules``
to a state dict (persistent buffers only). ``python -m tools.convert_mps`` writes it as safetensors.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import types
from pathlib import Path

import torch

from ..safe_io import UserFileError
from ..torch_file_check import torch_file_problem

# The only real callables a pickle may reach: tensor/storage rebuilders and plain containers.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("torch", "Size"), ("torch", "device"),
}
_STORAGES = {"HalfStorage", "FloatStorage", "DoubleStorage", "BFloat16Storage", "LongStorage", "IntStorage",
             "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "UntypedStorage"}


class Stub:
    """Stands for any class or function the pickle names; records arguments and state, runs nothing."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (state, slotstate)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__["_stub_state"] = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("_stub_items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("_stub_list", []).append(value)

    def extend(self, values):
        for value in values:
            self.append(value)

    def state(self) -> dict:
        state = self.__dict__.get("_stub_state")
        return state if isinstance(state, dict) else {}


def _stub_class(module: str, name: str) -> type:
    return type(name, (Stub,), {"qualname": f"{module}.{name}", "__module__": "training.rewards.pickled_module.stubs"})


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # Protocol-2 pickles use Python 2 names (__builtin__.set, copy_reg...): map them first.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED or (module == "torch" and name in _STORAGES):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _stub_class(module, name)


restricted_pickle = types.SimpleNamespace(Unpickler=RestrictedUnpickler, load=None, __name__="restricted_pickle")


def _module_state_dict(obj, prefix: str = "", out: dict | None = None, seen: set | None = None) -> dict:
    out = {} if out is None else out
    seen = set() if seen is None else seen
    if id(obj) in seen or not isinstance(obj, Stub):
        return out
    seen.add(id(obj))
    state = obj.state()

    def entries(field: str) -> list[tuple[str, object]]:  # a damaged file may hold anything there
        value = state.get(field)
        return [(k, v) for k, v in value.items() if isinstance(k, str)] if isinstance(value, dict) else []

    non_persistent = state.get("_non_persistent_buffers_set")
    non_persistent = non_persistent if isinstance(non_persistent, (set, frozenset)) else set()
    for name, value in entries("_parameters"):
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value.detach()
    for name, value in entries("_buffers"):
        if isinstance(value, torch.Tensor) and name not in non_persistent:
            out[prefix + name] = value.detach()
    for name, child in entries("_modules"):
        _module_state_dict(child, f"{prefix}{name}.", out, seen)
    return out


def describe_stub_tree(obj) -> str:
    return getattr(obj, "qualname", type(obj).__name__)


def read_pickled_module(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, facts) from a whole pickled ``nn.Module`` file, without executing its code."""
    path = Path(path)
    problem = torch_file_problem(path)  # e.g. claims of data the file does not hold: before allocating
    if problem:
        raise UserFileError(f"{path.name} could not be read as a pickled module ({problem})")
    try:
        root = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except Exception as exc:
        raise UserFileError(f"{path.name} could not be read as a pickled module ({type(exc).__name__}: {exc})") from exc
    if isinstance(root, dict) and len(root) == 1 and isinstance(next(iter(root.values())), Stub):
        root = next(iter(root.values()))
    state_dict = _module_state_dict(root)
    if not state_dict:
        raise UserFileError(f"{path.name} holds no module parameters (found {describe_stub_tree(root)})")
    facts = {"root_class": describe_stub_tree(root)}
    rotary = [(k, v) for k, v in state_dict.items() if k.endswith("rotary_emb.inv_freq")]
    if rotary:
        facts["inv_freq_dtype"] = str(rotary[0][1].dtype)
    facts["dtypes"] = sorted({str(v.dtype) for v in state_dict.values()})
    return state_dict, facts

