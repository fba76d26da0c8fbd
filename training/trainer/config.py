"""The trainer's run configuration: every field declared once, with its type, default, allowed
values and a one-line doc (``option(...)`` in config_fields.py). Validation, the ComfyUI node's defaults and
ranges, and the config reference in ``docs/training-config.md`` (``python -m
training.trainer.config --markdown``) all come from these declarations.

A run config is one flat YAML mapping (``yaml.safe_load``), written by hand or by the ComfyUI
"Reward LoRA Train" node. ``recipe: <name>`` starts from a recipe's values (recipes.py) and the
other fields of the mapping are set on top of it. Everything is checked before any model
loads: first each field's type and range (all errors together), then the relations between
fields, then every model file's contents (input_files.py). Each error is a ``ConfigError``
naming the field, the value and what to do. Paths may be relative to the YAML file's folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from .config_checks import resolve_accumulation, validate
from .config_fields import (DEPRECATED_KEYS, FIELDS, REWARD_MODELS, REWARD_PREPROCESS, REWARD_VARIANTS, ConfigError,
                            RewardSpec, Spec, TrainConfig, default, option, spec)

__all__ = ["DEPRECATED_KEYS", "FIELDS", "REWARD_MODELS", "REWARD_PREPROCESS", "REWARD_VARIANTS", "ConfigError",
           "RewardSpec", "Spec", "TrainConfig", "config_from_dict", "coerce", "default", "dump_config", "load_config",
           "markdown_reference", "option", "read_prompt_file", "resolve_accumulation", "spec", "validate"]


# ---- per-field checks --------------------------------------------------------------------

def _range_text(s: Spec) -> str:
    parts = []
    for bound, op in ((s.ge, ">="), (s.gt, ">"), (s.le, "<="), (s.lt, "<")):
        if bound is not None:
            parts.append(f"{op} {bound:g}")
    return " and ".join(parts)


def _check_number(name: str, value, s: Spec):
    integer = s.kind in ("int", "int?")
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)):
        raise ConfigError(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    for bound, ok in ((s.ge, lambda b: value >= b), (s.gt, lambda b: value > b),
                      (s.le, lambda b: value <= b), (s.lt, lambda b: value < b)):
        if bound is not None and not ok(bound):
            raise ConfigError(name, f"must be {_range_text(s)}, got {value}")
    return value if integer else float(value)


def _string_list(name: str, value) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(name, f"must be a list of strings, got {value!r}")
    return list(value)


_REWARD_KEYS = ("model", "path", "weight", "variant", "preprocess")


def _reward_spec(where: str, item) -> RewardSpec:
    if isinstance(item, RewardSpec):
        item = dataclasses.asdict(item)
    if not isinstance(item, dict):
        raise ConfigError(where, f"must be a mapping like {{model: hps, path: HPS_v2.1.pt}}, got {item!r}")
    unknown = set(item) - set(_REWARD_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", f"unknown key (allowed: {', '.join(_REWARD_KEYS)})")
    model = item.get("model")
    if model not in REWARD_MODELS:
        raise ConfigError(f"{where}.model", f"must be one of {', '.join(REWARD_MODELS)}, got {model!r}")
    path = item.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}.path", f"must be the reward model's checkpoint file, got {path!r}")
    weight = _check_number(f"{where}.weight", item.get("weight", 1.0), Spec("float", "", "", ge=0))
    variant = item.get("variant")
    if variant == "seed":
        warnings.warn(f"{where}.variant 'seed' is the old name of 'videox_fun'", DeprecationWarning, stacklevel=2)
        variant = "videox_fun"
    if variant is not None and (variant not in REWARD_VARIANTS or model != "mps"):
        raise ConfigError(f"{where}.variant", f"must be null or, for MPS, one of {', '.join(REWARD_VARIANTS)} "
                          f"(official: the single-image scorer, ~100 x cosine; videox_fun: the reference's training "
                          f"reward, plain cosine), got {variant!r} for {model}")
    preprocess = item.get("preprocess")
    if preprocess not in (None,) + REWARD_PREPROCESS:
        raise ConfigError(f"{where}.preprocess", f"must be 'reference' (the reward model's own resize and pad), "
                          f"'squash' (the reference trainer's 224x224 stretch) or null, got {preprocess!r}")
    return RewardSpec(model=model, path=path, weight=weight, variant=variant, preprocess=preprocess)


def coerce(name: str, value):
    """``value`` checked against field ``name``'s declaration (type, range, choices)."""
    s = spec(name)
    kind = s.kind
    if value is None and (kind.endswith("?") or (kind == "choice" and default(name) is None)):
        return None
    if kind in ("int", "float", "int?"):
        return _check_number(name, value, s)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(name, f"must be a string, got {value!r}")
        return value
    if kind == "choice":
        if value not in s.choices:
            raise ConfigError(name, f"must be one of {', '.join(map(str, s.choices))}, got {value!r}")
        return value
    if kind in ("path", "path?"):
        if not isinstance(value, str) or not value:
            raise ConfigError(name, f"must be a {'folder' if s.folder else 'file'} path, got {value!r}")
        return value
    if kind == "str_list?":
        return _string_list(name, value)
    if kind == "str_list":
        return _string_list(name, value if value is not None else [])
    if kind == "rewards":
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(name, f"must be a list of {{model, path, weight}} mappings, got {value!r}")
        return [_reward_spec(f"{name}[{i}]", item) for i, item in enumerate(value)]
    if kind == "targets":
        return value if value == "all_linear" else _string_list(name, value)
    raise AssertionError(f"unknown kind {kind!r} of {name}")


def config_from_dict(data: dict, base_dir: str | os.PathLike | None = None,
                     check_files: bool = True) -> TrainConfig:
    """Build and validate a TrainConfig (a recipe's values first, ``data`` on top); relative
    paths resolve against ``base_dir``."""
    from .recipes import apply_recipe

    if not isinstance(data, dict):
        raise ConfigError("<root>", f"the config must be a mapping of field: value, got {type(data).__name__}")
    data = dict(data)
    for old, new in DEPRECATED_KEYS.items():
        if old in data:
            warnings.warn(f"config key {old!r} is deprecated: use {new!r}", DeprecationWarning, stacklevel=2)
            data.setdefault(new, data.pop(old))
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        key = str(unknown[0])
        close = [f for f in FIELDS if f.split("_")[0] == key.split("_")[0]]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(key, f"unknown field{hint}; see docs/training-config.md for every field")
    if data.get("recipe") is not None:
        coerce("recipe", data["recipe"])
    values: dict[str, Any] = apply_recipe(data)
    errors: list[tuple[str, str]] = []
    for key in list(values):
        try:
            values[key] = coerce(key, values[key])
        except ConfigError as exc:
            errors += exc.errors
    if errors:
        raise ConfigError(errors[0][0], errors[0][1], errors)
    cfg = TrainConfig(**values)
    if base_dir is not None:
        _resolve_paths(cfg, Path(base_dir))
    validate(cfg, check_files=check_files)
    return cfg


def _resolve_paths(cfg: TrainConfig, base: Path) -> None:
    names = [n for n in FIELDS if spec(n).kind in ("path", "path?")] + ["output_dir"]
    for name in names:
        value = getattr(cfg, name)
        if value and not os.path.isabs(os.path.expanduser(value)):
            setattr(cfg, name, str(base / value))
        elif value:
            setattr(cfg, name, os.path.expanduser(value))
    for reward in cfg.rewards + cfg.held_out_rewards:
        if not os.path.isabs(os.path.expanduser(reward.path)):
            reward.path = str(base / reward.path)


# ---- files ------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike, check_files: bool = True) -> TrainConfig:
    """Read a YAML run config (safe_load) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    return config_from_dict(data, base_dir=path.parent, check_files=check_files)


def dump_config(cfg: TrainConfig) -> str:
    """YAML text of a config (what the trainer records)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def read_prompt_file(path: str, field_name: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(field_name, f"cannot read {path}: {exc}") from exc
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(field_name, f"{path} holds no prompt (one prompt per line)")
    return prompts


# ---- the reference, generated -------------------------------------------------------------------

_KIND_TEXT = {"int": "int", "float": "float", "bool": "bool", "str": "str", "choice": "choice", "path": "file",
              "path?": "file or null", "str_list": "list of str", "str_list?": "list of str or null",
              "int?": "int or null", "rewards": "list of rewards", "targets": "all_linear or list of str"}


def markdown_reference() -> str:
    """The config reference (docs/training-config.md) from the declarations."""
    lines = ["# Trainer config reference", "",
             "Generated from the declarations in `training/trainer/config_fields.py` by `python -m training.trainer.config --markdown`; "
             "a test keeps this file equal to it. `recipe: <name>` starts from a recipe's values "
             "(`training/trainer/recipes.py`, [recipes](training.md#recipes)); the fields you set go on top.", ""]
    group = None
    for name, f in FIELDS.items():
        s = spec(name)
        if s.group != group:
            group = s.group
            lines += ["", f"## {group.capitalize()}", "", "| field | type | default | allowed | meaning |",
                      "|---|---|---|---|---|"]
        kind = _KIND_TEXT[s.kind] + (" (folder)" if s.folder else "")
        allowed = ", ".join(map(str, s.choices)) if s.choices else _range_text(s)
        value = "required" if s.required else json.dumps(default(name))
        lines.append(f"| `{name}` | {kind} | {value} | {allowed} | {s.doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(markdown_reference())
    else:
        sys.exit("usage: python -m training.trainer.config --markdown")
