"""LoRA key names of every common Wan trainer -> one canonical ComfyUI naming.

Canonical key: ``diffusion_model.<native module>.<part>`` where the native module is
the original Wan / ComfyUI path (``blocks.0.self_attn.q``) and the part is
``lora_up.weight``, ``lora_down.weight``, ``alpha`` (or a pass-through part ComfyUI
understands: ``diff``, ``diff_b``, ``dora_scale``, ``lora_mid.weight``, LoHa/LoKr).

Written by hand because no library maps single LoRA keys of all these trainers to
Wan's native names (diffusers and ComfyUI each convert only some, see docs/lora-formats.md).
Underscore-joined names (kohya ``blocks_0_self_attn_q``) are ambiguous, so they are
resolved against the table of known module names, never by a blind ``_`` -> ``.``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .wan_names import BLOCK_NAMES, TOP_NAMES, translate

CANONICAL_PREFIX = "diffusion_model."

# Prefixes followed by a dotted module path, with the trainer they come from.
DOTTED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "ComfyUI checkpoint"),
    ("diffusion_model.", "ComfyUI"),
    ("base_model.model.", "PEFT"),
    ("transformer.", "diffusers/PEFT"),
    ("pipe.dit.", "DiffSynth-Studio"),
)
# Prefixes followed by an underscore-joined module path.
UNDERSCORE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet__", "VideoX-Fun"),
    ("lora_unet_", "kohya/musubi-tuner"),
    ("lycoris_", "ai-toolkit/LyCORIS"),
    ("lora_transformer_", "kohya-style lora_transformer_"),
)

# Parts after the module path -> canonical part.
UP, DOWN, ALPHA = "lora_up.weight", "lora_down.weight", "alpha"
PART_ALIASES: dict[str, str] = {
    "lora_up.weight": UP, "lora_down.weight": DOWN,
    "lora_B.weight": UP, "lora_A.weight": DOWN,
    "lora.up.weight": UP, "lora.down.weight": DOWN,
    "lora_linear_layer.up.weight": UP, "lora_linear_layer.down.weight": DOWN,
    "lora_B": UP, "lora_A": DOWN,
    "alpha": ALPHA,
}
PASS_THROUGH_PARTS: frozenset[str] = frozenset({
    "diff", "diff_b", "dora_scale", "lora_mid.weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
})
_PARTS_LONGEST_FIRST = sorted(set(PART_ALIASES) | PASS_THROUGH_PARTS, key=len, reverse=True)

# Names some trainers mix (native attention name + diffusers layer name).
_MIXED_BLOCK_ALIASES: dict[str, str] = {
    f"{attn}.{d}": f"{attn}.{n}"
    for attn in ("self_attn", "cross_attn")
    for d, n in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))
}
_MIXED_BLOCK_ALIASES.update({"ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"})


def _tables(sep: str) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    """{namespace: (block inner name -> native inner, top name -> native)} joined by sep."""
    def j(name: str) -> str:
        return name.replace(".", sep)
    mixed = {j(k): v for k, v in _MIXED_BLOCK_ALIASES.items()}
    native_block = {j(n): n for n, _ in BLOCK_NAMES} | mixed
    diffusers_block = {j(d): n for n, d in BLOCK_NAMES} | mixed
    native_top = {j(n): n for n, _ in TOP_NAMES}
    diffusers_top = {j(d): n for n, d in TOP_NAMES}
    return {"native": (native_block, native_top), "diffusers": (diffusers_block, diffusers_top)}


_TABLES = {".": _tables("."), "_": _tables("_")}


def resolve_module(name: str, sep: str, namespace: str) -> str | None:
    """Native module path of ``name`` (joined by ``sep``) read in ``namespace``, or None."""
    return translate(name, *_TABLES[sep][namespace], sep=sep)


@dataclass(frozen=True)
class ParsedKey:
    """One file key split into where it came from, its module and its part."""
    raw: str
    source: str          # trainer family guessed from the prefix ("" for none)
    sep: str             # "." or "_": how the module path is joined
    module: str          # module path as written (prefix and part removed)
    part: str            # canonical part (lora_up.weight, alpha, diff, ...)
    peft_names: bool     # lora_A/lora_B naming
    peft_default: bool   # had PEFT's ".default." adapter name


def parse_key(raw: str) -> ParsedKey | None:
    """Split a LoRA file key; None if its part is not a LoRA tensor we know."""
    key = raw.replace(".default.", ".")
    had_default = key != raw or key.endswith(".default")
    if key.endswith(".default"):
        key = key[: -len(".default")]
    source, sep = "", "."
    for prefix, family in UNDERSCORE_PREFIXES:
        if key.startswith(prefix):
            key, source, sep = key[len(prefix):], family, "_"
            break
    else:
        stripped = True
        while stripped:  # prefixes may stack: base_model.model.transformer.
            stripped = False
            for prefix, family in DOTTED_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    source = source or family
                    stripped = True
    if sep == "_":
        module, _, part = key.partition(".")
    else:
        part = next((p for p in _PARTS_LONGEST_FIRST if key.endswith("." + p)), "")
        module = key[: -len(part) - 1] if part else key
    if part in PART_ALIASES:
        canonical = PART_ALIASES[part]
    elif part in PASS_THROUGH_PARTS:
        canonical = part
    else:
        return None
    return ParsedKey(raw, source, sep, module, canonical, part.startswith(("lora_A", "lora_B")), had_default)


def choose_namespace(parsed: list[ParsedKey]) -> str:
    """"diffusers" if any module only reads as a diffusers name, else "native".

    Needed because a few names exist in both with different meanings (diffusers
    swaps ``norm2``/``norm3``), so the whole file is read in one namespace.
    """
    for key in parsed:
        if (resolve_module(key.module, key.sep, "native") is None
                and resolve_module(key.module, key.sep, "diffusers") is not None):
            return "diffusers"
    return "native"


def native_module(key: ParsedKey, namespace: str) -> str | None:
    """Native path of a parsed key, preferring ``namespace``, else the other one."""
    other = "native" if namespace == "diffusers" else "diffusers"
    return resolve_module(key.module, key.sep, namespace) or resolve_module(key.module, key.sep, other)


def canonical_key(native: str, part: str) -> str:
    return f"{CANONICAL_PREFIX}{native}.{part}"


def describe_source(parsed: list[ParsedKey], namespace: str) -> str:
    """Human name of the format, e.g. 'VideoX-Fun, lora_up/lora_down'."""
    names = []
    for source in sorted({k.source for k in parsed}):
        if source == "ComfyUI" and namespace == "diffusers":
            names.append("finetrainers (diffusion_model. + diffusers names)")
        elif source == "" and any(k.peft_default and k.source == "" for k in parsed):
            names.append("DiffSynth-Studio/PEFT (no prefix, .default.)")
        elif source == "":
            names.append(f"bare {namespace} names")
        elif namespace == "diffusers" and source in ("diffusers/PEFT", "PEFT", "DiffSynth-Studio"):
            names.append(f"{source} (diffusers names)")
        else:
            names.append(source)
    if not any(k.part in (UP, DOWN) for k in parsed):
        style = "no up/down pairs"
    else:
        style = "lora_A/lora_B" if any(k.peft_names for k in parsed) else "lora_up/lora_down"
    return f"{' + '.join(names) or 'unknown'}, {style}"
