"""Benchmark: scoring decoded frames with HPS v2.1 (ViT-H-14 configuration, random weights).

Three figures from one run, on the same model and the same frames:
  reference  per-image PIL -> tensor -> hpsv2's ResizeMaxSize/Normalize, then model(image, text)
             per image (the prompt re-encoded for every image), as ``hpsv2.img_score.score`` does
  ours       RewardModel.score on the whole batch (tensor preprocessing, prompt encoded once)
  floor      the bare image-encoder forward of the same preprocessed frames
Goals: ours >= 4x faster than reference, ours <= 1.15x floor, scores within 1e-4.

    python bench/score_frames.py --frames 4          # ViT-H-14 is ~4 s/frame on 2 CPU cores
    python bench/score_frames.py --config tiny       # a quick smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.rewards.hps import VIT_H_14_CONFIG, HPSRewardModel, build_open_clip_model  # noqa: E402
from training.rewards.preprocess import CLIP_MEAN, CLIP_STD  # noqa: E402
from training.rewards.tiny import TINY_HPS_CONFIG  # noqa: E402
from training.rewards.tokenizers import hps_tokenize  # noqa: E402

PROMPT = "A red fox running through fresh snow at sunrise, cinematic lighting"


def reference_transform(image, size: int = 224) -> torch.Tensor:
    """hpsv2 ``preprocess_val`` (light augmentation) step by step, with torchvision >= 0.17 defaults."""
    from torchvision.transforms import functional as TF
    from torchvision.transforms import InterpolationMode

    tensor = TF.to_tensor(image.convert("RGB"))
    height, width = tensor.shape[-2:]
    scale = size / max(height, width)
    if scale != 1.0:
        tensor = TF.resize(tensor, [round(height * scale), round(width * scale)], InterpolationMode.BICUBIC)
    pad_h, pad_w = size - tensor.shape[-2], size - tensor.shape[-1]
    tensor = F.pad(tensor, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=0)
    return TF.normalize(tensor, CLIP_MEAN, CLIP_STD)


def reference_scores(clip, images, prompt: str, device) -> list[float]:
    scores = []
    for image in images:
        with torch.no_grad():
            pixels = reference_transform(image).unsqueeze(0).to(device)
            text = hps_tokenize([prompt]).to(device)
            out = clip(pixels, text)
            scores.append(float(torch.diagonal(out["image_features"] @ out["text_features"].T)[0]))
    return scores


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--config", choices=("vit-h-14", "tiny"), default="vit-h-14")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from PIL import Image

    torch.manual_seed(0)
    config = VIT_H_14_CONFIG if args.config == "vit-h-14" else TINY_HPS_CONFIG
    clip, build_s = timed(lambda: build_open_clip_model(config).eval().requires_grad_(False).to(args.device))
    ours = HPSRewardModel(clip, config)  # fp32: the reference figure is the fp32 one
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(args.frames)]
    images = [Image.fromarray(a) for a in arrays]
    frames = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255).to(args.device)
    print(f"{args.config}: built in {build_s:.1f} s; {args.frames} frames {args.height}x{args.width} on "
          f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    expected, reference_s = timed(lambda: reference_scores(clip, images, PROMPT, args.device))
    ours._prompt_cache.clear()  # ours pays for its one prompt encoding

    def run_ours():
        with torch.no_grad():
            return ours.score(frames, [PROMPT] * args.frames)

    got, ours_s = timed(run_ours)
    pixels = ours.preprocess_frames(frames, "reference")

    def run_floor():
        with torch.no_grad():
            return clip.encode_image(pixels)

    _, floor_s = timed(run_floor)
    max_diff = float((got.cpu() - torch.tensor(expected)).abs().max())
    per = lambda s: f"{s:8.2f} s  ({s / args.frames:6.3f} s/frame)"  # noqa: E731
    print(f"reference (per-image PIL + forward): {per(reference_s)}")
    print(f"ours (batched tensor path)         : {per(ours_s)}")
    print(f"floor (bare image-encoder forward) : {per(floor_s)}")
    speedup, over_floor = reference_s / ours_s, ours_s / floor_s
    print(f"speed-up vs reference: {speedup:.2f}x (goal >= 4x) {'OK' if speedup >= 4 else 'MISSED'}")
    print(f"ours / floor: {over_floor:.3f}x (goal <= 1.15x) {'OK' if over_floor <= 1.15 else 'MISSED'}")
    print(f"max |score difference|: {max_diff:.2e} (goal <= 1e-4) {'OK' if max_diff <= 1e-4 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
