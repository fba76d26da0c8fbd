"""Training through a running ComfyUI (the ComfyUI tier): tiny models in the server's folders, the
Train node's prompt, emptying the queue after a test."""

from __future__ import annotations

import time

import requests

from training.rewards.tiny import write_tiny_hps_checkpoint, write_tiny_mps_checkpoint
from training.safe_io import save_safetensors
from training.tiny_models import random_prompt_embeddings, tiny_vae_state_dict, tiny_wan_state_dict
from training.trainer.models import write_prompt_embeddings

PROMPTS = ["a red fox running through snow", "a sailboat on a calm lake at sunset"]
VALIDATION_PROMPTS = ["a lighthouse on a rocky coast", "a bowl of fruit on a wooden table"]


def write_tiny_models(comfyui):
    """Tiny experts, VAE, HPS and prompt embeddings in the server's folders (once per server)."""
    if (comfyui.input / "tiny_prompt_embeddings.safetensors").exists():
        return comfyui
    save_safetensors(tiny_wan_state_dict(seed=1), comfyui.model_path("diffusion_models", "tiny_train_high.safetensors"))
    save_safetensors(tiny_wan_state_dict(seed=2), comfyui.model_path("diffusion_models", "tiny_train_low.safetensors"))
    save_safetensors(tiny_vae_state_dict(seed=3), comfyui.model_path("vae", "tiny_train_vae.safetensors"))
    write_tiny_hps_checkpoint(comfyui.model_path("reward_models", "HPS_v2.1_train_tiny.safetensors"), seed=0)
    write_tiny_mps_checkpoint(comfyui.model_path("reward_models", "MPS_train_tiny.safetensors"), seed=0)
    write_prompt_embeddings(comfyui.input / "tiny_prompt_embeddings.safetensors",
                            random_prompt_embeddings([""] + PROMPTS + VALIDATION_PROMPTS))
    return comfyui


def stop_all_prompts(comfyui, timeout: float = 120) -> None:
    """Clear the queue, interrupt the running prompt and wait until nothing runs: a failed test must
    not leave a training running into the next one."""
    requests.post(f"{comfyui.url}/queue", json={"clear": True}, timeout=10)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = comfyui.get("/queue").json()
        if not queue.get("queue_running") and not queue.get("queue_pending"):
            return
        requests.post(f"{comfyui.url}/interrupt", json={}, timeout=10)
        time.sleep(0.5)
    raise AssertionError(f"the ComfyUI queue did not empty in {timeout} s after /interrupt\n{comfyui.log_tail(40)}")


def train_prompt(output_name: str, steps: int, checkpoint_every: int = 0, resume: bool = True, **extra) -> dict:
    inputs = dict(
        high_noise_model="tiny_train_high.safetensors", low_noise_model="tiny_train_low.safetensors",
        vae="tiny_train_vae.safetensors", reward_model="HPS_v2.1_train_tiny.safetensors", reward_weight=1.0,
        prompts="\n".join(PROMPTS), expert="low", rank=4, alpha=4.0, steps=steps, learning_rate=2e-3,
        width=32, height=32, frames=5, backprop_steps=1, gpus="cpu:2", deepspeed="none",
        output_name=output_name, resume=resume, prompt_embeddings="tiny_prompt_embeddings.safetensors",
        inference_steps=8, guidance_scale=3.0, shift=5.0, boundary=0.9, seed=0, checkpoint_every=checkpoint_every,
        gradient_accumulation=1,
    )
    inputs.update(extra)
    return {"1": {"class_type": "WanRewardLoraTrain", "inputs": inputs}}
