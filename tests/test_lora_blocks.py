"""Block strengths: the text grammar, the factor of each Wan module, the report line, and the errors
that name the text."""

from __future__ import annotations

import pytest

from training.lora_blocks import block_count, group_by_factor, parse_block_strengths
from training.lora_format import LoraInputError


def test_ranges_and_defaults():
    b = parse_block_strengths("0-9:0.5, 10-39:1.0", 40)
    assert b.factor("blocks.0.self_attn.q") == 0.5 and b.factor("blocks.9.ffn.2") == 0.5
    assert b.factor("blocks.10.cross_attn.k") == 1.0 and b.factor("head.head") == 1.0
    assert b.describe() == "blocks 0-9 x0.5, 10-39 x1"
    assert parse_block_strengths("5:0", 40).describe() == "blocks 0-4 x1, 5 x0, 6-39 x1"


def test_one_number_per_block():
    values = [1.0] * 39 + [0.25]
    b = parse_block_strengths(", ".join(map(str, values)), 40)
    assert b.factor("blocks.39.self_attn.o") == 0.25 and b.factor("blocks.38.self_attn.o") == 1.0
    assert b.describe() == "blocks 0-38 x1, 39 x0.25"


def test_presets_scale_module_kinds_and_combine_with_ranges():
    b = parse_block_strengths("attention_only, 0-1:0.5", 40)
    assert b.factor("blocks.0.self_attn.q") == 0.5 and b.factor("blocks.0.cross_attn.v") == 0.5
    assert b.factor("blocks.0.ffn.0") == 0.0 and b.factor("blocks.5.ffn.2") == 0.0
    assert b.factor("text_embedding.0") == 0.0 and b.factor("blocks.5.self_attn.k") == 1.0
    assert "preset attention_only (ffn, modules outside the blocks x0)" in b.describe()
    half = parse_block_strengths("second_half", 40)
    assert half.factor("blocks.19.ffn.0") == 0.0 and half.factor("blocks.20.ffn.0") == 1.0
    ffn = parse_block_strengths("ffn_only", 40)
    assert ffn.factor("blocks.3.ffn.0") == 1.0 and ffn.factor("blocks.3.self_attn.q") == 0.0


def test_empty_text_is_none_and_groups_are_one_per_factor():
    assert parse_block_strengths("  ", 40) is None
    modules = ["blocks.0.self_attn.q", "blocks.1.self_attn.q", "head.head"]
    assert group_by_factor(modules, None) == {1.0: modules}
    groups = group_by_factor(modules, parse_block_strengths("0:0.5, 1:0", 2))
    assert groups == {0.5: ["blocks.0.self_attn.q"], 0.0: ["blocks.1.self_attn.q"], 1.0: ["head.head"]}


def test_block_count_from_model_keys():
    assert block_count(["diffusion_model.blocks.0.x.weight", "diffusion_model.blocks.39.y.bias", "head.head.weight"]) == 40
    assert block_count(["blocks.2.a"]) == 3 and block_count(["head.head.weight"]) == 0


@pytest.mark.parametrize("text, message", [
    ("0-40:1", r"block 40 in '0-40:1' is beyond the model's 40 blocks \(0-39\)"),
    ("0-9:nan", r"nan is not a finite number"),
    ("0-9:inf", r"is not a finite number"),
    ("3-1:1", r"range '3-1:1' ends before it starts"),
    ("0-9:x", r"'x' is not a number"),
    ("attention", r"'attention' is neither a range .* a preset \(all, attention_only"),
    ("0-5:1, 5:2", r"block 5 is given twice \('0-5:1' and '5:2'\)"),
    ("1, 2, 3", r"3 numbers, but the model has 40 blocks"),
    ("attention_only, ffn_only", r"at most one preset"),
    ("0-9:0.5, 2", r"the plain number '2' mixed with ranges"),
    ("0:11", r"11 is outside -10 to 10"),
])
def test_invalid_text_names_the_input_and_the_text(text, message):
    with pytest.raises(LoraInputError, match=rf"^block_strengths_low = {text!r}: .*{message}".replace("[", r"\[")):
        parse_block_strengths(text, 40, "block_strengths_low")
