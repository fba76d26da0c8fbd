"""Run configs: bad values are rejected before any model loads, naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.trainer.config import ConfigError, config_from_dict, load_config
from training.trainer.progress import EXIT_CONFIG

PACK = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real tiny model files (the config check reads their contents) under the names good() uses."""
    from training.demo import write_tiny_run

    folder = tmp_path_factory.mktemp("cfg")
    write_tiny_run(folder)
    models = folder / "models"
    for source, name in (("wan2.2_tiny_high_noise.safetensors", "high.safetensors"),
                         ("wan2.2_tiny_low_noise.safetensors", "low.safetensors"),
                         ("wan_2.1_vae_tiny.safetensors", "vae.safetensors"),
                         ("prompt_embeddings.safetensors", "emb.safetensors"),
                         ("HPS_v2.1_tiny.safetensors", "hps.pt"), ("MPS_tiny.safetensors", "mps.pth")):
        (models / source).rename(folder / name)
    return folder


def good(folder: Path) -> dict:
    from training.demo import PROMPTS

    return dict(high_noise_model=str(folder / "high.safetensors"), low_noise_model=str(folder / "low.safetensors"),
                vae=str(folder / "vae.safetensors"), prompt_embeddings=str(folder / "emb.safetensors"),
                prompts=PROMPTS[:1], rewards=[{"model": "hps", "path": str(folder / "hps.pt")}],
                output_dir=str(folder / "out"))


def test_good_config_and_recommended_defaults(files):
    cfg = config_from_dict(good(files))
    # the reference's LoRA and optimiser values are the defaults (max_grad_norm 0.3, really applied, is ours)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_exclude) == (128, 64.0, ["ffn"])
    assert (cfg.learning_rate, cfg.weight_decay, cfg.adam_epsilon, cfg.max_grad_norm) == (1e-5, 3e-2, 1e-10, 0.3)
    assert (cfg.inference_steps, cfg.shift, cfg.boundary, cfg.guidance_scale) == (40, 5.0, 0.9, 6.0)
    assert (cfg.height, cfg.width, cfg.frames, cfg.decoded_latents) == (256, 256, 81, 1)
    assert (cfg.backprop_strategy, cfg.backprop_steps) == ("tail", 1)


BAD = [
    ("expert", {"expert": "middle"}),
    ("high_noise_model", {"high_noise_model": "/nope/high.safetensors"}),
    ("vae", {"vae": None}),
    ("output_dir", {"output_dir": ""}),
    ("rewards", {"rewards": []}),
    ("rewards[0].model", {"rewards": [{"model": "imagereward", "path": "x"}]}),
    ("rewards[0].weight", {"rewards": [{"model": "hps", "path": "hps.pt", "weight": "heavy"}]}),
    ("rewards[0].preprocess", {"rewards": [{"model": "hps", "path": "hps.pt", "preprocess": "crop"}]}),
    ("lora_rank", {"lora_rank": 0}),
    ("lora_rank", {"lora_rank": 4.5}),
    ("learning_rate", {"learning_rate": 5}),
    ("height", {"height": 250}),
    ("frames", {"frames": 80}),
    ("guidance_scale", {"guidance_scale": 0.5}),
    ("boundary", {"boundary": 1.5}),
    ("backprop_strategy", {"backprop_strategy": "everything"}),
    ("backprop_steps", {"backprop_steps": 30}),  # low-noise expert has 26 of 40 steps
    ("decoded_latents", {"decoded_latents": 22}),
    ("mixed_precision", {"mixed_precision": "fp8"}),
    ("lr_scheduler", {"lr_scheduler": "exotic"}),
    ("prompt_embeddings", {"prompt_embeddings": None}),
    ("text_encoder", {"prompt_embeddings": None, "text_encoder": "high.safetensors"}),
    ("prompts", {"prompts": ["  "]}),
    ("validation_prompts", {"validation_every": 10}),
    ("average_last_checkpoints", {"average_last_checkpoints": 5, "checkpoints_keep": 2}),
    ("rewards[0].variant", {"rewards": [{"model": "hps", "path": "hps.pt", "variant": "videox_fun"}]}),
    ("gradient_accumulation_steps", {"gradient_accumulation_steps": 0}),
    ("validation_prompts", {"held_out_rewards": [{"model": "mps", "path": "mps.pth"}]}),
    ("recipe", {"recipe": "videox_fun_mid"}),
    ("expert", {"expert": "both", "init_lora": "low.safetensors"}),
    ("gradient_checkpointing", {"gradient_checkpointing": "yes"}),
    ("max_stepz", {"max_stepz": 10}),
    ("output_name", {"output_name": "../escape"}),
]


@pytest.mark.parametrize("field_name,change", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_config_names_the_field(files, field_name, change):
    data = good(files)
    data.update(change)
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, base_dir=files)
    assert info.value.field == field_name
    assert f"'{field_name}'" in str(info.value)


def test_every_wrong_field_is_reported_together(files):
    data = dict(good(files), lora_rank=0, learning_rate=5, gaming_guard="loud")
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert [f for f, _ in info.value.errors] == ["lora_rank", "learning_rate", "gaming_guard"]
    assert all(f"'{f}'" in str(info.value) for f in ("lora_rank", "learning_rate", "gaming_guard"))


def test_deprecated_names_are_read_with_a_warning(files):
    data = dict(good(files), ema_last_checkpoints=2, checkpoints_keep=2)
    data["rewards"] = [{"model": "mps", "path": str(files / "mps.pth"), "variant": "seed"}]
    with pytest.warns(DeprecationWarning) as caught:
        cfg = config_from_dict(data)
    assert cfg.average_last_checkpoints == 2 and cfg.rewards[0].variant == "videox_fun"
    messages = [str(c.message) for c in caught]
    assert any("'ema_last_checkpoints'" in m for m in messages) and any("'seed'" in m for m in messages)


def test_the_config_reference_in_docs_is_generated_from_the_declarations():
    from training.trainer.config import markdown_reference

    path = PACK / "docs" / "training-config.md"
    assert path.read_text(encoding="utf-8") == markdown_reference(), (
        "docs/training-config.md is stale: run python -m training.trainer.config --markdown > docs/training-config.md")


def test_yaml_relative_paths_and_cli_exit_code(files, tmp_path):
    data = good(files)
    data["vae"] = "vae.safetensors"  # relative to the YAML's folder
    (files / "run.yaml").write_text(yaml.safe_dump(data))
    assert load_config(files / "run.yaml").vae == str(files / "vae.safetensors")

    data["vae"] = str(files / "vae.safetensors")
    data["frames"] = 82
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, str(PACK / "training" / "train_reward_lora.py"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == EXIT_CONFIG
    event = json.loads(proc.stdout.strip().splitlines()[-1])
    assert event["event"] == "error" and event["kind"] == "config" and event["field"] == "frames"


def test_yaml_is_safe_loaded(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "--config"


@pytest.mark.parametrize("preset", ["videox_fun_low_hps.yaml", "videox_fun_high_mps.yaml"])
def test_shipped_reference_presets_name_the_recipe(preset):
    cfg = load_config(PACK / "training" / "configs" / preset, check_files=False)
    assert cfg.recipe == preset[: -len(".yaml")]
    assert cfg.expert == ("low" if "low" in preset else "high")
    assert cfg.rewards[0].preprocess == "squash" and cfg.effective_batch == 8


def test_config_reward_names_are_the_registry_kinds():
    # config_fields keeps its own tuple so the config stays free of the reward models' imports; a new
    # reward kind must be accepted by the config as soon as the registry can load it.
    from training.rewards.registry import REWARD_KINDS
    from training.trainer.config_fields import REWARD_MODELS

    assert sorted(REWARD_MODELS) == sorted(REWARD_KINDS)
