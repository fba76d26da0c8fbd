"""Trainer memory and speed on the CPU: does memory stay flat as inference steps grow, does training
the high-noise expert need no more than the low-noise one, how much host memory each memory mode
takes, and do two processes share the experts' pages?

    python bench/trainer_memory.py [--dim 256 --layers 4 --size 320 --frames 17 --steps 3]
    python bench/trainer_memory.py --host [--dim 2048 --layers 10]   # per mode; PSS of 2 processes vs 1

``--host``: float32 expert files and a float32 run (the dtype of the file is the run's, so the
weights are memory-mapped, not copied), tiny sampling (16x16, 1 frame, 2 inference steps) so
that the weights dominate. Each run goes through ``accelerate launch`` with the ZeRO-3 + CPU
offload preset (low: one plain process); the trainer ranks' proportional set size (psutil
``memory_full_info().pss``: shared pages counted once across the processes) is summed and
sampled every 0.2 s, and reported at the first step and as the peak through the steps.

Each configuration runs the real training loop (training.trainer.recipe.train) in a fresh
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
    from training.trainer.recipe import train
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


def _rank_processes(launcher) -> list:
    """The trainer ranks under an accelerate launcher (processes running train_reward_lora.py that have
    no such child)."""
    import psutil

    try:
        tree = [launcher] + launcher.children(recursive=True)
    except psutil.Error:
        return []
    ranks = []
    for proc in tree:
        try:
            if any("train_reward_lora.py" in part for part in proc.cmdline()) and not any(
                    "train_reward_lora.py" in " ".join(c.cmdline()) for c in proc.children()):
                ranks.append(proc)
        except psutil.Error:
            continue
    return ranks


def host_run(config: Path, processes: int, preset: str | None) -> dict:
    """Launch one run; the ranks' summed PSS (MiB) at the first step and at its peak through the steps."""
    import psutil

    from training.trainer.progress import parse_events

    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if preset:
        cmd += ["--config_file", f"training/configs/{preset}", "--num_processes", str(processes)]
    else:
        cmd += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(PACK / "training" / "train_reward_lora.py"), "--config", str(config)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=PACK)
    launcher = psutil.Process(proc.pid)
    state = {"peak": 0.0, "first_step": None, "stepping": False, "done": False, "started": None}

    def sample():
        while not state["done"]:
            total = 0
            for rank in _rank_processes(launcher):
                try:
                    total += rank.memory_full_info().pss
                except psutil.Error:
                    pass
            if state["stepping"]:
                state["peak"] = max(state["peak"], total / 2 ** 20)
            state["last"] = total / 2 ** 20
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    events = []
    for line in proc.stdout:
        for event in parse_events(line):
            events.append(event)
            if event["event"] == "started":
                state["started"] = state.get("last")
                state["stepping"] = True
            if event["event"] == "step" and state["first_step"] is None:
                time.sleep(0.3)
                state["first_step"] = state.get("last")
    proc.wait()
    state["done"] = True
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{config.name} failed (exit {proc.returncode})")
    started = next(e for e in events if e["event"] == "started")
    return {"mode": started["memory_mode"], "processes": started["world_size"], "pss_started_mib": state["started"],
            "pss_first_step_mib": state["first_step"], "pss_peak_mib": state["peak"]}


def host_memory(args) -> int:
    """Per memory mode: the ranks' summed PSS; and 2 processes against 1 (the shared experts)."""
    import torch

    from training.demo import write_tiny_run
    from training.safe_io import save_safetensors
    from training.tiny_models import tiny_wan_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = yaml.safe_load(write_tiny_run(folder).read_text())
        for name, seed in (("high_noise_model", 1), ("low_noise_model", 2)):
            sd = tiny_wan_state_dict(seed=seed, dtype=torch.float32, dim=args.dim, ffn_dim=2 * args.dim,
                                     num_layers=args.layers, text_dim=64)
            path = folder / "models" / f"host_{name}.safetensors"
            save_safetensors(sd, path)
            base[name] = str(path)
            del sd
        expert_gib = os.path.getsize(base["high_noise_model"]) / 2 ** 30
        base.update(height=16, width=16, frames=1, inference_steps=2, mixed_precision="no", max_steps=2,
                    checkpoint_every=0, validation_every=0, held_out_rewards=[], resume=False,
                    gradient_checkpointing=False, backprop_steps=1, preflight=False)
        rows = []
        for name, mode, processes, preset in (("fast, 1 process", "fast", 1, "accelerate_zero3_offload.yaml"),
                                              ("fast, 2 processes", "fast", 2, "accelerate_cpu_zero3_offload_2proc.yaml"),
                                              ("sharded, 2 processes", "sharded", 2,
                                               "accelerate_cpu_zero3_offload_2proc.yaml"),
                                              ("low, 1 process", "low", 1, None)):
            config = folder / f"host_{mode}_{processes}.yaml"
            config.write_text(yaml.safe_dump(dict(base, memory=mode, output_dir=str(folder / f"out_{mode}_{processes}"))))
            rows.append({"name": name, **host_run(config, processes, preset)})
    print(f"CPU, float32 experts of {expert_gib:.2f} GiB each (dim {args.dim}, {args.layers} blocks), 16x16, 1 frame, "
          "2 inference steps; PSS summed over the trainer ranks (shared pages counted once)")
    print(f"{'run':<22} {'at started MiB':>15} {'at first step MiB':>18} {'peak MiB':>10}")
    for row in rows:
        print(f"{row['name']:<22} {row['pss_started_mib']:>15.0f} {row['pss_first_step_mib']:>18.0f} "
              f"{row['pss_peak_mib']:>10.0f}")
    one, two = rows[0], rows[1]
    ratio = two["pss_first_step_mib"] / one["pss_first_step_mib"]
    print(f"2 processes / 1 process, summed PSS at the first step: {ratio:.2f} (goal <= 1.25); "
          f"at the peak: {two['pss_peak_mib'] / one['pss_peak_mib']:.2f}")
    return 0 if ratio <= 1.25 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", action="store_true", help="per-mode host memory and the 2-vs-1 process PSS")
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
    if args.host:
        return host_memory(args)
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
