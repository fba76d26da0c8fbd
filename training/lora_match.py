"""A LoRA checked against a model: which modules fit, what did not and why, rank/alpha/scale.

- ``match_lora(lora, model_shapes, ...) -> LoadReport``; ``LoadReport.render()`` is the text shown
  on the Dual LoRA Loader node;
- ``merged_weights(state_dict, lora, strength)``: W + strength * alpha/rank * up @ down (the trainer's
  frozen expert with a LoRA merged, and the tests' reference);
- the advice on the four official reward LoRAs (which expert each belongs to).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .lora_format import EXAMPLES, LoadedLora, LoraInputError
from .lora_keys import ALPHA, CANONICAL_PREFIX, DOWN, UP
from .lora_pairing import expert_of
from .wan_names import WAN21_I2V_MARKERS


@dataclass
class ShapeMismatch:
    key: str
    lora_shape: str
    model_key: str
    model_shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.key}: LoRA {self.lora_shape} vs model {self.model_key} {list(self.model_shape)}"


@dataclass
class LoadReport:
    """What loading one LoRA file onto one model did; ``render()`` gives the node's text."""
    slot: str
    file: str
    format: str = ""
    strength: float | None = None
    modules_in_file: int = 0
    matched: list[str] = field(default_factory=list)
    targets: dict[str, str] = field(default_factory=dict)       # matched module -> model key it patches
    unmatched: dict[str, str] = field(default_factory=dict)      # key -> why
    shape_mismatches: list[ShapeMismatch] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    alphas: list[float | None] = field(default_factory=list)
    wan21_i2v_keys: int = 0
    no_pair_keys: list[str] = field(default_factory=list)        # keys of modules that change nothing
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    scaling: list[str] = field(default_factory=list)             # how strengths vary (block strengths, schedule)

    @property
    def scales(self) -> list[float]:
        return sorted({1.0 if a is None else a / r for r, a in zip(self.ranks, self.alphas)})

    def raise_for_errors(self) -> None:
        if self.errors:
            raise LoraInputError(self.render())

    def render(self) -> str:
        strength = "" if self.strength is None else f" (strength {self.strength:g})"
        lines = [f"{self.slot}: {self.file}{strength}"]
        if self.format:
            lines.append(f"  format: {self.format}")
        lines.append(f"  modules matched: {len(self.matched)} of {self.modules_in_file}; "
                     f"keys unmatched: {len(self.unmatched)}; shape mismatches: {len(self.shape_mismatches)}")
        if self.ranks:
            alphas = sorted({"none (= rank)" if a is None else f"{a:g}" for a in self.alphas})
            scales = ", ".join(f"{s:g}" for s in self.scales)
            line = (f"  rank {', '.join(map(str, sorted(set(self.ranks))))}; alpha {', '.join(alphas)}; "
                    f"effective scale alpha/rank = {scales}")
            if self.strength is not None and len(self.scales) == 1:
                line += f" (x strength = {self.scales[0] * self.strength:g})"
            lines.append(line)
        lines += [f"  {line}" for line in self.scaling]
        for key, why in list(self.unmatched.items())[:EXAMPLES]:
            lines.append(f"  unmatched: {key} ({why})")
        for mismatch in self.shape_mismatches[:EXAMPLES]:
            lines.append(f"  shape mismatch: {mismatch}")
        shown, rest = _metadata_to_show(self.metadata)
        for key in shown:
            value = self.metadata[key]
            value = value if len(value) <= 80 else value[:77] + "..."
            lines.append(f"  metadata {key}: {value}")
        if rest:
            lines.append(f"  metadata: {len(rest)} more keys ({', '.join(rest[:3])}{', ...' if len(rest) > 3 else ''})")
        lines += [f"  ERROR: {e}" for e in self.errors]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = render


# Metadata keys the report shows, in this order (the rest are only counted).
METADATA_SHOWN: tuple[str, ...] = (
    "rank", "alpha", "network_dim", "network_alpha", "ss_network_dim", "ss_network_alpha",
    "base_model", "ss_base_model_version", "modelspec.architecture",
    "reward", "rewards", "reward_model", "expert", "steps", "ss_steps", "ss_max_train_steps",
)


def _metadata_to_show(metadata: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(keys of ``METADATA_SHOWN`` present, in that order; the other keys, sorted)."""
    shown = [k for k in METADATA_SHOWN if k in metadata]
    rest = sorted(k for k in metadata if k not in METADATA_SHOWN and k != "format")
    return shown, rest


_ARCHITECTURE_HINTS: tuple[tuple[str, str], ...] = (
    ("double_blocks", "Flux or HunyuanVideo"), ("single_blocks", "Flux or HunyuanVideo"),
    ("single_transformer_blocks", "Flux (diffusers)"), ("joint_blocks", "SD3"),
    ("transformer_blocks", "a diffusers DiT (Flux, SD3, CogVideoX, LTX-Video, ...)"),
    ("input_blocks", "a Stable Diffusion UNet"), ("down_blocks", "a Stable Diffusion UNet"),
    ("lora_te", "a Stable Diffusion text encoder"), ("text_model", "a CLIP text encoder"),
    ("vace_blocks", "Wan VACE (its extra blocks)"), ("layers.", "a language model or Lumina/Qwen-Image"),
)


def _guess_architecture(keys: Iterable[str]) -> str:
    for key in keys:
        for marker, name in _ARCHITECTURE_HINTS:
            if marker in key:
                return f"; they look like {name}, not Wan"
    return ""


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def match_lora(lora: LoadedLora, model_shapes: Mapping, *, slot: str = "lora",
               strength: float | None = None, expert: str | None = None) -> LoadReport:
    """Check a read LoRA against a model's state-dict keys and shapes.

    ``model_shapes``: parameter name (with or without ``diffusion_model.``) -> tensor
    or shape. ``expert``: "high"/"low" when known, for the advice on the official reward LoRAs.
    """
    original = {k[len(CANONICAL_PREFIX):] if k.startswith(CANONICAL_PREFIX) else k: k for k in model_shapes}
    shapes = {native: _shape(model_shapes[key]) for native, key in original.items()}
    report = LoadReport(slot=slot, file=lora.path.name, format=lora.format, strength=strength,
                        modules_in_file=len(lora.modules), metadata=dict(lora.metadata),
                        notes=list(lora.notes))
    report.unmatched.update(lora.unrecognised)
    for native, parts in lora.modules.items():
        target = f"{native}.weight" if f"{native}.weight" in shapes else native
        why = _check_module(lora, native, parts, target, shapes, report)
        if why is None:
            report.matched.append(native)
            report.targets[native] = original[target]
            if DOWN in parts:
                report.ranks.append(int(lora.tensors[parts[DOWN]].shape[0]))
                alpha = lora.tensors.get(parts.get(ALPHA, ""))
                report.alphas.append(None if alpha is None else float(alpha.float().item()))
        elif why:
            for key in parts.values():
                report.unmatched[key] = why
            if why.startswith(NO_PAIR):
                report.no_pair_keys += parts.values()
            if any(m in native for m in WAN21_I2V_MARKERS):
                report.wan21_i2v_keys += len(parts)
    _judge(lora, report)
    _official_lora_advice(lora, report, expert)
    return report


# Parts that change a weight on their own (besides a lora_up/lora_down pair), as ComfyUI's
# weight adapters read them; alpha, dora_scale and lora_mid only modify such a change.
APPLYING_PARTS = frozenset({"diff", "diff_b", "hada_w1_a", "lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"})
NO_PAIR = "no lora_up/lora_down pair"


def _check_module(lora: LoadedLora, native: str, parts: dict[str, str], target: str, shapes: dict,
                  report: LoadReport) -> str | None:
    """None if the module fits its ``target`` weight; a reason if not; "" if recorded as a shape mismatch."""
    if target not in shapes:
        return "no such module in this model"
    weight_shape = shapes[target]
    if (UP in parts) != (DOWN in parts):
        return "lora_up without lora_down" if UP in parts else "lora_down without lora_up"
    if UP not in parts and not APPLYING_PARTS.intersection(parts):
        return f"{NO_PAIR} (only {', '.join(sorted(parts))}): it changes nothing"
    before = len(report.shape_mismatches)
    if UP in parts:
        up, down = lora.tensors[parts[UP]], lora.tensors[parts[DOWN]]
        fits = (up.shape[0] == weight_shape[0] and up.shape[1] == down.shape[0]
                and math.prod(down.shape[1:]) == math.prod(weight_shape[1:]))
        if not fits:
            report.shape_mismatches.append(ShapeMismatch(
                CANONICAL_PREFIX + native, f"up {list(up.shape)} @ down {list(down.shape)}",
                CANONICAL_PREFIX + target, weight_shape))
    if "diff" in parts and _shape(lora.tensors[parts["diff"]]) != weight_shape:
        report.shape_mismatches.append(ShapeMismatch(
            parts["diff"], str(list(lora.tensors[parts["diff"]].shape)), CANONICAL_PREFIX + target, weight_shape))
    if "diff_b" in parts:
        bias_shape = shapes.get(f"{native}.bias")
        if bias_shape != _shape(lora.tensors[parts["diff_b"]]):
            report.shape_mismatches.append(ShapeMismatch(
                parts["diff_b"], str(list(lora.tensors[parts["diff_b"]].shape)),
                f"{CANONICAL_PREFIX}{native}.bias", bias_shape or ()))
    return "" if len(report.shape_mismatches) > before else None


def _judge(lora: LoadedLora, report: LoadReport) -> None:
    name = lora.path.name
    if report.wan21_i2v_keys:
        report.warnings.append(
            f"{name} looks like a Wan2.1 image-to-video LoRA: {report.wan21_i2v_keys} keys are for "
            "k_img/v_img/img_emb (the CLIP image branch), which Wan2.2 A14B does not have; they are "
            "skipped. The reference's model card links such a Wan2.1 file for the low-noise MPS LoRA: prefer "
            "the low-noise HPS2.1 file.")
    if report.shape_mismatches:
        first = report.shape_mismatches[0]
        report.errors.append(
            f"{len(report.shape_mismatches)} shape mismatches in {name}, first {first}. This LoRA was "
            "made for a model of another size (Wan2.1 1.3B, Wan2.2 5B, ...); use one made for Wan2.2 A14B.")
    no_pairs = ""
    if report.no_pair_keys:
        no_pairs = (f"{len(report.no_pair_keys)} keys belong to modules without a lora_up/lora_down pair "
                    f"(alpha, dora_scale or lora_mid alone change nothing), e.g. "
                    f"{', '.join(report.no_pair_keys[:3])}")
    if not report.matched and not report.shape_mismatches:
        examples = list(lora.unrecognised)[:3] or [k for p in lora.modules.values() for k in p.values()][:3]
        report.errors.append(
            f"nothing matched: none of the {len(lora.unrecognised) + len(lora.tensors)} keys of {name} "
            f"fits this Wan model. Keys look like: {', '.join(examples) or '(no tensors)'}"
            f"{_guess_architecture(list(lora.unrecognised) + list(lora.tensors))}."
            + (f" {no_pairs}: the file may be cut short or only a part of a LoRA." if no_pairs else ""))
        return
    if no_pairs:
        report.warnings.append(f"{no_pairs}; these modules are not applied")
    if report.unmatched and report.matched:
        report.warnings.append(
            f"partial match: {len(report.matched)} of {report.modules_in_file} modules loaded, "
            f"{len(report.unmatched)} keys skipped, e.g. {', '.join(list(report.unmatched)[:3])}")


MERGED_PARTS = frozenset({UP, DOWN, ALPHA, "diff", "diff_b"})


def merged_weights(state_dict: Mapping[str, torch.Tensor], lora: LoadedLora, strength: float,
                   modules: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The changed tensors of ``state_dict`` with the LoRA merged, in float32.

    ``W + strength * alpha/rank * up @ down`` (scale 1 without alpha), ``+ strength * diff``
    and ``bias + strength * diff_b``, the rules ComfyUI applies lazily; used for checks and
    exports. Keys are those of ``state_dict`` (with or without ``diffusion_model.``).
    ``modules`` (default: all of the LoRA's) must all be in ``state_dict``. Raises
    LoraInputError for what this merge does not compute (dora_scale, lora_mid, LoHa, LoKr,
    half pairs, modules or biases missing from ``state_dict``) rather than leaving it out.
    """
    by_native = {k[len(CANONICAL_PREFIX):] if k.startswith(CANONICAL_PREFIX) else k: k for k in state_dict}
    chosen = list(lora.modules if modules is None else modules)
    problems = []
    for native in chosen:
        parts = lora.modules[native]
        problems += [f"{key} ({part} is not merged here)" for part, key in parts.items() if part not in MERGED_PARTS]
        if (UP in parts) != (DOWN in parts):
            problems.append(f"{parts.get(UP) or parts[DOWN]} (half of an up/down pair)")
        if (by_native.get(f"{native}.weight") or by_native.get(native)) is None:
            problems.append(f"{native} (no such weight in the state dict)")
        if "diff_b" in parts and by_native.get(f"{native}.bias") is None:
            problems.append(f"{parts['diff_b']} (no {native}.bias in the state dict)")
    if problems:
        raise LoraInputError(f"merged_weights: {lora.path.name}: cannot merge {len(problems)} parts, e.g. "
                             f"{'; '.join(problems[:5])}")
    out: dict[str, torch.Tensor] = {}
    for native in chosen:
        parts = lora.modules[native]
        name = by_native.get(f"{native}.weight") or by_native[native]
        weight = out.get(name, state_dict[name].float())
        if UP in parts:
            up, down = lora.tensors[parts[UP]].float(), lora.tensors[parts[DOWN]].float()
            alpha = lora.tensors.get(parts.get(ALPHA, ""))
            scale = 1.0 if alpha is None else float(alpha.float().item()) / down.shape[0]
            delta = up.flatten(1) @ down.flatten(1)
            weight = weight + strength * scale * delta.reshape(weight.shape)
        if "diff" in parts:
            weight = weight + strength * lora.tensors[parts["diff"]].float()
        out[name] = weight
        if "diff_b" in parts:
            bias = by_native[f"{native}.bias"]
            out[bias] = state_dict[bias].float() + strength * lora.tensors[parts["diff_b"]].float()
    return out


# --------------------------------------------------------------------------- the official reward LoRAs
OFFICIAL_NAME = re.compile(r"Wan2\.2-Fun-A14B-InP-(high|low)-noise-(HPS2\.1|MPS)\.safetensors$", re.I)
OFFICIAL_RANK, OFFICIAL_ALPHA = 128, 64.0


def official_reward_lora(file_name: str) -> tuple[str, str] | None:
    """("high"|"low", "HPS2.1"|"MPS") for one of the four official reward LoRA files, else None."""
    match = OFFICIAL_NAME.search(file_name)
    return None if match is None else (match.group(1).lower(), match.group(2).upper())


def _reward_of(lora: LoadedLora) -> str | None:
    official = official_reward_lora(lora.path.name)
    if official:
        return official[1]
    for key, value in lora.metadata.items():
        if "reward" in key.lower():
            for reward in ("HPS", "MPS"):
                if reward in value.upper():
                    return reward
    return "MPS" if re.search(r"(?<![A-Za-z])MPS(?![A-Za-z])", lora.path.name) else None


def _official_lora_advice(lora: LoadedLora, report: LoadReport, expert: str | None) -> None:
    official = official_reward_lora(lora.path.name)
    if official:
        report.notes.append(f"official Wan2.2-Fun reward LoRA: {official[0]}-noise expert, reward "
                            f"{official[1]} (expected rank {OFFICIAL_RANK}, alpha {OFFICIAL_ALPHA:g})")
        if report.ranks and (set(report.ranks) != {OFFICIAL_RANK}
                             or {a for a in report.alphas} != {OFFICIAL_ALPHA}):
            report.warnings.append(
                f"{lora.path.name} should have rank {OFFICIAL_RANK} and alpha {OFFICIAL_ALPHA:g}; "
                f"it has rank {sorted(set(report.ranks))} and alpha {sorted({str(a) for a in report.alphas})}: "
                "it may be another file under the official name")
    marked = expert_of(lora.path.name)
    if expert and marked and marked != expert:
        report.warnings.append(f"{lora.path.name} is named for the {marked}-noise expert but is loaded "
                               f"on the {expert}-noise model")
    reward = _reward_of(lora)
    if expert == "low" and reward and reward.startswith("MPS"):
        report.warnings.append(
            "MPS reward LoRA on the low-noise expert: the reference's model card reports that it converges slowly and may "
            "disappoint; the low-noise HPS2.1 LoRA is recommended there.")
