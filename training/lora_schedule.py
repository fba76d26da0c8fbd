"""Step schedules: a LoRA strength that changes over the sampling, from a text of keyframes.

``"0.0:1.0, 0.5:0.6, 0.9:0.3"``: from 0% of the sampling the strength is 1.0, from 50% 0.6, from
90% 0.3 (each keyframe holds until the next). The percent is ComfyUI's, as core's "Set Hook
Keyframes" and "ConditioningSetTimestepRange" use it: a point of the model's noise schedule
(0 = pure noise, 1 = clean), which a sampler reaches at a step that depends on the scheduler
and the model's shift, not the step count. ``linear`` interpolation turns the keyframes into
holds every ``LINEAR_STEP`` (ComfyUI's keyframes only hold).
"""

from __future__ import annotations

import re

from .lora_blocks import parse_number
from .lora_format import LoraInputError

INTERPOLATIONS = ("hold", "linear")
LINEAR_STEP = 0.05
_KEYFRAME = re.compile(r"^(\S+)\s*:\s*(\S+)$")


def parse_schedule(text: str | None, name: str = "schedule") -> list[tuple[float, float]] | None:
    """[(percent, strength), ...] sorted, first at 0.0; None for an empty text. LoraInputError naming
    the input and the text for anything invalid."""
    raw = (text or "").strip()
    if not raw:
        return None
    where = f"{name} = {raw!r}"
    keyframes = []
    for item in (part.strip() for part in raw.replace("\n", ",").split(",")):
        if not item:
            continue
        match = _KEYFRAME.match(item)
        if match is None:
            raise LoraInputError(f"{where}: {item!r} is not a keyframe 'percent:strength' (e.g. 0.5:0.6)")
        percent = parse_number(where, match.group(1), f"percent of {item!r}", limit=None)
        strength = parse_number(where, match.group(2), f"strength of {item!r}")
        if not 0.0 <= percent <= 1.0:
            raise LoraInputError(f"{where}: percent {percent:g} of {item!r} is outside 0-1 (0 = the first step)")
        keyframes.append((percent, strength))
    percents = [p for p, _ in keyframes]
    if len(set(percents)) != len(percents):
        raise LoraInputError(f"{where}: two keyframes at the same percent")
    keyframes.sort()
    if keyframes[0][0] != 0.0:
        raise LoraInputError(f"{where}: the first keyframe must be at 0.0 (the strength at the start), got "
                             f"{keyframes[0][0]:g}")
    return keyframes


def strength_at(keyframes: list[tuple[float, float]], percent: float) -> float:
    """The held strength at ``percent``: that of the last keyframe at or before it."""
    return [s for p, s in keyframes if p <= percent][-1]


def expand_linear(keyframes: list[tuple[float, float]], step: float = LINEAR_STEP) -> list[tuple[float, float]]:
    """Holds every ``step`` whose strength is the linear interpolation at their start."""
    if len(keyframes) == 1:
        return list(keyframes)
    out = []
    count = int(round(1.0 / step))
    for i in range(count + 1):
        percent = round(i * step, 10)
        for (p0, s0), (p1, s1) in zip(keyframes, keyframes[1:]):
            if p0 <= percent <= p1:
                out.append((percent, s0 + (s1 - s0) * (percent - p0) / (p1 - p0)))
                break
        else:
            out.append((percent, keyframes[-1][1]))
    return out


def describe_schedule(keyframes: list[tuple[float, float]], interpolation: str = "hold") -> str:
    text = ", ".join(f"{p:g}:{s:g}" for p, s in keyframes)
    return f"{text} ({'holds' if interpolation == 'hold' else 'linear, as holds every ' + format(LINEAR_STEP, 'g')})"
