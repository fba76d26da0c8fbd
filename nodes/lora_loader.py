"""Wan Dual LoRA Loader: one LoRA per Wan2.2 expert, any key format, with a load report.

Keys are renamed by ``training.lora_format`` and then handed to ComfyUI's own LoRA
path (``comfy.lora.load_lora`` + ``ModelPatcher.clone().add_patches``), so patching is
lazy and reversible like core's loader: no weight is copied, and changing a strength
re-runs only this node (the file stays in the module-level cache below).
"""

from __future__ import annotations


import comfy.lora
import folder_paths
from comfy_api.latest import io, ui

from ..training.lora_blocks import (PRESETS, block_count, check_block_strengths_text, group_by_factor,
                                    parse_block_strengths)
from ..training.lora_format import STRENGTH_LIMIT, LoadedLora, LoraInputError, check_strength, read_lora
from ..training.lora_match import LoadReport, match_lora
from ..training.lora_keys import CANONICAL_PREFIX
from ..training.file_cache import FileCache, file_identity
from ..training.lora_pairing import partner_name
from ..training.safe_io import UserFileError

NONE = "None"
_CACHE: FileCache[LoadedLora] = FileCache(size=4)


def read_cached(path: str) -> LoadedLora:
    """``read_lora``, kept while the file is unchanged (training/file_cache.py says when it is stale)."""
    return _CACHE.get(path, lambda: read_lora(path))


def matched_lora(model, lora_name: str, strength, expert: str, other_name: str, files: list[str],
                 block_strengths: str = "") -> tuple[LoadedLora, LoadReport, dict[float, list[str]]] | None:
    """The read LoRA, its report on ``model`` and its matched modules grouped by block-strength
    factor; None when the slot is empty. Raises LoraInputError naming the input."""
    slot, other_slot = f"lora_{expert}", f"lora_{'low' if expert == 'high' else 'high'}"
    if not lora_name or lora_name == NONE:
        return None
    strength = check_strength(strength, f"strength_{expert}")
    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        raise LoraInputError(f"{slot}: {lora_name} is not in ComfyUI's loras folders "
                             f"({', '.join(folder_paths.get_folder_paths('loras'))})")
    try:
        lora = read_cached(path)
    except UserFileError as exc:  # unreadable, corrupt, pickled code: say which input chose it
        raise LoraInputError(f"{slot}: {exc}") from None
    state = model.model.state_dict()
    shapes = {k: v.shape for k, v in state.items()}
    blocks = parse_block_strengths(block_strengths, block_count(state),
                                   f"block_strengths_{expert}")
    report = match_lora(lora, shapes, slot=slot, strength=strength, expert=expert)
    partner = partner_name(lora_name, files)
    if partner:
        where = "loaded there" if partner == other_name else f"{other_slot} is {other_name}"
        report.notes.append(f"partner file found: {partner} ({where})")
    report.raise_for_errors()
    groups = group_by_factor(report.matched, blocks)
    if blocks is not None:
        report.scaling.append(f"block strengths ({blocks.text}): {blocks.describe()}")
        if groups.get(0.0):
            report.scaling.append(f"{len(groups[0.0])} modules at factor 0: not patched")
    return lora, report, groups


def lora_patches(lora: LoadedLora, report: LoadReport, modules: list[str]) -> dict:
    """ComfyUI patches (``comfy.lora.load_lora``) of ``modules``, keyed by the model weights they patch."""
    # canonical module prefix -> the model key it patches; ComfyUI's generic key map
    # (model_lora_keys_unet) maps the same names, but for every module of the model
    key_map = {CANONICAL_PREFIX + m: report.targets[m] for m in modules}
    return comfy.lora.load_lora(lora.subset(modules), key_map, log_missing=False)


def apply_lora(model, lora_name: str, strength, expert: str, other_name: str, files: list[str],
               block_strengths: str = ""):
    """(patched clone of ``model`` or ``model`` itself, report text) for one expert."""
    found = matched_lora(model, lora_name, strength, expert, other_name, files, block_strengths)
    if found is None:
        return model, f"lora_{expert}: None (model passed through unchanged)"
    lora, report, groups = found
    if report.strength == 0:
        report.notes.append("strength 0: LoRA not applied")
        return model, report.render()
    patched = model.clone()
    missing = []
    for factor, modules in groups.items():
        if factor == 0:
            continue
        patches = lora_patches(lora, report, modules)
        applied = set(patched.add_patches(patches, report.strength * factor))
        missing += [str(k) for k in patches if k not in applied]
    if missing:
        report.warnings.append(f"{len(missing)} patches found no weight in the model, e.g. {', '.join(missing[:3])}")
    return patched, report.render()


def _block_strengths_input(expert: str) -> io.String.Input:
    return io.String.Input(
        f"block_strengths_{expert}", default="", optional=True,
        tooltip="Strength per block (x strength): empty = all 1; ranges '0-9:0.5, 10-39:1.0'; one number per block "
                f"(40 for A14B); and/or one preset: {', '.join(PRESETS)}")


def check_widget_texts(strengths: dict, texts: dict) -> bool | str:
    """``validate_inputs`` of the LoRA nodes: True, or the message naming the first bad input.
    ``strengths``: name -> value; ``texts``: name -> (value, checker). None: linked, checked when it runs."""
    try:
        for name, value in strengths.items():
            if value is not None:
                check_strength(value, name)
        for name, (value, check) in texts.items():
            if isinstance(value, str):
                check(value, name)
    except LoraInputError as exc:
        return str(exc)
    return True


def _strength_input(expert: str) -> io.Float.Input:
    return io.Float.Input(
        f"strength_{expert}", default=0.5, min=-STRENGTH_LIMIT, max=STRENGTH_LIMIT, step=0.01,
        tooltip="Multiplies alpha/rank * up @ down. Official reward LoRAs: start at 0.5-0.7. 0 = off.")


class WanRewardDualLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = [NONE] + folder_paths.get_filename_list("loras")
        return io.Schema(
            node_id="WanRewardDualLoraLoader",
            display_name="Wan2.2 Dual LoRA Loader (High + Low Noise)",
            category="Wan Reward LoRA/loaders",
            description=(
                "Applies one LoRA to the Wan2.2 high-noise expert and one to the low-noise expert, in "
                "any common key format (VideoX-Fun, kohya/musubi, ComfyUI, PEFT/diffusers, DiffSynth, "
                "ai-toolkit, finetrainers). Chain several to stack LoRAs. The report says what loaded."),
            inputs=[
                io.Model.Input("model_high", tooltip="The high-noise expert (first sampler)."),
                io.Model.Input("model_low", tooltip="The low-noise expert (second sampler)."),
                io.Combo.Input("lora_high", options=files, default=NONE,
                               tooltip="LoRA for the high-noise expert (ComfyUI's loras folder)."),
                _strength_input("high"),
                io.Combo.Input("lora_low", options=files, default=NONE,
                               tooltip="LoRA for the low-noise expert. Choosing a high/low-named file "
                                       "proposes its partner here."),
                _strength_input("low"),
                _block_strengths_input("high"),
                _block_strengths_input("low"),
            ],
            outputs=[
                io.Model.Output("model_high_out", display_name="model_high"),
                io.Model.Output("model_low_out", display_name="model_low"),
                io.String.Output("report", display_name="report"),
            ],
        )

    @classmethod
    def validate_inputs(cls, strength_high=None, strength_low=None, block_strengths_high=None,
                        block_strengths_low=None) -> bool | str:
        return check_widget_texts({"strength_high": strength_high, "strength_low": strength_low},
                                  {"block_strengths_high": (block_strengths_high, check_block_strengths_text),
                                   "block_strengths_low": (block_strengths_low, check_block_strengths_text)})

    @classmethod
    def fingerprint_inputs(cls, lora_high=None, lora_low=None, **_) -> tuple:
        """Changes when a chosen file is replaced, so ComfyUI re-runs the node (same key as the cache)."""
        keys = []
        for name in (lora_high, lora_low):
            path = folder_paths.get_full_path("loras", name) if name and name != NONE else None
            try:
                keys.append(file_identity(path) if path else None)
            except OSError:
                keys.append(None)
        return tuple(keys)

    @classmethod
    def execute(cls, model_high, model_low, lora_high, strength_high, lora_low, strength_low,
                block_strengths_high="", block_strengths_low="") -> io.NodeOutput:
        files = folder_paths.get_filename_list("loras")
        high, report_high = apply_lora(model_high, lora_high, strength_high, "high", lora_low, files,
                                       block_strengths_high)
        low, report_low = apply_lora(model_low, lora_low, strength_low, "low", lora_high, files, block_strengths_low)
        report = f"{report_high}\n\n{report_low}"
        return io.NodeOutput(high, low, report, ui=ui.PreviewText(report))


NODES = [WanRewardDualLoraLoader]
