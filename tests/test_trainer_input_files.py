"""Every model file of a run is checked from its contents before anything starts: the refusal
names the config field, the file, what was found and what to do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from training.demo import write_tiny_run
from training.safe_io import save_safetensors
from training.tiny_models import tiny_wan_state_dict
from training.trainer.config import ConfigError, config_from_dict


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("inputs")
    path = write_tiny_run(folder)
    return folder / "models", yaml.safe_load(path.read_text())


def refused(config: dict, **change) -> ConfigError:
    data = dict(config)
    data.update(change)
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return info.value


def test_the_tiny_run_passes(run):
    _, config = run
    assert config_from_dict(config).expert == "low"


def test_an_html_page_under_a_reward_models_name_is_refused(run, tmp_path):
    models, config = run
    page = tmp_path / "HPS_v2.1_compressed.pt"
    page.write_text("<!DOCTYPE html><html><body>Not found</body></html>")
    error = refused(config, rewards=[{"model": "hps", "path": str(page)}])
    assert error.field == "rewards[0].path"
    assert str(page) in str(error) and "neither a safetensors file nor a PyTorch checkpoint" in str(error)


def test_a_reward_of_the_other_kind_is_refused_by_its_keys(run):
    models, config = run
    error = refused(config, rewards=[{"model": "hps", "path": str(models / "MPS_tiny.safetensors")}])
    assert error.field == "rewards[0].model" and "mps checkpoint" in str(error)


def test_a_pickled_reward_is_judged_by_its_keys(run, tmp_path):
    from safetensors.torch import load_file

    models, config = run
    pt = tmp_path / "hps_as_zip.pt"
    torch.save({"state_dict": load_file(models / "HPS_v2.1_tiny.safetensors")}, pt)
    assert config_from_dict(dict(config, rewards=[{"model": "hps", "path": str(pt)}])).rewards[0].path == str(pt)


def test_a_lora_as_expert_is_refused_and_named(run, tmp_path):
    models, config = run
    lora = tmp_path / "reward_lora.safetensors"
    save_safetensors({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(8, 2),
                      "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 8)}, lora)
    error = refused(config, high_noise_model=str(lora))
    assert error.field == "high_noise_model" and str(lora) in str(error) and "a LoRA" in str(error)


def test_a_truncated_expert_is_refused_before_loading(run, tmp_path):
    models, config = run
    cut = tmp_path / "cut.safetensors"
    data = (models / "wan2.2_tiny_low_noise.safetensors").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    error = refused(config, low_noise_model=str(cut))
    assert error.field == "low_noise_model" and "truncated" in str(error) and str(cut) in str(error)


def test_experts_of_two_families_are_refused(run, tmp_path):
    models, config = run
    t2v = tmp_path / "t2v_high.safetensors"
    save_safetensors(tiny_wan_state_dict(seed=4, in_dim=16, text_dim=64), t2v)
    error = refused(config, high_noise_model=str(t2v))
    assert error.field == "low_noise_model" and "T2V" in str(error) and "Fun-InP" in str(error)


def test_text_width_mismatch_names_the_expert(run, tmp_path):
    models, config = run
    wide = tmp_path / "wide_low.safetensors"
    save_safetensors(tiny_wan_state_dict(seed=5, text_dim=4096), wide)
    wide_high = tmp_path / "wide_high.safetensors"
    shutil.copy(wide, wide_high)
    error = refused(config, low_noise_model=str(wide), high_noise_model=str(wide_high))
    assert error.field == "high_noise_model" and "4096" in str(error) and "64" in str(error)


def test_a_wan22_vae_is_refused(run, tmp_path):
    _, config = run
    vae = tmp_path / "wan2.2_vae.safetensors"
    save_safetensors({"conv2.weight": torch.zeros(48, 48, 1, 1, 1), "decoder.conv1.weight": torch.zeros(4)}, vae)
    error = refused(config, vae=str(vae))
    assert error.field == "vae" and "48 latent channels" in str(error)


def test_embeddings_without_prompts_metadata_are_refused(run, tmp_path):
    _, config = run
    emb = tmp_path / "emb.safetensors"
    save_safetensors({"emb.0": torch.zeros(3, 64)}, emb)
    error = refused(config, prompt_embeddings=str(emb))
    assert error.field == "prompt_embeddings" and "'prompts' metadata" in str(error)


def test_text_encoder_without_tokenizer_names_the_tokenizer(run, tmp_path):
    _, config = run
    enc = tmp_path / "umt5_no_spiece.safetensors"
    save_safetensors({"shared.weight": torch.zeros(10, 64),
                      "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(64, 64)}, enc)
    data = dict(config, text_encoder=str(enc))
    data.pop("prompt_embeddings")
    error = refused(data)
    assert error.field == "tokenizer" and "embedded tokenizer" in str(error)
