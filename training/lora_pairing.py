"""Which expert a LoRA file name marks, and its partner file for the other expert.

Only expert markers count: ``high_noise`` / ``high-noise`` / ``highnoise`` (lower,
Capitalised or UPPER case, also camel-case ``HighNoise``), and ``HIGH`` as a whole
upper-case token (``_HIGH_``, ``-HIGH.``), with the ``low`` equivalents. Ordinary
words are not markers: ``mps_low_light``, ``high_detail``, ``low-res``, ``highres``.
The partner swaps every marker, keeping its case. ``web/lora_pairing.js``
implements the same rule for the node's dropdowns (``web/dual_lora_loader.js`` uses
it); keep the two in step.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# No flags, so that the JS copy is the same text.
_MARKER = re.compile(r"(?<![A-Za-z])(?:high|low|High|Low|HIGH|LOW)(?=[_-]?(?:noise|Noise|NOISE))"
                     r"|(?<=[a-z])(?:High|Low)(?=Noise)"
                     r"|(?<![A-Za-z0-9])(?:HIGH|LOW)(?![A-Za-z0-9])")
_SWAP = {"high": "low", "low": "high"}


def _same_case(word: str, like: str) -> str:
    if like.isupper():
        return word.upper()
    if like[:1].isupper():
        return word.capitalize()
    return word


def expert_of(name: str) -> str | None:
    """"high", "low" or None (no marker, or both kinds in the file name)."""
    kinds = {m.group(0).lower() for m in _MARKER.finditer(_basename(name))}
    return kinds.pop() if len(kinds) == 1 else None


def swap_markers(name: str) -> str:
    return _MARKER.sub(lambda m: _same_case(_SWAP[m.group(0).lower()], m.group(0)), name)


def partner_name(name: str, available: Iterable[str]) -> str | None:
    """The other expert's file among ``available``, or None.

    Tries the whole relative path swapped first (``high/x_high.safetensors`` ->
    ``low/x_low.safetensors``), then only the file name.
    """
    if not name or expert_of(name) is None:
        return None
    available = set(available)
    whole = swap_markers(name)
    folder, sep, base = name.replace("\\", "/").rpartition("/")
    base_only = folder + sep + swap_markers(base)
    for candidate in (whole, base_only):
        if candidate != name and candidate in available:
            return candidate
    return None


def _basename(name: str) -> str:
    return name.replace("\\", "/").rsplit("/", 1)[-1]
