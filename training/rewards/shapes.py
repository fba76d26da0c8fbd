"""Architecture facts read from checkpoint shapes, shared by the HPS and MPS config inference."""

from __future__ import annotations

import re


def count_blocks(state_dict, prefix: str) -> int:
    """Number of numbered blocks under ``prefix`` (``prefix0.``, ``prefix1.``, ...)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for key in state_dict for m in [pattern.match(key)] if m}
    return max(found) + 1 if found else 0


def vision_head_width(width: int) -> int:
    """Head counts are not in the shapes: ViT-H (width 1280) uses 80-wide heads (16 heads), other
    widths 64-wide heads (a single head below 64)."""
    return 80 if width == 1280 else min(64, width)


def vision_heads(width: int) -> int:
    return max(1, width // vision_head_width(width))


def text_heads(width: int) -> int:
    """Text towers (open_clip and HF CLIP alike) use 64-wide heads."""
    return max(1, width // 64)
