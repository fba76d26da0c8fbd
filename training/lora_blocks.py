"""Block strengths: a LoRA's strength per transformer block and per module kind, from a text.

The text (the Wan Dual LoRA Loader's ``block_strengths_high`` / ``_low``) is one of:
- empty: every module at 1;
- one number per block, comma-separated (``1, 1, 0.5, ...``: 40 for Wan2.2 A14B);
- items ``A-B:value`` or ``N:value`` (``0-9:0.5, 10-39:1.0``; blocks not named stay at 1), and at
  most one preset name (``attention_only``, ...; see ``PRESETS``), in any order.
A module's factor is its block's factor times its kind's factor; modules outside the blocks
(embeddings, head) take the preset's ``other`` factor. The loader multiplies each module's
patch strength by its factor (a factor 0 leaves the module unpatched).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .lora_format import STRENGTH_LIMIT, LoraInputError

# Module kinds inside a Wan block (``blocks.N.<kind>.*``).
KINDS = ("self_attn", "cross_attn", "ffn")
# preset -> (factor per kind, factor of the other modules in a block, outside the blocks; block halves)
PRESETS: dict[str, dict] = {
    "all": {},
    "attention_only": {"kinds": {"ffn": 0.0}, "in_block_other": 0.0, "other": 0.0},
    "self_attention_only": {"kinds": {"cross_attn": 0.0, "ffn": 0.0}, "in_block_other": 0.0, "other": 0.0},
    "cross_attention_only": {"kinds": {"self_attn": 0.0, "ffn": 0.0}, "in_block_other": 0.0, "other": 0.0},
    "ffn_only": {"kinds": {"self_attn": 0.0, "cross_attn": 0.0}, "in_block_other": 0.0, "other": 0.0},
    "first_half": {"half": 0},
    "second_half": {"half": 1},
}
_BLOCK = re.compile(r"blocks\.(\d+)\.([a-z_]+)")
_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_ITEM = re.compile(r"^(\d+)(?:\s*-\s*(\d+))?\s*:\s*(\S+)$")


def parse_number(where: str, value: str, what: str, limit: float | None = STRENGTH_LIMIT) -> float:
    """``value`` as a finite float (within +-``limit``), or LoraInputError starting with ``where``."""
    try:
        number = float(value)
    except ValueError:
        raise LoraInputError(f"{where}: {what} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise LoraInputError(f"{where}: {what} {value} is not a finite number")
    if limit is not None and abs(number) > limit:
        raise LoraInputError(f"{where}: {what} {value} is outside {-limit:g} to {limit:g}")
    return number


@dataclass(frozen=True)
class BlockStrengths:
    """Factors per block and per module kind (``factor(module)``), and the text they came from."""

    text: str
    blocks: tuple[float, ...]
    kinds: dict[str, float] = field(default_factory=dict)
    in_block_other: float = 1.0
    other: float = 1.0
    preset: str | None = None

    def factor(self, module: str) -> float:
        """The factor of a native module path (``blocks.3.self_attn.q`` -> block 3 x self_attn)."""
        match = _BLOCK.match(module)
        if not match:
            return self.other
        kind = match.group(2)
        per_kind = self.kinds.get(kind, 1.0) if kind in KINDS else self.in_block_other
        return self.blocks[int(match.group(1))] * per_kind

    def describe(self) -> str:
        """``blocks 0-9 x0.5, 10-39 x1`` plus the preset and its kind factors."""
        runs, start = [], 0
        for i in range(1, len(self.blocks) + 1):
            if i == len(self.blocks) or self.blocks[i] != self.blocks[start]:
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                runs.append(f"{span} x{self.blocks[start]:g}")
                start = i
        text = "blocks " + ", ".join(runs)
        if self.preset and self.preset != "all":
            zero = [k for k in KINDS if self.kinds.get(k, 1.0) == 0]
            if self.other == 0:
                zero.append("modules outside the blocks")
            text += f"; preset {self.preset}" + (f" ({', '.join(zero)} x0)" if zero else "")
        return text


def check_block_strengths_text(text: str, name: str = "block_strengths") -> None:
    """Syntax only (the block count is the model's, known when the node runs); LoraInputError naming the text."""
    parse_block_strengths(text, None, name)


def parse_block_strengths(text: str | None, block_count: int | None,
                          name: str = "block_strengths") -> BlockStrengths | None:
    """None for an empty text; LoraInputError naming the input and the text for anything invalid.
    ``block_count`` None checks the syntax only."""
    raw = (text or "").strip()
    if not raw:
        return None
    where = f"{name} = {raw!r}"
    items = [item.strip() for item in raw.replace("\n", ",").split(",") if item.strip()]
    def is_number(item: str) -> bool:
        try:
            float(item)
        except ValueError:
            return False
        return True

    unknown = [item for item in items if _ITEM.match(item) is None and item not in PRESETS and not is_number(item)]
    if unknown:
        raise LoraInputError(f"{where}: {unknown[0]!r} is neither a range (A-B:value, N:value), a preset "
                             f"({', '.join(PRESETS)}) nor a number")
    numbers = [item for item in items if is_number(item)]
    if numbers and len(numbers) == len(items):
        values = tuple(parse_number(where, item, "strength") for item in items)
        if block_count is not None and len(values) != block_count:
            raise LoraInputError(f"{where}: {len(values)} numbers, but the model has {block_count} blocks: give one "
                                 f"number per block, or ranges such as 0-9:0.5")
        return BlockStrengths(raw, values)
    if numbers:
        raise LoraInputError(f"{where}: the plain number {numbers[0]!r} mixed with ranges or a preset: give either "
                             "one number per block, or ranges (A-B:value) and at most one preset")
    presets = [item for item in items if item in PRESETS]
    if len(presets) > 1:
        raise LoraInputError(f"{where}: at most one preset, got {presets}")
    preset = PRESETS[presets[0]] if presets else {}
    count = block_count if block_count is not None else 10_000
    blocks = [1.0] * count
    if "half" in preset:
        cut = count // 2
        blocks = [float((i >= cut) == bool(preset["half"])) for i in range(count)]
    seen: dict[int, str] = {}
    for item in items:
        match = _ITEM.match(item)
        if match is None:
            continue
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        value = parse_number(where, match.group(3), f"strength of {item!r}")
        if last < first:
            raise LoraInputError(f"{where}: range {item!r} ends before it starts")
        if last >= count:
            raise LoraInputError(f"{where}: block {last} in {item!r} is beyond the model's {count} blocks "
                                 f"(0-{count - 1})")
        for block in range(first, last + 1):
            if block in seen:
                raise LoraInputError(f"{where}: block {block} is given twice ({seen[block]!r} and {item!r})")
            seen[block] = item
            blocks[block] = value
    return BlockStrengths(raw, tuple(blocks) if block_count is not None else (), dict(preset.get("kinds", {})),
                          preset.get("in_block_other", 1.0), preset.get("other", 1.0), presets[0] if presets else None)


def block_count(state_dict_keys: Iterable[str]) -> int:
    """Blocks of a Wan model from its state-dict keys (``blocks.N.`` with or without ``diffusion_model.``)."""
    found = {int(m.group(1)) for key in state_dict_keys for m in [_BLOCK_INDEX.search(key)] if m}
    return max(found) + 1 if found else 0


def group_by_factor(modules: Iterable[str], strengths: BlockStrengths | None) -> dict[float, list[str]]:
    """{factor: modules}: one ComfyUI patch call per factor (modules at factor 0 included, under 0.0)."""
    groups: dict[float, list[str]] = {}
    for module in modules:
        groups.setdefault(1.0 if strengths is None else strengths.factor(module), []).append(module)
    return groups
