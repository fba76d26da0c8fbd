"""Benchmark (GPU): a reward model under ComfyUI's memory management stays on the GPU between calls.

Scores the same 81 frames three times in a row through ``nodes/reward_memory.on_scoring_device``
(what Score Frames and Pick Best do) and prints, per call, the seconds, whether the weights were
already on the GPU when the call started, and the host-to-device bytes the call moved (the
difference of the model's parameter bytes resident on the GPU before and after loading). Goal: no
transfer after the first call. On the CPU it checks that nothing is registered with ComfyUI.

    python bench/reward_memory.py --comfyui ~/ComfyUI                 # HPS v2.1 ViT-H/14, random weights
    python bench/reward_memory.py --comfyui ~/ComfyUI --config tiny   # a quick run

Needs a CUDA GPU for the figure; not measured on the machines this pack is developed on (no GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True, help="a ComfyUI checkout (its comfy package is imported)")
    parser.add_argument("--config", choices=("vit-h-14", "tiny"), default="vit-h-14")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(Path(args.comfyui).expanduser()), str(ROOT)]
    import torch

    import comfy.options

    comfy.options.enable_args_parsing()  # ComfyUI's flags from sys.argv, as main.py: --cpu without a GPU
    sys.argv = sys.argv[:1] + ([] if torch.cuda.is_available() else ["--cpu"])
    import comfy.model_management as mm

    spec = importlib.util.spec_from_file_location("reward_memory", ROOT / "nodes" / "reward_memory.py")
    reward_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward_memory)
    from training.rewards.hps import VIT_H_14_CONFIG, HPSRewardModel, build_open_clip_model
    from training.rewards.tiny import TINY_HPS_CONFIG

    config = VIT_H_14_CONFIG if args.config == "vit-h-14" else TINY_HPS_CONFIG
    torch.manual_seed(0)
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    model = HPSRewardModel(build_open_clip_model(config), config).to(dtype=dtype)
    model.target_device = mm.get_torch_device()
    frames = torch.rand(args.frames, 3, 480, 832)
    print(f"device {model.target_device}, vram state {mm.vram_state.name}, {args.frames} frames, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters ({dtype})")
    transfers = []
    for call in range(args.calls):
        on_gpu_before = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cuda")
        start = time.perf_counter()
        with reward_memory.on_scoring_device(model) as scoring:
            on_gpu_after = sum(p.numel() * p.element_size() for p in scoring.parameters() if p.device.type == "cuda")
            with torch.no_grad():
                for chunk in frames.split(8):
                    scoring.score(chunk, "a red fox in the snow")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        moved = max(0, on_gpu_after - on_gpu_before)
        transfers.append(moved)
        print(f"call {call + 1}: {time.perf_counter() - start:7.2f} s; weights on the GPU at the start: "
              f"{on_gpu_before / 2**20:8.1f} MiB; moved to the GPU: {moved / 2**20:8.1f} MiB")
    if model.target_device.type == "cpu":
        registered = any(m.model is getattr(model, "_comfy_patcher", None) for m in mm.current_loaded_models)
        print(f"CPU: nothing moved ({sum(transfers)} bytes), registered with ComfyUI: {registered}")
        return 0 if not registered and not sum(transfers) else 1
    met = all(moved == 0 for moved in transfers[1:])
    print(f"no transfer after the first call: {'MET' if met else 'NOT MET'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
