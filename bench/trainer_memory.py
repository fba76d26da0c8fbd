"""Trainer memory and speed: does memory stay flat as inference steps grow, and does training
the high-noise expert need no more than the low-noise one?

    python bench/trainer_memory.py [--dim 256 --layers 4 --size 320 --frames 17 --steps 3]

Each configuration runs the real training loop (training.trainer.loop.train) in a fresh
process on tiny-ish random Wan experts (real architecture) with a fixed backprop window
(tail, 1 step). Memory = the peak during the training steps minus the memory held once
everything is loaded (the "started" event):
- GPU: torch's allocator, max_memory_allocated per step minus memory_allocated at start;
- CPU: the process's resident set (psutil) sampled every 2 ms by a thread from the
  "started" event on, minus the resident set at that event (ru_maxrss would include the
  loading peak, and tracemalloc does not see torch's allocations); MALLOC_MMAP_THRESHOLD_
  = 64 KiB so that freed tensors leave the resident set (glibc's heap would keep them).
Prints a table with the figures and the ratios; exit 1 when a ratio exceeds 1.1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
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


class _Meter:
    """A Progress stream that measures memory from the "started" event on."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.baseline = None
        self.peak = 0
        self.steps = []
        self.running = False

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def write(self, text: str) -> int:
        import torch

        from training.trainer.progress import parse_events

        for event in parse_events(text):
            if event["event"] == "started":
                self.baseline = self.process.memory_info().rss
                self.peak = self.baseline
                self.gpu_baseline = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
                self.running = True
                threading.Thread(target=self._sample, daemon=True).start()
            elif event["event"] == "step":
                self.steps.append(event)
        return len(text)

    def flush(self):
        pass


def child(config_path: str) -> None:
    """One configuration, in this (fresh) process; prints one JSON line of results."""
    import torch

    from training.trainer.config import load_config
    from training.trainer.loop import train
    from training.trainer.progress import Progress

    cfg = load_config(config_path)
    meter = _Meter()
    code = train(cfg, Progress(cfg.output_dir, stream=meter))
    meter.running = False
    if torch.cuda.is_available():
        peak = max(e["peak_memory_mb"] for e in meter.steps) - meter.gpu_baseline / 2 ** 20
        kind = "GPU allocated"
    else:
        peak = (meter.peak - meter.baseline) / 2 ** 20
        kind = "CPU resident set"
    seconds = sorted(e["seconds"] for e in meter.steps[1:] or meter.steps)
    print(json.dumps({"code": code, "peak_mb": peak, "kind": kind, "baseline_mb": meter.baseline / 2 ** 20,
                      "seconds": seconds[len(seconds) // 2]}))


def run_one(base: dict, folder: Path, name: str, steps: int, **overrides) -> dict:
    config = dict(base, output_dir=str(folder / name), max_steps=steps, checkpoint_every=0, validation_every=0,
                  resume=False, gradient_checkpointing=True, backprop_strategy="tail", backprop_steps=1)
    config.update(overrides)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # CPU: tensors above 64 KiB get their own mappings, returned to the system when freed, so
    # the resident set follows live memory instead of glibc's heap high-water mark
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                          env=env, cwd=PACK, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"name": name, **result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=3, help="training steps per configuration")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = write_models(folder, args.dim, args.layers)
        base.update(height=args.size, width=args.size, frames=args.frames, mixed_precision="no")
        rows = []
        for steps in (10, 20, 50):
            rows.append(run_one(base, folder, f"low_{steps}_steps", args.steps, expert="low", inference_steps=steps))
        rows.append(run_one(base, folder, "high_20_steps", args.steps, expert="high", inference_steps=20))
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    print(f"device {device}; expert dim {args.dim}, {args.layers} blocks; {args.size}x{args.size}, {args.frames} frames; "
          f"CFG on, window = last step of the trained expert, gradient checkpointing; {args.steps} steps each, "
          f"memory = {rows[0]['kind']} peak during the steps minus after loading")
    print(f"{'run':<16} {'loaded MiB':>11} {'peak MiB above loaded':>22} {'s/step (median)':>16}")
    for row in rows:
        print(f"{row['name']:<16} {row['baseline_mb']:>11.1f} {row['peak_mb']:>22.1f} {row['seconds']:>16.2f}")
    by = {r["name"]: r for r in rows}
    flat = by["low_50_steps"]["peak_mb"] / by["low_10_steps"]["peak_mb"]
    high = by["high_20_steps"]["peak_mb"] / by["low_20_steps"]["peak_mb"]
    print(f"memory 50 steps / 10 steps: {flat:.3f} (flat: ~1.0)")
    print(f"memory high-noise / low-noise expert (20 steps): {high:.3f} (must be <= 1.1)")
    print(f"time 50 steps / 10 steps: {by['low_50_steps']['seconds'] / by['low_10_steps']['seconds']:.2f}")
    return 0 if flat <= 1.1 and high <= 1.1 else 1


if __name__ == "__main__":
    sys.exit(main())
