"""The two reference recipes, as the trainer's --check-only writes them out, equal the values the
reference (VideoX-Fun, HEAD 804a425) ran with; what a run sets on top of a recipe is listed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.demo import write_tiny_run
from training.trainer.config import ConfigError, config_from_dict, resolve_accumulation
from training.trainer.recipes import overrides

PACK = Path(__file__).resolve().parents[1]
SH = "scripts/wan2.2_fun/train_reward_lora.sh"
PY = "scripts/wan2.2_fun/train_reward_lora.py"

# Every value of the reference's low-noise HPS run, with where it comes from.
REFERENCE_LOW_HPS = {
    "expert": "low",                      # SH line 20: --boundary_type="low"
    "batch_size": 1,                      # SH line 8: --train_batch_size=1
    "effective_batch": 8,                 # SH line 5: --num-processes=8, x 1 per process
    "gradient_accumulation_steps": 0,     # SH line 9: 1 per process on 8 GPUs (0 = form the batch of 8)
    "max_steps": 10000,                   # SH line 10: --max_train_steps=10000
    "checkpoint_every": 100,              # SH line 11: --checkpointing_steps=100
    "learning_rate": 1e-5,                # SH line 12: --learning_rate=1e-05
    "seed": 42,                           # SH line 13: --seed=42
    "gradient_checkpointing": True,       # SH line 15
    "mixed_precision": "bf16",            # SH line 16: --mixed_precision="bf16"
    "weight_decay": 0.03,                 # SH line 17: --adam_weight_decay=3e-2
    "adam_epsilon": 1e-10,                # SH line 18: --adam_epsilon=1e-10
    "max_grad_norm": 0.0,                 # SH line 19 asks 0.3, but under DeepSpeed accelerate does not clip and
                                          # config/zero_stage2_config.json (SH line 5) has no gradient_clipping
    "lora_exclude": ["ffn"],              # SH line 21: --lora_skip_name="ffn"
    "height": 256, "width": 256,          # SH lines 25-26
    "inference_steps": 40,                # SH line 27
    "frames": 81,                         # SH line 28: --video_length=81
    "decoded_latents": 1,                 # SH line 29: --num_decoded_latents=1
    "backprop_strategy": "tail",          # SH line 32
    "backprop_steps": 1,                  # SH line 33: --backprop_num_steps=1
    "lora_rank": 128,                     # PY line 607: --rank default 128
    "lora_alpha": 64.0,                   # PY line 613: --network_alpha default 64
    "guidance_scale": 6.0,                # PY line 719: --guidance_scale default 6.0
    "reward_frames": None,                # PY line 737: --num_sampled_frames default None
    "lr_scheduler": "constant",           # PY line 476: --lr_scheduler default "constant"
    "adam_beta1": 0.9, "adam_beta2": 0.999,  # PY lines 517-518
    "negative_prompt": "",                # PY line 1396: negative_prompt=[""] * len(train_prompt)
    "lora_targets": "all_linear",         # videox_fun/utils/lora_utils.py: every Linear of the transformer
    "boundary": 0.9,                      # config/wan2.2/wan_civitai_i2v.yaml line 7: boundary: 0.900
    "shift": 5.0,                         # config/wan2.2/wan_civitai_i2v.yaml line 35: shift: 5.0
    # SH lines 30-31: HPSReward {"version": "v2.1"}; videox_fun/reward/reward_fn.py line 153: Resize((224, 224))
    "rewards": [{"model": "hps", "weight": 1.0, "variant": None, "preprocess": "squash"}],
}
REFERENCE_HIGH_MPS = dict(
    REFERENCE_LOW_HPS,
    expert="high",                        # SH line 52: --boundary_type="high"
    max_grad_norm=1.0,                    # SH line 37: config/zero_stage3_config_cpu_offload.json line 8
                                          # "gradient_clipping": "auto", filled by accelerate with 1.0
    # SH line 62: MPSReward; reward_fn.py line 297: Resize((224, 224)); MPS clip_model.py line 129: > 0.01
    rewards=[{"model": "mps", "weight": 1.0, "variant": "videox_fun", "preprocess": "squash"}],
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipes")
    return folder, yaml.safe_load(write_tiny_run(folder).read_text())


def check_only(folder: Path, config: dict) -> dict:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, str(PACK / "training" / "train_reward_lora.py"), "--config", str(path),
                           "--check-only"], capture_output=True, text=True, timeout=120, cwd=folder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("recipe,expected", [("videox_fun_low_hps", REFERENCE_LOW_HPS),
                                             ("videox_fun_high_mps", REFERENCE_HIGH_MPS)])
def test_reference_recipes_written_out_by_check_only_equal_the_reference(tiny, recipe, expected):
    folder, config = tiny
    kind = expected["rewards"][0]["model"]
    run = {k: config[k] for k in ("high_noise_model", "low_noise_model", "vae", "prompt_embeddings", "prompts",
                                  "output_dir")}
    run.update(recipe=recipe, preflight=False, rewards=[{"model": kind, "path": config["rewards"][0]["path"]
                                                         if kind == "hps" else config["held_out_rewards"][0]["path"]}])
    checked = check_only(folder, run)
    assert checked["event"] == "checked" and checked["overrides"] == {}
    resolved = checked["config"]
    for key, value in expected.items():
        if key == "rewards":
            value = [dict(r, path=run["rewards"][0]["path"]) for r in value]
        assert resolved[key] == value, key
    assert resolved["recipe"] == recipe


def test_the_reference_batch_is_formed_from_the_processes(tiny):
    folder, config = tiny
    cfg = config_from_dict(dict(config, recipe="videox_fun_low_hps", held_out_rewards=[]))
    assert [resolve_accumulation(cfg, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError) as info:
        resolve_accumulation(cfg, 3)
    assert info.value.field == "gradient_accumulation_steps" and "batch of 8" in str(info.value)


def test_what_a_run_sets_on_top_of_a_recipe_is_listed(tiny):
    folder, config = tiny
    data = dict(config, recipe="videox_fun_low_hps", max_steps=30, held_out_rewards=[])
    listed = overrides(data)
    # the tiny run's own values differ from the reference's: each is listed with both values
    assert listed["max_steps"] == (10000, 30) and listed["lora_rank"] == (128, 4)
    assert "expert" not in listed and "rewards" not in listed  # the same hps reward, preprocess from the recipe
    cfg = config_from_dict(data)
    assert cfg.rewards[0].preprocess == "squash"  # the recipe's for hps, the run gave none
