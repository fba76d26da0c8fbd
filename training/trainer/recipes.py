"""Named training recipes: the values a run starts from before the fields it sets itself.

- ``videox_fun_low_hps`` and ``videox_fun_high_mps``: the two runs of the reference
  (VideoX-Fun ``scripts/wan2.2_fun/train_reward_lora.sh``, HEAD 804a425), value for value,
  including what it really did where its flags say otherwise: its batch of 8 is 8 GPUs x 1
  (formed here as batch_size x accumulation x processes), its ``--max_grad_norm=0.3`` never
  applied (accelerate's ``clip_grad_norm_`` returns without clipping under DeepSpeed; the
  ZeRO-2 JSON of the low-noise run has no ``gradient_clipping``, so none; the ZeRO-3 JSON of
  the high-noise run says "auto", which accelerate fills with 1.0), and its MPS reward is the
  reference's own (threshold 0.01, plain cosine) on a 224x224 stretch.
- ``recommended``: ours (the reasons are in docs/training.md#recipes): the reference's
  sampling and LoRA shape, clipping at 0.3 that really applies, and the batch of 8 formed by
  accumulation on fewer GPUs.

Paths, prompts and outputs are never part of a recipe.
"""

from __future__ import annotations

_REFERENCE = dict(
    # scripts/wan2.2_fun/train_reward_lora.sh (the low-noise command, lines 5-34)
    gradient_accumulation_steps=0,  # line 9: 1 per process; 0 here = form effective_batch from the processes
    effective_batch=8,  # line 5 --num-processes=8 x line 8 --train_batch_size=1
    batch_size=1,  # line 8
    max_steps=10000,  # line 10
    checkpoint_every=100,  # line 11
    learning_rate=1e-5,  # line 12
    seed=42,  # line 13
    gradient_checkpointing=True,  # line 15
    mixed_precision="bf16",  # line 16
    weight_decay=3e-2,  # line 17
    adam_epsilon=1e-10,  # line 18
    lora_exclude=["ffn"],  # line 21 --lora_skip_name="ffn"
    height=256,  # line 25
    width=256,  # line 26
    inference_steps=40,  # line 27
    frames=81,  # line 28
    decoded_latents=1,  # line 29
    backprop_strategy="tail",  # line 32
    backprop_steps=1,  # line 33
    # scripts/wan2.2_fun/train_reward_lora.py argparse defaults (not passed by the .sh)
    lora_rank=128,  # line 607 --rank
    lora_alpha=64.0,  # line 613 --network_alpha
    guidance_scale=6.0,  # line 719 --guidance_scale
    reward_frames=None,  # line 737 --num_sampled_frames
    lr_scheduler="constant",  # line 476 --lr_scheduler
    lr_warmup_steps=0,  # line 485: 500, unused by "constant"
    adam_beta1=0.9,  # line 517
    adam_beta2=0.999,  # line 518
    lora_targets="all_linear",  # lora_utils.py LoRANetwork: every Linear of the transformer
    negative_prompt="",  # line 1396: negative_prompt=[""] * len(train_prompt)
    # config/wan2.2/wan_civitai_i2v.yaml
    boundary=0.9,  # line 7
    shift=5.0,  # line 35
    motion_weight=0.0,
    average_last_checkpoints=0,
)

# per recipe: how each kind of reward is computed when a reward spec does not say
_REFERENCE_REWARDS = {"hps": {"preprocess": "squash"},  # reward_fn.py line 153: Resize((224, 224)), a stretch
                      # reward_fn.py line 297: Resize((224, 224)); MPS clip_model.py line 129: threshold 0.01
                      "mps": {"variant": "videox_fun", "preprocess": "squash"}}
REWARD_SETTINGS: dict[str, dict] = {
    "videox_fun_low_hps": _REFERENCE_REWARDS,
    "videox_fun_high_mps": _REFERENCE_REWARDS,
    # the models' own published preprocessing (equal to the stretch for square frames); MPS as a plain
    # cosine like HPS, so that weights of an HPS + MPS pair mean what they say
    "recommended": {"hps": {"preprocess": "reference"}, "mps": {"variant": "videox_fun", "preprocess": "reference"}},
}

RECIPES: dict[str, dict] = {
    "videox_fun_low_hps": dict(
        _REFERENCE,
        expert="low",  # line 20 --boundary_type="low"
        rewards=[{"model": "hps", "weight": 1.0}],  # line 30-31 --reward_fn="HPSReward" {"version": "v2.1"}
        max_grad_norm=0.0,  # line 5: config/zero_stage2_config.json has no gradient_clipping: none applied
    ),
    "videox_fun_high_mps": dict(
        _REFERENCE,
        expert="high",  # line 52 --boundary_type="high"
        rewards=[{"model": "mps", "weight": 1.0}],  # line 62 --reward_fn="MPSReward"
        max_grad_norm=1.0,  # line 37: zero_stage3_config_cpu_offload.json line 8 "auto" -> accelerate's 1.0
    ),
    "recommended": dict(
        _REFERENCE,
        expert="low",  # HPS v2.1 on the low-noise expert: the reference's advice (MPS converges slowly there)
        rewards=[{"model": "hps", "weight": 1.0}],
        max_grad_norm=0.3,  # what the reference asked for, really applied: bounds a step on a reward spike
        max_steps=3000,  # the released low-noise HPS2.1 LoRA is at 2,700 steps; the guards pick the best
        checkpoints_keep=3,
    ),
}


def recipe_values(name: str) -> dict:
    """The config values of recipe ``name`` (a copy; its reward specs name kinds, not files)."""
    import copy

    return copy.deepcopy(RECIPES[name])


def complete_reward(name: str, reward: dict) -> dict:
    """A reward spec with the recipe's variant and preprocessing for its kind where it gives none."""
    filled = dict(reward)
    for key, value in REWARD_SETTINGS[name].get(reward.get("model"), {}).items():
        if filled.get(key) is None:
            filled[key] = value
    return filled


def apply_recipe(data: dict) -> dict:
    """Config values: recipe ``data['recipe']``'s, then ``data``'s on top; reward specs of ``data``
    get the recipe's settings for their kind where they leave them out."""
    name = data.get("recipe")
    if name is None:
        return dict(data)
    values = recipe_values(name)
    values.update(data)
    for group in ("rewards", "held_out_rewards"):
        if isinstance(values.get(group), list):
            values[group] = [complete_reward(name, r) if isinstance(r, dict) else r for r in values[group]]
    return values


def _reward_settings(reward: dict) -> dict:
    """What a reward spec says besides its file."""
    return {"model": reward.get("model"), "weight": float(reward.get("weight", 1.0)),
            "variant": reward.get("variant"), "preprocess": reward.get("preprocess")}


def overrides(values: dict) -> dict:
    """The fields of ``values`` set on top of its recipe (value differs from the recipe's), with both
    values: {field: (recipe's, run's)}; reward files are the run's, so rewards compare without paths."""
    name = values.get("recipe")
    if name is None:
        return {}
    base = recipe_values(name)
    changed = {}
    for key, recipe_value in base.items():
        if key not in values:
            continue
        value = values[key]
        if key == "rewards":
            value = [_reward_settings(complete_reward(name, r)) for r in value]
            recipe_value = [_reward_settings(complete_reward(name, r)) for r in recipe_value]
        if value != recipe_value:
            changed[key] = (recipe_value, value)
    return changed


def recipe_overrides(cfg) -> dict:
    """``overrides`` of a validated TrainConfig: what its fields set on top of its recipe."""
    import dataclasses

    values = dataclasses.asdict(cfg)
    return overrides(values)
