"""The main job on any machine: train a tiny reward LoRA on CPU, from the pack root:

    python -m training.demo [--steps 30] [--out demo_output]

Builds tiny random-weight models with the real architectures and file formats (two Wan2.2
InP experts, a Wan2.1 VAE, tiny HPS v2.1 / MPS reward models, prompt embeddings), trains
the low-noise expert's LoRA through the real trainer, prints the reward rising, and checks
that the written LoRA loads onto the expert with zero unmatched keys.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

PROMPTS = ["a red fox running through snow", "a sailboat on a calm lake at sunset",
           "a city street at night with neon signs", "a cat sleeping on a windowsill"]
TEXT_DIM = 64
VALIDATION_PROMPTS = ["a lighthouse on a rocky coast", "a bowl of fruit on a wooden table"]


def write_tiny_run(folder: str | Path, **overrides) -> Path:
    """Tiny model files and a run config in ``folder``; returns the config path."""
    import torch

    from .rewards.tiny import write_tiny_hps_checkpoint, write_tiny_mps_checkpoint
    from .safe_io import save_safetensors
    from .tiny_models import random_prompt_embeddings, tiny_vae_state_dict, tiny_wan_state_dict
    from .trainer.models import write_prompt_embeddings

    folder = Path(folder).resolve()  # the config resolves relative paths against its own folder
    models = folder / "models"
    models.mkdir(parents=True, exist_ok=True)
    files = {"high": models / "wan2.2_tiny_high_noise.safetensors", "low": models / "wan2.2_tiny_low_noise.safetensors",
             "vae": models / "wan_2.1_vae_tiny.safetensors", "emb": models / "prompt_embeddings.safetensors",
             "hps": models / "HPS_v2.1_tiny.safetensors", "mps": models / "MPS_tiny.safetensors"}
    if not files["high"].exists():
        # real layout and head size; text width 64 instead of umT5's 4096 keeps CPU steps fast
        save_safetensors(tiny_wan_state_dict(seed=1, dtype=torch.bfloat16, text_dim=TEXT_DIM), files["high"])
        save_safetensors(tiny_wan_state_dict(seed=2, dtype=torch.bfloat16, text_dim=TEXT_DIM), files["low"])
        save_safetensors(tiny_vae_state_dict(seed=3), files["vae"])
        write_prompt_embeddings(files["emb"], random_prompt_embeddings([""] + PROMPTS + VALIDATION_PROMPTS, dim=TEXT_DIM))
        write_tiny_hps_checkpoint(files["hps"], seed=0)
        write_tiny_mps_checkpoint(files["mps"], seed=0)
    config = dict(
        high_noise_model=str(files["high"]), low_noise_model=str(files["low"]), vae=str(files["vae"]),
        prompt_embeddings=str(files["emb"]), expert="low", base_model_name="tiny random Wan2.2 InP",
        prompts=PROMPTS, validation_prompts=VALIDATION_PROMPTS,
        rewards=[{"model": "hps", "path": str(files["hps"]), "weight": 1.0}],
        held_out_rewards=[{"model": "mps", "path": str(files["mps"])}],
        lora_rank=4, lora_alpha=4.0, learning_rate=1e-2, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=30, batch_size=1, seed=0, gradient_checkpointing=False, mixed_precision="no",
        height=32, width=32, frames=5, inference_steps=8, guidance_scale=3.0, shift=5.0, boundary=0.9,
        backprop_strategy="tail", backprop_steps=2, decoded_latents=1,
        output_dir=str(folder / "output"), output_name="tiny_reward_lora",
        checkpoint_every=10, checkpoints_keep=3, validation_every=10, preflight=False,
    )
    config.update(overrides)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    import io

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="demo_output")
    args = parser.parse_args(argv)
    # tiny models: one thread is fastest, and several threads on a busy machine stall (x50)
    torch.set_num_threads(1)
    from .lora_format import read_lora
    from .lora_match import match_lora
    from .trainer.config import load_config
    from .trainer.recipe import train
    from .trainer.progress import Progress, parse_events

    t0 = time.time()
    print(f"building tiny models in {args.out}/models ...", flush=True)
    config_path = write_tiny_run(args.out, max_steps=args.steps, resume=False)
    cfg = load_config(config_path)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # the demo's own output folder: start fresh
    capture = io.StringIO()
    print(f"training {cfg.max_steps} steps of the low-noise expert's LoRA (HPS reward, MPS held out) ...", flush=True)

    class Tee(io.StringIO):
        def write(self, text):
            capture.write(text)
            for line in text.splitlines():
                if '"event": "step"' in line:
                    e = json.loads(line)
                    print(f"  step {e['step']:3d}/{e['max_steps']}  reward {e['reward']:.4f}  loss {e['loss']:.4f}  "
                          f"{e['seconds']:.2f}s", flush=True)
                elif '"event": "validation"' in line:
                    e = json.loads(line)
                    print(f"  validation at {e['step']}: {e['rewards']} held-out {e['held_out']}", flush=True)
            return len(text)

    code = train(cfg, Progress(cfg.output_dir, stream=Tee()))
    events = parse_events(capture.getvalue())
    rewards = [e["reward"] for e in events if e["event"] == "step"]
    k = max(1, len(rewards) // 3)
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    validations = [e for e in events if e["event"] == "validation"]
    before, after = validations[0]["rewards"]["hps"], validations[-1]["rewards"]["hps"]
    lora = read_lora(cfg.lora_path)
    from .safe_io import read_state_dict
    from .trainer.models import strip_prefix

    report = match_lora(lora, strip_prefix(read_state_dict(cfg.low_noise_model, "Wan expert")), expert="low")
    print(report.render())
    print(f"training reward (random prompts and noise): mean of the first {k} steps {first:.4f}, "
          f"of the last {k} steps {last:.4f}")
    print(f"reward on the held-out prompts, fixed noise: {before:.4f} before -> {after:.4f} after "
          f"training ({after - before:+.4f})")
    print(f"LoRA: {cfg.lora_path} ({len(report.matched)} modules, {len(report.unmatched)} unmatched keys)")
    print(f"done in {time.time() - t0:.0f} s")
    ok = code == 0 and after > before and not report.unmatched
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
