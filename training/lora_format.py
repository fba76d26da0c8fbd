"""Wan LoRA files: read any common format, write the canonical one.

Public API (the trainer and the loader node use these):
- ``save_canonical_lora(path, modules, metadata)``: write ``diffusion_model.<native>.
  lora_up.weight / lora_down.weight / alpha`` atomically, with string metadata.
- ``read_lora(path) -> LoadedLora``: tensors renamed to the canonical naming (no copies),
  the file's metadata, the format detected and notes.

Checking a LoRA against a model (``match_lora``, the report, merged weights) is lora_match.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .lora_keys import (ALPHA, DOWN, UP, canonical_key, choose_namespace,
                        describe_source, native_module, parse_key, resolve_module)
from .safe_io import UserFileError, load_torch_weights_only, read_weights, save_safetensors

STRENGTH_LIMIT = 10.0
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
EXAMPLES = 5


class LoraInputError(UserFileError):
    """A LoRA file or a loader setting the user chose cannot be used as it is."""


# --------------------------------------------------------------------------- write
def save_canonical_lora(path, modules: Mapping[str, tuple[torch.Tensor, torch.Tensor, float | None]],
                        metadata: Mapping[str, str]) -> Path:
    """Write a LoRA in the canonical ComfyUI naming; returns the path.

    ``modules``: native module path (``blocks.0.self_attn.q``) -> (up [out, r],
    down [r, in], alpha or None). Alpha None writes no ``.alpha`` (scale 1.0).
    """
    tensors: dict[str, torch.Tensor] = {}
    for native, (up, down, alpha) in modules.items():
        if resolve_module(native, ".", "native") != native:
            raise ValueError(f"save_canonical_lora: {native!r} is not a native Wan module path "
                             "(expected e.g. 'blocks.0.self_attn.q')")
        if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"save_canonical_lora: {native}: up {list(up.shape)} and down "
                             f"{list(down.shape)} do not share a rank")
        tensors[canonical_key(native, UP)] = up
        tensors[canonical_key(native, DOWN)] = down
        if alpha is not None:
            tensors[canonical_key(native, ALPHA)] = torch.tensor(float(alpha))
    meta = {"format": "pt"}
    meta.update({str(k): str(v) for k, v in metadata.items()})
    return save_safetensors(tensors, path, meta)


# --------------------------------------------------------------------------- read
@dataclass
class LoadedLora:
    path: Path
    tensors: dict[str, torch.Tensor]          # canonical key -> tensor (the file's own tensors)
    metadata: dict[str, str]
    format: str
    modules: dict[str, dict[str, str]]        # native module -> {part: canonical key}
    unrecognised: dict[str, str] = field(default_factory=dict)  # file key -> why
    notes: list[str] = field(default_factory=list)

    def as_modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
        """{native module: (up, down, alpha or None)}, the shape ``save_canonical_lora`` takes.

        Raises LoraInputError naming the keys this shape cannot hold (diff, diff_b,
        dora_scale, lora_mid, LoHa, LoKr, or an up without its down) instead of dropping them.
        """
        cannot: list[str] = []
        for parts in self.modules.values():
            if UP in parts and DOWN in parts:
                cannot += [key for part, key in parts.items() if part not in (UP, DOWN, ALPHA)]
            else:
                cannot += parts.values()
        if cannot:
            raise LoraInputError(
                f"{self.path.name}: {len(cannot)} keys are not plain lora_up/lora_down/alpha and cannot be "
                f"written as an up/down LoRA, e.g. {', '.join(cannot[:5])}")
        out = {}
        for native, parts in self.modules.items():
            alpha = self.tensors.get(parts.get(ALPHA, ""))
            out[native] = (self.tensors[parts[UP]], self.tensors[parts[DOWN]],
                           None if alpha is None else float(alpha.float().item()))
        return out

    def subset(self, modules: Iterable[str]) -> dict[str, torch.Tensor]:
        """Canonical tensors of the given modules only (same tensor objects)."""
        return {key: self.tensors[key] for m in modules for key in self.modules[m].values()}


def read_lora(path) -> LoadedLora:
    """Read a LoRA file of any supported format and rename its keys canonically."""
    path = Path(path)
    raw, metadata = _read_tensors(path)
    parsed, unrecognised = [], {}
    for key in raw:
        pk = parse_key(key)
        if pk is None:
            unrecognised[key] = "not a LoRA tensor name"
        else:
            parsed.append(pk)
    namespace = choose_namespace(parsed)
    lora = LoadedLora(path, {}, metadata, describe_source(parsed, namespace) if parsed else "unknown",
                      {}, unrecognised)
    for pk in parsed:
        native = native_module(pk, namespace)
        if native is None:
            lora.unrecognised[pk.raw] = f"'{pk.module}' is not a Wan module name"
            continue
        key = canonical_key(native, pk.part)
        if key in lora.tensors:
            lora.notes.append(f"duplicate key {pk.raw} (same module and part as an earlier key): skipped")
            continue
        lora.tensors[key] = raw[pk.raw]
        lora.modules.setdefault(native, {})[pk.part] = key
    _check_tensors(lora)
    _apply_peft_alpha(lora, _peft_config(metadata, path))
    return lora


def _check_tensors(lora: LoadedLora) -> None:
    """LoraInputError naming the key for a LoRA tensor no loader can use: an up/down that is
    not a non-empty floating-point matrix, an alpha that is not one finite number, another part
    that is not floating point (a damaged file: a header edited or cut)."""
    for parts in lora.modules.values():
        for part, key in parts.items():
            tensor = lora.tensors[key]
            if part == ALPHA:
                ok = (tensor.numel() == 1 and tensor.dtype != torch.bool and not tensor.is_complex()
                      and bool(torch.isfinite(tensor.double()).all()))
                want = "one finite number"
            elif part in (UP, DOWN):
                ok = tensor.is_floating_point() and tensor.ndim >= 2 and tensor.numel() > 0
                want = "a non-empty floating-point matrix (2 or more dimensions)"
            else:
                ok = tensor.is_floating_point()
                want = "floating point"
            if not ok:
                value = f" = {tensor.item()}" if part == ALPHA and tensor.numel() == 1 else ""
                raise LoraInputError(
                    f"LoRA file {lora.path.name}: {key} is {str(tensor.dtype).replace('torch.', '')} "
                    f"{list(tensor.shape)}{value}; a LoRA's {part.split('.')[0]} must be {want}. The file is "
                    "damaged or not a LoRA: download it again and compare its size with the source.")


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata through safe_io's one reader (the format from the first bytes; a
    pickle weights-only), its refusals as LoraInputError."""
    try:
        tensors, metadata = read_weights(path, "LoRA file", read_pickle=_read_pickle)
        return dict(sorted(tensors.items())), metadata  # key order, not file order: the same report for any writer
    except LoraInputError:
        raise
    except UserFileError as exc:
        raise LoraInputError(str(exc)) from None


def _read_pickle(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """A LoRA pickle's tensors by name; other entries (a trainer's step count, ...) are dropped."""
    obj = load_torch_weights_only(path, what="LoRA file")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(obj, dict) else {}
    if not tensors:
        raise LoraInputError(f"LoRA file {path.name} holds no tensors by name "
                             f"(found {type(obj).__name__}); it is not a LoRA state dict")
    return tensors


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def _peft_config(metadata: Mapping[str, str], path: Path) -> dict:
    """lora_alpha / use_rslora from diffusers' ``lora_adapter_metadata``, plain metadata
    keys, or PEFT's ``adapter_config.json`` beside an ``adapter_model.safetensors``."""
    config: dict = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            for key, value in json.loads(raw).items():
                config[key.rsplit(".", 1)[-1]] = value  # "transformer.lora_alpha" -> "lora_alpha"
        except (ValueError, AttributeError):
            pass
    for key in ("lora_alpha", "use_rslora", "r"):
        if key in metadata:
            config.setdefault(key, metadata[key])
    beside = path.with_name("adapter_config.json")
    if path.name.startswith("adapter_model") and beside.is_file():
        try:
            for key, value in json.loads(beside.read_text()).items():
                config.setdefault(key, value)
        except (ValueError, AttributeError):  # not JSON, or not a mapping
            pass
    return config


def _metadata_number(value, name: str, path: Path) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise LoraInputError(f"LoRA file {path.name}: its metadata {name} = {value!r} is not a finite number; "
                             "the file's header is damaged or was written wrongly: download it again")
    return number


def _apply_peft_alpha(lora: LoadedLora, config: dict) -> None:
    """Turn PEFT's lora_alpha (and rsLoRA's alpha/sqrt(rank) scale) into canonical alphas."""
    rs = _truthy(config.get("use_rslora", False))
    if "lora_alpha" not in config and not rs:
        return
    lora_alpha = _metadata_number(config.get("lora_alpha", 8), "lora_alpha", lora.path)  # PEFT's default is 8
    changed = 0
    for native, parts in lora.modules.items():
        if DOWN not in parts:
            continue
        rank = lora.tensors[parts[DOWN]].shape[0]
        if ALPHA in parts:
            if not rs:
                continue
            alpha = float(lora.tensors[parts[ALPHA]].float().item()) * math.sqrt(rank)
        else:
            alpha = lora_alpha * (math.sqrt(rank) if rs else 1.0)
            parts[ALPHA] = canonical_key(native, ALPHA)
        lora.tensors[parts[ALPHA]] = torch.tensor(alpha, dtype=torch.float32)
        changed += 1
    if changed:
        if rs:
            lora.format += " + rank-stabilised (rsLoRA)"
            lora.notes.append(f"rsLoRA: scale lora_alpha/sqrt(rank) applied to {changed} modules "
                              "(from the file's metadata)")
        else:
            lora.notes.append(f"alpha {lora_alpha:g} taken from the PEFT config in the file's metadata")
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        lora.notes.append("PEFT alpha_pattern/rank_pattern in the metadata are not applied")


def check_strength(value, name: str = "strength", limit: float = STRENGTH_LIMIT) -> float:
    """The strength as a float, or LoraInputError naming the input and the value."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LoraInputError(f"{name} = {value!r} is not a number") from None
    if not math.isfinite(number) or abs(number) > limit:
        raise LoraInputError(
            f"{name} = {value} is out of range: use a value between {-limit:g} and {limit:g} "
            "(0 turns the LoRA off; 0.5-0.7 is the usual start for the official reward LoRAs)")
    return number
