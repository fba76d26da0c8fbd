"""Step schedules: the keyframe text, the held strength, linear interpolation as holds, and errors that
name the input and the text."""

from __future__ import annotations

import pytest

from training.lora_format import LoraInputError
from training.lora_schedule import describe_schedule, expand_linear, parse_schedule, strength_at


def test_keyframes_are_sorted_and_held():
    frames = parse_schedule("0.5:0.6, 0.0:1.0, 0.9:0.3")
    assert frames == [(0.0, 1.0), (0.5, 0.6), (0.9, 0.3)]
    assert [strength_at(frames, p) for p in (0.0, 0.49, 0.5, 0.89, 0.95)] == [1.0, 1.0, 0.6, 0.6, 0.3]
    assert describe_schedule(frames) == "0:1, 0.5:0.6, 0.9:0.3 (holds)"
    assert parse_schedule("") is None and parse_schedule(" \n ") is None


def test_linear_interpolation_as_holds_every_step():
    holds = expand_linear([(0.0, 1.0), (0.5, 0.0), (1.0, 0.5)])
    assert len(holds) == 21 and holds[0] == (0.0, 1.0) and holds[-1] == (1.0, 0.5)
    assert dict(holds)[0.25] == pytest.approx(0.5) and dict(holds)[0.75] == pytest.approx(0.25)
    assert expand_linear([(0.0, 0.7)]) == [(0.0, 0.7)]


@pytest.mark.parametrize("text, message", [
    ("0.5:1.0", r"the first keyframe must be at 0.0"),
    ("0.0:1.0, 1.5:0.2", r"percent 1.5 of '1.5:0.2' is outside 0-1"),
    ("0.0:1.0, 0.4:nan", r"strength of '0.4:nan' nan is not a finite number"),
    ("0.0:1.0, 0.4", r"'0.4' is not a keyframe 'percent:strength'"),
    ("0.0:1.0, 0.0:0.5", r"two keyframes at the same percent"),
    ("0.0:x", r"strength of '0.0:x' 'x' is not a number"),
    ("0.0:12", r"strength of '0.0:12' 12 is outside -10 to 10"),
])
def test_invalid_text_names_the_input_and_the_text(text, message):
    with pytest.raises(LoraInputError, match=rf"^schedule_low = {text!r}: {message}"):
        parse_schedule(text, "schedule_low")
