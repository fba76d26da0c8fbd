"""Continuing a LoRA: the trained LoRA starts from ``init_lora`` (any key format the loader reads),
at its rank and alpha; a file that cannot start the run is refused, naming what differs."""

from __future__ import annotations


import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers.trainer_runs import train_config_events
from tests.helpers.tiny_wan import random_lora
from training.demo import write_tiny_run
from training.lora_format import read_lora
from training.safe_io import save_safetensors
from training.tiny_models import linear_module_names
from training.trainer.config import ConfigError, config_from_dict
from training.trainer.models import strip_prefix

RANK, ALPHA = 4, 2.0


def write_videox_fun_lora(path, modules: dict) -> None:
    """A LoRA in the reference's own key layout (lora_unet__blocks_0_self_attn_q.lora_down.weight)."""
    tensors = {}
    for native, (up, down, alpha) in modules.items():
        stem = "lora_unet__" + native.replace(".", "_")
        tensors[f"{stem}.lora_up.weight"] = up
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_safetensors(tensors, path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("init")
    config = yaml.safe_load(write_tiny_run(folder).read_text())
    expert = strip_prefix(load_file(config["low_noise_model"]))
    modules = random_lora(expert, linear_module_names(include_ffn=False), rank=RANK, alpha=ALPHA, seed=3)
    init = folder / "Wan2.2-continue-low-noise.safetensors"
    write_videox_fun_lora(init, modules)
    config.update(init_lora=str(init), lora_rank=RANK, lora_alpha=ALPHA, validation_every=0, held_out_rewards=[],
                  resume=False)
    return folder, config, modules


def _train(config: dict, folder, name: str, **change) -> list[dict]:
    data = dict(config, output_dir=str(folder / name), **change)
    return train_config_events(config_from_dict(data))


def _modules(path) -> dict:
    return read_lora(path).as_modules()


def test_zero_steps_publish_the_initial_lora(run):
    folder, config, modules = run
    events = _train(config, folder, "zero", max_steps=0)
    assert events[0]["init_lora"] == config["init_lora"] and events[0]["lora_rank"] == RANK
    written = _modules(events[-1]["lora_path"])
    assert written.keys() == modules.keys()
    for native, (up, down, alpha) in modules.items():
        w_up, w_down, w_alpha = written[native]
        assert w_alpha == ALPHA
        assert torch.allclose(w_up.float(), up, atol=1e-6) and torch.allclose(w_down.float(), down, atol=1e-6)


def test_a_short_run_moves_away_from_it(run):
    folder, config, modules = run
    events = _train(config, folder, "short", max_steps=2)
    written = _modules(events[-1]["lora_path"])
    moved = max(float((written[n][0].float() - up).abs().max()) for n, (up, _, _) in modules.items())
    assert moved > 1e-5


def test_a_differing_rank_is_refused_naming_both(run):
    _, config, _ = run
    with pytest.raises(ConfigError) as info:
        config_from_dict(dict(config, lora_rank=8))
    assert info.value.field == "lora_rank" and "is 8" in str(info.value) and f"rank {RANK}" in str(info.value)


def test_other_target_modules_are_refused_naming_them(run, tmp_path):
    _, config, modules = run
    partial = tmp_path / "attention_q_only.safetensors"
    write_videox_fun_lora(partial, {n: m for n, m in modules.items() if n.endswith("self_attn.q")})
    with pytest.raises(ConfigError) as info:
        config_from_dict(dict(config, init_lora=str(partial)))
    assert info.value.field == "init_lora" and "lacks 20 of the run's target modules" in str(info.value)
    assert "blocks.0.cross_attn.k" in str(info.value)
    with pytest.raises(ConfigError) as info:  # the file has modules the run would not train
        config_from_dict(dict(config, lora_exclude=["ffn", "text_embedding"]))
    assert info.value.field == "init_lora" and "text_embedding.0" in str(info.value)


def test_a_lora_of_another_model_is_refused(run, tmp_path):
    _, config, modules = run
    wide = tmp_path / "wan_1.3b_like.safetensors"
    write_videox_fun_lora(wide, {n: (torch.zeros(up.shape[0] * 2, RANK), torch.zeros(RANK, down.shape[1] * 2), ALPHA)
                                 for n, (up, down, _) in modules.items()})
    with pytest.raises(ConfigError) as info:
        config_from_dict(dict(config, init_lora=str(wide)))
    assert info.value.field == "init_lora" and "shape mismatch" in str(info.value)
