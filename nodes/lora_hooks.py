"""Wan Dual LoRA Step Schedule: one LoRA per expert whose strength follows keyframes over the sampling.

Built on ComfyUI's hooks (``comfy/hooks.py``, the mechanism of core's "Create Hook LoRA" and
"Set Hook Keyframes"): the LoRA becomes ``WeightHook``s with a ``HookKeyframeGroup`` attached to
the conditioning, and every sampler that gets this conditioning (KSampler, KSamplerAdvanced,
SamplerCustom) applies it, re-patching the weights when a keyframe starts. In ComfyUI 0.3.64 a
MODEL carries no weight hooks of its own: the sampler collects them from the conditioning
(``comfy/sampler_helpers.py: prepare_model_patcher``), so this node outputs conditioning per
expert, and the high and low samplers each take their own. The model inputs are only read (key
matching, shapes, block count) and not changed.
"""

from __future__ import annotations

import comfy.hooks
import folder_paths
from comfy_api.latest import io, ui

from ..training.lora_blocks import check_block_strengths_text
from ..training.lora_schedule import INTERPOLATIONS, describe_schedule, expand_linear, parse_schedule
from .lora_loader import (NONE, _block_strengths_input, _strength_input, check_widget_texts, lora_patches,
                          matched_lora)

DEFAULT_SCHEDULE = "0.0:1.0"


def keyframe_group(keyframes: list[tuple[float, float]]) -> comfy.hooks.HookKeyframeGroup:
    """Core's keyframes, each holding from its percent until the next (guarantee_steps 0: a keyframe
    starts at its percent however many steps the one before it had)."""
    group = comfy.hooks.HookKeyframeGroup()
    for percent, strength in keyframes:
        group.add(comfy.hooks.HookKeyframe(strength=strength, start_percent=percent, guarantee_steps=0))
    return group


def lora_hooks(model, lora_name, strength, expert: str, other_name: str, files: list[str], schedule: str,
               interpolation: str, block_strengths: str = "", keyframes=None):
    """(HookGroup or None, report text) of one expert's scheduled LoRA."""
    found = matched_lora(model, lora_name, strength, expert, other_name, files, block_strengths)
    if found is None:
        return None, f"lora_{expert}: None (conditioning passed through unchanged)"
    lora, report, groups = found
    if keyframes is not None:  # core's Create Hook Keyframe(s) nodes
        kf_group = keyframes
        frames = [(k.start_percent, k.strength) for k in keyframes.keyframes]
        report.scaling.append("step schedule: from the keyframes input: "
                              + ", ".join(f"{p:g}:{s:g}" for p, s in frames))
    else:
        frames = parse_schedule(schedule, f"schedule_{expert}") or [(0.0, 1.0)]
        kf_group = keyframe_group(expand_linear(frames) if interpolation == "linear" else frames)
        report.scaling.append(f"step schedule (x strength): {describe_schedule(frames, interpolation)}")
    if any(p >= 1.0 for p, _ in frames):
        report.warnings.append("a keyframe at 1.0 is never reached: the last step samples before the clean end")
    hooks = comfy.hooks.HookGroup()
    for factor, modules in groups.items():
        if factor == 0 or report.strength == 0:
            continue
        hook = comfy.hooks.WeightHook(strength_model=report.strength * factor, strength_clip=0.0)
        hook.weights = lora_patches(lora, report, modules)  # already keyed by the model's weights
        hook.need_weight_init = False
        hook.hook_keyframe = kf_group.clone()
        hooks.add(hook)
    if not len(hooks):
        report.notes.append("strength 0: LoRA not applied")
        return None, report.render()
    return hooks, report.render()


def _schedule_input(expert: str) -> io.String.Input:
    return io.String.Input(
        f"schedule_{expert}", default=DEFAULT_SCHEDULE,
        tooltip="keyframes percent:strength (x the strength above), e.g. '0.0:1.0, 0.5:0.6, 0.9:0.3'; each holds "
                "until the next. Percent of the noise schedule as ComfyUI's hook keyframes (0 = pure noise)")


class WanRewardDualLoraStepSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = [NONE] + folder_paths.get_filename_list("loras")
        return io.Schema(
            node_id="WanRewardDualLoraStepSchedule",
            display_name="Wan2.2 Dual LoRA Step Schedule (Hook Keyframes)",
            category="Wan Reward LoRA/loaders",
            description=(
                "A LoRA per Wan2.2 expert whose strength changes over the sampling steps (keyframes), through "
                "ComfyUI's hooks: connect each expert's conditioning outputs to its sampler. Any key format the "
                "Dual LoRA Loader reads; block strengths too."),
            inputs=[
                io.Model.Input("model_high", tooltip="the high-noise expert (read for matching only)"),
                io.Model.Input("model_low", tooltip="the low-noise expert (read for matching only)"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Combo.Input("lora_high", options=files, default=NONE),
                _strength_input("high"),
                _schedule_input("high"),
                io.Combo.Input("lora_low", options=files, default=NONE),
                _strength_input("low"),
                _schedule_input("low"),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="hold",
                               tooltip="hold: each keyframe until the next (ComfyUI's keyframes). linear: "
                                       "interpolated, as holds every 0.05"),
                _block_strengths_input("high"),
                _block_strengths_input("low"),
                io.HookKeyframes.Input("keyframes_high", optional=True,
                                       tooltip="core's Create Hook Keyframe(s) output: replaces schedule_high"),
                io.HookKeyframes.Input("keyframes_low", optional=True,
                                       tooltip="core's Create Hook Keyframe(s) output: replaces schedule_low"),
            ],
            outputs=[
                io.Conditioning.Output("positive_high", display_name="positive_high"),
                io.Conditioning.Output("negative_high", display_name="negative_high"),
                io.Conditioning.Output("positive_low", display_name="positive_low"),
                io.Conditioning.Output("negative_low", display_name="negative_low"),
                io.Hooks.Output("hooks_high", display_name="hooks_high"),
                io.Hooks.Output("hooks_low", display_name="hooks_low"),
                io.String.Output("report", display_name="report"),
            ],
        )

    @classmethod
    def validate_inputs(cls, strength_high=None, strength_low=None, schedule_high=None, schedule_low=None,
                        block_strengths_high=None, block_strengths_low=None) -> bool | str:
        return check_widget_texts({"strength_high": strength_high, "strength_low": strength_low},
                                  {"schedule_high": (schedule_high, parse_schedule),
                                   "schedule_low": (schedule_low, parse_schedule),
                                   "block_strengths_high": (block_strengths_high, check_block_strengths_text),
                                   "block_strengths_low": (block_strengths_low, check_block_strengths_text)})

    @classmethod
    def execute(cls, model_high, model_low, positive, negative, lora_high, strength_high, schedule_high, lora_low,
                strength_low, schedule_low, interpolation, block_strengths_high="", block_strengths_low="",
                keyframes_high=None, keyframes_low=None) -> io.NodeOutput:
        files = folder_paths.get_filename_list("loras")
        high, report_high = lora_hooks(model_high, lora_high, strength_high, "high", lora_low, files, schedule_high,
                                       interpolation, block_strengths_high, keyframes_high)
        low, report_low = lora_hooks(model_low, lora_low, strength_low, "low", lora_high, files, schedule_low,
                                     interpolation, block_strengths_low, keyframes_low)

        def hooked(cond, hooks):
            return comfy.hooks.set_hooks_for_conditioning(cond, hooks) if hooks is not None else cond

        report = f"{report_high}\n\n{report_low}"
        return io.NodeOutput(hooked(positive, high), hooked(negative, high), hooked(positive, low),
                             hooked(negative, low), high, low, report, ui=ui.PreviewText(report))


NODES = [WanRewardDualLoraStepSchedule]
