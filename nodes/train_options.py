"""Reward LoRA Train Options: the guards against reward hacking, as one output linked into the
Train node (validation, held-out rewards, the gaming guard, samples, checkpoint averaging, the
motion term), so the main node stays readable."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from .config_inputs import choice_input, float_input, int_input
from .folders import REWARD_MODELS

NONE = "none"
TrainOptionsType = io.Custom("WAN_REWARD_TRAIN_OPTIONS")
VARIANTS = ("recipe", "official", "videox_fun")
PREPROCESS = ("recipe", "reference", "squash")


class WanRewardLoraTrainOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        rewards = [NONE] + folder_paths.get_filename_list(REWARD_MODELS)
        return io.Schema(
            node_id="WanRewardLoraTrainOptions",
            display_name="Reward LoRA Train Options",
            category="Wan Reward LoRA/training",
            description=("Guards against reward hacking for Reward LoRA Train: validation prompts scored with "
                         "held-out rewards and motion, the gaming guard, the best LoRA, sample frames while "
                         "training, checkpoint averaging and the motion-preserving term."),
            inputs=[
                io.String.Input("validation_prompts", multiline=True, default="",
                                tooltip="held-out prompts, one per line (never trained on); validation needs them"),
                int_input("validation_every", "validation_every", value=100),
                io.Combo.Input("held_out_reward", options=rewards, default=NONE,
                               tooltip="a reward never optimised, scored on the validation prompts (e.g. MPS when "
                                       "training on HPS): the best LoRA is chosen by it"),
                io.Combo.Input("held_out_variant", options=list(VARIANTS), default="recipe",
                               tooltip="MPS only: official (~100 x cosine) or videox_fun (plain cosine)"),
                io.Combo.Input("held_out_reward_2", options=rewards, default=NONE),
                choice_input("gaming_guard", "gaming_guard"),
                int_input("gaming_patience", "gaming_patience"),
                int_input("sample_every", "sample_every"),
                int_input("average_last_checkpoints", "average_last_checkpoints"),
                float_input("motion_weight", "motion_weight"),
                io.Image.Input("validation_start_images", optional=True,
                               tooltip="I2V / Fun-InP: start images of the validation prompts (prompt i: image i mod N)"),
                io.String.Input("validation_start_images_folder", default="", optional=True,
                                tooltip="instead: a folder of images in ComfyUI's input folder"),
            ],
            outputs=[TrainOptionsType.Output("options", display_name="options")],
        )

    @classmethod
    def execute(cls, validation_prompts, validation_every, held_out_reward, held_out_variant, held_out_reward_2,
                gaming_guard, gaming_patience, sample_every, average_last_checkpoints, motion_weight,
                validation_start_images=None, validation_start_images_folder="") -> io.NodeOutput:
        held_out = [(name, input_name) for name, input_name in ((held_out_reward, "held_out_reward"),
                                                                (held_out_reward_2, "held_out_reward_2"))
                    if name and name != NONE]
        options = {
            "validation_prompts": [p.strip() for p in (validation_prompts or "").splitlines() if p.strip()],
            "validation_every": int(validation_every), "held_out": held_out, "held_out_variant": held_out_variant,
            "gaming_guard": gaming_guard, "gaming_patience": int(gaming_patience), "sample_every": int(sample_every),
            "average_last_checkpoints": int(average_last_checkpoints), "motion_weight": float(motion_weight),
            "validation_start_images": validation_start_images,
            "validation_start_images_folder": (validation_start_images_folder or "").strip(),
        }
        return io.NodeOutput(options)


NODES = [WanRewardLoraTrainOptions]
