"""What the Train node asks for becomes the run: the recipe's values with the inputs on top, listed in
run.yaml; the reward kinds read from the files; the effective batch formed from the processes or a
warning when it differs from the recipe's; a batch the processes cannot form is refused."""

from __future__ import annotations

import yaml
import pytest

from training.demo import PROMPTS, write_tiny_run
from training.trainer.config import ConfigError, config_from_dict
from training.trainer.phases import phase_configs
from training.trainer.run_request import RewardChoice, TrainRequest, plan_run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("request")
    return folder, yaml.safe_load(write_tiny_run(folder).read_text())


def request(folder, config, **change) -> TrainRequest:
    values = dict(recipe="videox_fun_high_mps", expert="recipe", high_noise_model=config["high_noise_model"],
                  low_noise_model=config["low_noise_model"], vae=config["vae"],
                  rewards=(RewardChoice(config["held_out_rewards"][0]["path"]),), output_dir=str(folder / "run"),
                  output_name="tiny", processes=2, cpu=True, prompts=tuple(PROMPTS),
                  prompt_embeddings=config["prompt_embeddings"], lora_rank=128, lora_alpha=64.0, max_steps=10000,
                  learning_rate=1e-5, batch_size=1, gradient_accumulation_steps=0, frames=81, width=256, height=256)
    values.update(change)
    return TrainRequest(**values)


def test_the_reference_recipe_as_the_node_asks_for_it(tiny):
    folder, config = tiny
    plan = plan_run(request(folder, config))
    cfg = plan.config
    assert (cfg.expert, cfg.max_grad_norm, cfg.effective_batch) == ("high", 1.0, 8)
    # the kind from the file's keys (the MPS file), the recipe's variant and preprocessing for it
    assert (cfg.rewards[0].model, cfg.rewards[0].variant, cfg.rewards[0].preprocess) == ("mps", "videox_fun", "squash")
    assert plan.accumulation == 4 and plan.effective_batch == 8 and not plan.warnings
    assert plan.overrides == {}  # mixed precision / checkpointing for the CPU are listed apart
    data = yaml.safe_load(plan.run_yaml)
    assert data["recipe"] == "videox_fun_high_mps" and "max_steps" not in data  # the recipe's, not repeated
    assert "# For the device: mixed_precision: 'no'" in plan.run_yaml
    # what the trainer reads back is the same run
    assert config_from_dict(data).config_hash() == cfg.config_hash()


def test_inputs_on_top_of_the_recipe_are_listed_and_a_batch_warning_given(tiny):
    folder, config = tiny
    plan = plan_run(request(folder, config, max_steps=30, lora_rank=4, lora_alpha=4.0, gradient_accumulation_steps=1))
    assert plan.overrides["max_steps"] == (10000, 30) and plan.overrides["lora_rank"] == (128, 4)
    assert plan.overrides["gradient_accumulation_steps"] == (0, 1)
    assert plan.effective_batch == 2 and "the effective batch is 2" in plan.warnings[0]
    assert "max_steps: 10000 -> 30" in plan.run_yaml and "max_steps 10000 -> 30" in plan.summary()
    data = yaml.safe_load(plan.run_yaml)
    assert data["max_steps"] == 30 and config_from_dict(data).config_hash() == plan.config.config_hash()


def test_a_batch_the_processes_cannot_form_is_refused(tiny):
    folder, config = tiny
    with pytest.raises(ConfigError) as info:
        plan_run(request(folder, config, processes=3))
    assert info.value.field == "gradient_accumulation_steps" and "3 process(es)" in str(info.value)


def test_a_reward_of_another_kind_than_the_reference_recipe_warns(tiny):
    folder, config = tiny
    plan = plan_run(request(folder, config, rewards=(RewardChoice(config["rewards"][0]["path"]),)))
    assert any("not the reference run" in w for w in plan.warnings)


def test_a_reward_file_that_is_not_a_reward_model_names_the_input(tiny, tmp_path):
    folder, config = tiny
    page = tmp_path / "MPS_overall.pth"
    page.write_text("<html>not found</html>")
    with pytest.raises(ConfigError) as info:
        plan_run(request(folder, config, rewards=(RewardChoice(str(page), input_name="reward_model_2"),)))
    assert info.value.field == "reward_model_2" and str(page) in str(info.value)


def test_both_experts_are_two_phases_each_read_back_as_its_own_run(tiny):
    folder, config = tiny
    plan = plan_run(request(folder, config, recipe="recommended", expert="both", max_steps=3))
    high, low = phase_configs(plan.config)
    assert (high.expert, low.expert) == ("high", "low")
    assert low.frozen_expert_lora == str(high.lora_path) and high.lora_path.name == "tiny_high_noise.safetensors"
    for phase in (high, low):
        data = yaml.safe_load(plan.yaml_for(phase))
        read = config_from_dict(data, check_files=False)
        assert (read.expert, read.output_dir, read.output_name) == (phase.expert, phase.output_dir, phase.output_name)
        assert read.config_hash() == phase.config_hash()
