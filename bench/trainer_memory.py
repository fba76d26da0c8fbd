"""Trainer memory and speed: does memory stay flat as inference steps grow, and does training
the high-noise expert need no more than the low-noise one?

    python bench/trainer_memory.py [--dim 256 --layers 4 --size 320 --frames 17]

Each configuration runs the real trainer (training/train_reward_lora.py) for 2 steps in a
fresh process on tiny-ish random Wan experts (real architecture) with a fixed backprop
window (tail, 1 step). Memory = peak during the steps minus the memory held after loading
(GPU: allocated bytes; CPU: resident set). Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

PACK = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK))


def write_models(folder: Path, dim: int, layers: int) -> dict:
    import torch

    from training.demo import write_tiny_run
    from training.safe_io import save_safetensors
    from training.tiny_models import tiny_wan_state_dict

    config = yaml.safe_load(write_tiny_run(folder).read_text())
    for name, seed in (("high_noise_model", 1), ("low_noise_model", 2)):
        sd = tiny_wan_state_dict(seed=seed, dtype=torch.bfloat16, dim=dim, ffn_dim=2 * dim, num_layers=layers,
                                 text_dim=64)
        path = folder / "models" / f"bench_{name}.safetensors"
        save_safetensors(sd, path)
        config[name] = str(path)
    return config


def run_one(base: dict, folder: Path, name: str, **overrides) -> dict:
    from training.trainer.progress import parse_events

    config = dict(base, output_dir=str(folder / name), max_steps=2, checkpoint_every=0, validation_every=0,
                  resume=False, gradient_checkpointing=True, backprop_strategy="tail", backprop_steps=1)
    config.update(overrides)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, str(PACK / "training" / "train_reward_lora.py"), "--config", str(path)],
                          capture_output=True, text=True, env=env, cwd=PACK)
    events = parse_events(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    started = events[0]
    steps = [e for e in events if e["event"] == "step"]
    return {"name": name, "peak_mb": steps[-1]["peak_memory_mb"] - started["memory_at_start_mb"],
            "seconds": steps[-1]["seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--frames", type=int, default=17)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = write_models(folder, args.dim, args.layers)
        base.update(height=args.size, width=args.size, frames=args.frames, mixed_precision="no")
        rows = []
        for steps in (10, 20, 50):
            rows.append(run_one(base, folder, f"low_{steps}_steps", expert="low", inference_steps=steps))
        rows.append(run_one(base, folder, "high_20_steps", expert="high", inference_steps=20))
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    print(f"device {device}; expert dim {args.dim}, {args.layers} blocks; {args.size}x{args.size}, {args.frames} frames; "
          "CFG on, window = last step of the trained expert, gradient checkpointing")
    print(f"{'run':<16} {'peak MiB above loaded':>22} {'s/step':>8}")
    for row in rows:
        print(f"{row['name']:<16} {row['peak_mb']:>22.1f} {row['seconds']:>8.2f}")
    by = {r["name"]: r for r in rows}
    flat = by["low_50_steps"]["peak_mb"] / by["low_10_steps"]["peak_mb"]
    high = by["high_20_steps"]["peak_mb"] / by["low_20_steps"]["peak_mb"]
    print(f"memory 50 steps / 10 steps: {flat:.3f} (flat: ~1.0)")
    print(f"memory high-noise / low-noise expert (20 steps): {high:.3f} (must be <= 1.1)")
    print(f"time 50 steps / 10 steps: {by['low_50_steps']['seconds'] / by['low_10_steps']['seconds']:.2f}")
    return 0 if flat <= 1.1 and high <= 1.1 else 1


if __name__ == "__main__":
    sys.exit(main())
