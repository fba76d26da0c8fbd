"""Widgets for trainer config fields: default, range and tooltip come from the field's declaration
(training/trainer/config_fields.py), so the node and the trainer cannot disagree."""

from __future__ import annotations

from comfy_api.latest import io

from ..training.trainer.config import default, spec


def int_input(name: str, field: str, value=None, **kwargs) -> io.Int.Input:
    """An INT widget for config field ``field`` (``value``: another default, e.g. a recipe's)."""
    s = spec(field)
    low = s.ge if s.ge is not None else (s.gt + 1 if s.gt is not None else 0)
    return io.Int.Input(name, default=default(field) if value is None else value, min=int(low),
                        max=int(s.le) if s.le is not None else 10 ** 7, tooltip=kwargs.pop("tooltip", s.doc), **kwargs)


def float_input(name: str, field: str, value=None, step: float = 0.01, **kwargs) -> io.Float.Input:
    """A FLOAT widget for config field ``field``."""
    s = spec(field)
    low = s.ge if s.ge is not None else (s.gt if s.gt is not None else -1e6)
    high = s.le if s.le is not None else (s.lt if s.lt is not None else 1e6)
    return io.Float.Input(name, default=default(field) if value is None else value, min=low, max=high, step=step,
                          tooltip=kwargs.pop("tooltip", s.doc), **kwargs)


def choice_input(name: str, field: str, options=None, value=None, **kwargs) -> io.Combo.Input:
    """A combo for config field ``field`` (its choices unless ``options`` are given)."""
    s = spec(field)
    options = list(options if options is not None else s.choices)
    return io.Combo.Input(name, options=options, default=value if value is not None else default(field),
                          tooltip=kwargs.pop("tooltip", s.doc), **kwargs)
