"""Real-size trainer figures on a GPU: peak GPU memory, peak host memory and seconds per step of
each memory mode, with random-weight experts at the A14B width.

    python bench/trainer_gpu.py [--layers 0] [--frames 81 --size 256] [--steps 3] [--modes fast,low]
    python bench/trainer_gpu.py --dim 256 --ffn 512 --layers 2 --frames 5 --size 32 --cpu   # a dry run

Experts: dim 5120, 40 heads (the head size is 128), ffn 13824 (A14B), bf16, with as many blocks as the GPU allows
(``--layers 0``: 40 when the estimate for the mode fits the GPU, fewer otherwise; the figure then
says how many). One expert file serves as both experts (the disk of a GPU box seldom holds two
28.6 GB files; the trainer loads it twice, as it would two files). Sampling: ``--frames`` at
``--size`` squared, CFG 6, 40 inference steps, the last step of the low-noise expert with
gradients, the first frame decoded, a tiny HPS (the reward model's own memory is known: about
2 GB). ``sharded`` needs two or more GPUs and runs with ``--gpus N``.

Each mode runs the real trainer in its own process (``accelerate launch`` with the ZeRO-3 + CPU
offload preset; low: one process without DeepSpeed); GPU memory is torch's
``max_memory_allocated`` per step (the step events), host memory the trainer processes' summed
PSS sampled every 0.5 s. Results go to ``bench/results/trainer_gpu.json`` with the GPU's name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

PACK = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK))
RESULTS = PACK / "bench" / "results" / "trainer_gpu.json"


def write_expert(path: Path, dim: int, ffn: int, layers: int) -> None:
    """Random bf16 weights in the native layout, written tensor by tensor (no whole copy in memory)."""
    import math

    import torch
    from safetensors.torch import save_file

    from training.tiny_models import wan_expert_shapes

    shapes = wan_expert_shapes(dim=dim, ffn_dim=ffn, num_layers=layers, in_dim=36, text_dim=4096)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            tensors[key] = (1 + 0.02 * torch.randn(*shape, generator=gen)) if "norm" in key else \
                0.02 * torch.randn(*shape, generator=gen)
        else:
            tensors[key] = torch.randn(*shape, generator=gen) / math.sqrt(shape[-1] if len(shape) == 2 else shape[1])
        tensors[key] = tensors[key].to(torch.bfloat16)
    save_file(tensors, str(path))


def layers_that_fit(args, mode: str, gpu_gib: float) -> int:
    """The most blocks (up to 40) whose estimate for ``mode`` fits the GPU."""
    from training.trainer.memory_estimate import ZERO3_OFFLOAD, DeepSpeedShape, a14b_size, estimate

    shape = DeepSpeedShape() if mode == "low" else ZERO3_OFFLOAD
    for layers in range(40, 0, -1):
        size = a14b_size(frames=args.frames, width=args.size, height=args.size, layers=layers)
        if estimate(size, mode, args.gpus if mode == "sharded" else 1, 1, shape).gpu_gib <= gpu_gib * 0.95:
            return layers
    return 1


def run_mode(args, mode: str, folder: Path, expert: Path, base: dict) -> dict:
    import psutil

    from training.trainer.progress import parse_events

    config = folder / f"{mode}.yaml"
    config.write_text(yaml.safe_dump(dict(base, memory=mode, output_dir=str(folder / f"out_{mode}"),
                                          high_noise_model=str(expert), low_noise_model=str(expert))))
    processes = args.gpus if mode == "sharded" else 1
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if mode == "low":
        cmd += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        preset = "accelerate_zero3_offload.yaml" if processes == 1 else "accelerate_zero3_offload_multi_gpu.yaml"
        if args.cpu:
            preset = "accelerate_cpu_zero3_offload_2proc.yaml"
        cmd += ["--config_file", f"training/configs/{preset}", "--num_processes", str(processes)]
    cmd += [str(PACK / "training" / "train_reward_lora.py"), "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PACK,
                            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4")))
    launcher = psutil.Process(proc.pid)
    peak = {"pss": 0.0, "done": False}

    def sample():
        while not peak["done"]:
            try:
                total = sum(p.memory_full_info().pss for p in [launcher] + launcher.children(recursive=True))
                peak["pss"] = max(peak["pss"], total / 2 ** 30)
            except psutil.Error:
                pass
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    out, err = proc.communicate()
    peak["done"] = True
    events = parse_events(out)
    steps = [e for e in events if e["event"] == "step"]
    if proc.returncode != 0 or not steps:
        error = next((e["message"] for e in events if e["event"] == "error"), err[-1500:])
        return {"mode": mode, "error": error}
    started = events[0]
    timed = [e["seconds"] for e in steps[1:]] or [steps[0]["seconds"]]
    return {"mode": mode, "processes": started["world_size"], "memory_reason": started["memory_reason"],
            "peak_gpu_gib": round(max(e["peak_memory_mb"] for e in steps) / 1024, 2),
            "peak_host_pss_gib": round(peak["pss"], 2), "seconds_per_step": round(statistics.median(timed), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--ffn", type=int, default=13824)
    parser.add_argument("--layers", type=int, default=0, help="blocks; 0 = as many as the GPU allows (40 max)")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", default="fast,low")
    parser.add_argument("--gpus", type=int, default=2, help="processes for sharded")
    parser.add_argument("--cpu", action="store_true", help="a dry run of the script on the CPU (tiny sizes)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    import torch

    from training.demo import write_tiny_run

    cuda = torch.cuda.is_available() and not args.cpu
    gpu_name = torch.cuda.get_device_name(0) if cuda else "cpu (dry run)"
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if cuda else 1e9
    results = {"gpu": gpu_name, "gpu_gib": round(gpu_gib, 1) if cuda else None, "frames": args.frames,
               "size": args.size, "dim": args.dim, "ffn": args.ffn, "runs": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        folder = Path(tmp)
        base = yaml.safe_load(write_tiny_run(folder).read_text())
        emb_dim = 4096
        from training.tiny_models import random_prompt_embeddings
        from training.trainer.models import write_prompt_embeddings

        prompts = ["a red fox running through snow", "a sailboat on a calm lake at sunset"]
        write_prompt_embeddings(folder / "emb4096.safetensors", random_prompt_embeddings([""] + prompts, dim=emb_dim))
        base.update(prompt_embeddings=str(folder / "emb4096.safetensors"), prompts=prompts, validation_prompts=[],
                    held_out_rewards=[], validation_every=0, frames=args.frames, height=args.size, width=args.size,
                    inference_steps=40, guidance_scale=6.0, max_steps=args.steps, checkpoint_every=0, resume=False,
                    lora_rank=128, lora_alpha=64.0, mixed_precision="bf16" if cuda else "no",
                    gradient_checkpointing=cuda, preflight=cuda)
        for mode in args.modes.split(","):
            layers = args.layers or (layers_that_fit(args, mode, gpu_gib) if cuda else 2)
            expert = folder / f"expert_{layers}.safetensors"
            if not expert.exists():
                for old in folder.glob("expert_*.safetensors"):
                    old.unlink()
                write_expert(expert, args.dim, args.ffn, layers)
            row = {"layers": layers, **run_mode(args, mode, folder, expert, base)}
            print(json.dumps(row), flush=True)
            results["runs"].append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {args.out}")
    return 0 if all("error" not in r for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
