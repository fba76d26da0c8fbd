"""Benchmark: scoring decoded frames with HPS v2.1, PickScore or the aesthetic predictor (their real
configurations, random weights).

HPS v2.1 (``--reward hps``, the default):

Three figures, on the same weights and the same frames, each the median of ``--repeats`` (>= 2)
timed runs after one warm-up run of every path, the paths' order alternating between runs:
  reference  what ``hpsv2.img_score.score`` does per image: hpsv2's own model class, its
             ``preprocess_val`` (image_transform with ResizeMaxSize) on the PIL image, its tokenizer
             on the prompt (re-encoded for every image), ``model(image, text)``; the score is the
             diagonal of image @ text features. Needs the real ``hpsv2`` package (test-only:
             tests/requirements-reference.txt); without it a re-implementation of those steps is
             timed instead, and the output says so.
  ours       RewardModel.score on the whole batch (tensor preprocessing, the prompt encoded once)
  floor      the bare image-encoder forward of the same preprocessed frames
The per-call ``torch.load`` of the checkpoint that ``hpsv2.img_score.score`` also does is not timed.
Goals: ours >= 4x faster than reference, ours <= 1.15x floor, scores within 1e-4 (exit 1 if not).

PickScore (``--reward pickscore``: laion ViT-H/14 CLIPModel) and the aesthetic predictor
(``--reward aesthetic``: OpenAI ViT-L/14 vision tower + MLP) have no packaged reference to time;
two figures: ours (RewardModel.score, the prompt encoded once per run) and the floor (the bare
image-encoder forward of the same preprocessed pixels). Goal: ours <= 1.10x floor, judged on the
fastest of the ``--repeats`` runs of each (the least disturbed by other load on a shared machine;
the medians are printed too).

    python bench/score_frames.py --frames 4          # ViT-H-14 is ~4 s/frame on 2 CPU cores
    python bench/score_frames.py --reward pickscore --frames 4
    python bench/score_frames.py --reward aesthetic --frames 4
    python bench/score_frames.py --config tiny       # a quick smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.rewards.hps import VIT_H_14_CONFIG, HPSRewardModel, build_open_clip_model  # noqa: E402
from training.rewards.preprocess import CLIP_MEAN, CLIP_STD  # noqa: E402
from training.rewards.tiny import TINY_HPS_CONFIG  # noqa: E402
from training.rewards.tokenizers import hps_tokenize  # noqa: E402

PROMPT = "A red fox running through fresh snow at sunrise, cinematic lighting"
TOLERANCE = 1e-4


def hpsv2_reference(config_name: str, config: dict, state_dict: dict, device: str, tmp: Path):
    """(model, preprocess_val, tokenizer) from the real hpsv2 package, holding ``state_dict``; None
    when hpsv2 is not installed. Built on the meta device (no 1B-parameter random init), then
    loaded strictly; the text causal mask is not in checkpoints and is recomputed."""
    if importlib.util.find_spec("hpsv2") is None:
        return None
    from tests.helpers.reference_hpsv2 import import_hpsv2

    _, add_model_config, create_model_and_transforms = import_hpsv2(tmp)
    from hpsv2.src.open_clip import get_tokenizer

    if config_name != "ViT-H-14":  # hpsv2 ships ViT-H-14's config; others are registered here
        (tmp / "configs").mkdir(exist_ok=True)
        import json

        (tmp / "configs" / f"{config_name}.json").write_text(json.dumps(config))
        add_model_config(tmp / "configs")
    kwargs = dict(precision="amp", jit=False, force_quick_gelu=False, force_custom_text=False,
                  force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None,
                  image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
                  with_score_predictor=False, with_region_predictor=False)  # as hpsv2.img_score
    model, _, preprocess_val = create_model_and_transforms(config_name, None, device="meta", **kwargs)
    model = model.to_empty(device="cpu")
    n = model.attn_mask.shape[0]
    model.attn_mask.copy_(torch.full((n, n), float("-inf")).triu_(1))
    model.load_state_dict(state_dict, strict=True)
    return model.eval().to(device), preprocess_val, get_tokenizer(config_name)


def reimplemented_transform(image, size: int = 224) -> torch.Tensor:
    """Fallback without hpsv2: its ``preprocess_val`` steps re-implemented (ToTensor, ResizeMaxSize, Normalize)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    tensor = TF.to_tensor(image.convert("RGB"))
    height, width = tensor.shape[-2:]
    scale = size / max(height, width)
    if scale != 1.0:
        tensor = TF.resize(tensor, [round(height * scale), round(width * scale)], InterpolationMode.BICUBIC)
    pad_h, pad_w = size - tensor.shape[-2], size - tensor.shape[-1]
    tensor = F.pad(tensor, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=0)
    return TF.normalize(tensor, CLIP_MEAN, CLIP_STD)


def reference_scores(model, preprocess_val, tokenizer, images, prompt: str, device) -> list[float]:
    """The per-image loop of ``hpsv2.img_score.score`` (autocast only on CUDA, as there)."""
    scores = []
    for image in images:
        with torch.no_grad(), torch.autocast("cuda", enabled=str(device).startswith("cuda")):
            pixels = preprocess_val(image).unsqueeze(0).to(device=device, non_blocking=True)
            text = tokenizer([prompt]).to(device=device, non_blocking=True)
            outputs = model(pixels, text)
            logits = outputs["image_features"] @ outputs["text_features"].T
            scores.append(float(torch.diagonal(logits).cpu().numpy()[0]))
    return scores


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def clip_reward(kind: str, config_name: str, device: str):
    """(our model, the bare image-encoder forward on preprocessed pixels) for PickScore or the aesthetic
    predictor, real or tiny configuration, random weights (fp32)."""
    from training.rewards import aesthetic, pickscore, tiny
    from training.rewards.hf_clip import (LAION_VIT_H_14_CLIP_CONFIG, OPENAI_VIT_L_14_VISION_CONFIG, build_hf_clip,
                                          build_hf_clip_vision, image_embeds)

    if kind == "pickscore":
        config = LAION_VIT_H_14_CLIP_CONFIG if config_name == "vit-h-14" else tiny.TINY_PICKSCORE_CONFIG
        clip = build_hf_clip(config).eval().requires_grad_(False).to(device)
        model = pickscore.PickScoreRewardModel(clip, config)
        return model, lambda pixels: image_embeds(clip.vision_model, clip.visual_projection, pixels)
    config = OPENAI_VIT_L_14_VISION_CONFIG if config_name == "vit-h-14" else tiny.TINY_AESTHETIC_VISION_CONFIG
    sizes = {0: (1024, 768), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)} if config_name == "vit-h-14" \
        else tiny.TINY_AESTHETIC_MLP_SIZES
    vision = build_hf_clip_vision(config).eval().requires_grad_(False).to(device)
    model = aesthetic.AestheticRewardModel(vision, aesthetic.AestheticMLP(sizes).to(device), config)
    return model, lambda pixels: image_embeds(vision.vision_model, vision.visual_projection, pixels)


def bench_clip_reward(args) -> int:
    """Ours vs the bare encoder forward for PickScore / the aesthetic predictor."""
    torch.manual_seed(0)
    (model, floor_forward), build_s = timed(lambda: clip_reward(args.reward, args.config, args.device))
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.integers(0, 256, (args.frames, args.height, args.width, 3), dtype=np.uint8))
    frames = frames.permute(0, 3, 1, 2).float().div(255).to(args.device)
    pixels = model.preprocess_frames(frames, "reference")
    print(f"{args.reward} ({args.config}): built in {build_s:.1f} s; {args.frames} frames {args.height}x{args.width} "
          f"on {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    def run_ours(count=args.frames):
        model._prompt_cache.clear()
        with torch.no_grad():
            return model.score(frames[:count], [PROMPT] * count)

    def run_floor(count=args.frames):
        with torch.no_grad():
            return floor_forward(pixels[:count])

    paths = {"ours": run_ours, "floor": run_floor}
    for fn in paths.values():
        fn(1)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for repeat in range(args.repeats):
        for name in (list(paths) if repeat % 2 == 0 else list(reversed(paths))):
            times[name].append(timed(paths[name])[1])
    median = {name: statistics.median(values) for name, values in times.items()}
    fastest = {name: min(values) for name, values in times.items()}
    for name, label in (("ours", "ours (batched tensor path)         "), ("floor", "floor (bare image-encoder forward) ")):
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{label}: {fastest[name]:8.2f} s fastest, {median[name]:8.2f} s median "
              f"({fastest[name] / args.frames:6.3f} s/frame; runs {runs})")
    ratio = fastest["ours"] / fastest["floor"]
    print(f"ours / floor: {ratio:.3f}x fastest runs (medians {median['ours'] / median['floor']:.3f}x) "
          f"(goal <= 1.10x): {'MET' if ratio <= 1.10 else 'NOT MET'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per path after the warm-up (>= 2)")
    parser.add_argument("--config", choices=("vit-h-14", "tiny"), default="vit-h-14",
                        help="the real configuration (ViT-H/14; ViT-L/14 for the aesthetic predictor) or a tiny one")
    parser.add_argument("--reward", choices=("hps", "pickscore", "aesthetic"), default="hps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (the figures are medians)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reward != "hps":
        return bench_clip_reward(args)
    from PIL import Image

    torch.manual_seed(0)
    config = VIT_H_14_CONFIG if args.config == "vit-h-14" else TINY_HPS_CONFIG
    clip, build_s = timed(lambda: build_open_clip_model(config).eval().requires_grad_(False).to(args.device))
    ours = HPSRewardModel(clip, config)  # fp32: the reference figure is the fp32 one
    with tempfile.TemporaryDirectory() as tmp:
        reference = hpsv2_reference("ViT-H-14" if args.config == "vit-h-14" else "wanreward-bench-tiny", config,
                                    {k: v.cpu() for k, v in clip.state_dict().items()}, args.device, Path(tmp))
    if reference is None:
        reference_kind = "RE-IMPLEMENTATION of hpsv2's per-image steps (hpsv2 not installed)"
        reference = (clip, reimplemented_transform, lambda texts: hps_tokenize(texts))
    else:
        reference_kind = "real hpsv2 package: its model class, preprocess_val and tokenizer"
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(args.frames)]
    images = [Image.fromarray(a) for a in arrays]
    frames = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255).to(args.device)
    pixels = ours.preprocess_frames(frames, "reference")
    print(f"{args.config}: built in {build_s:.1f} s; {args.frames} frames {args.height}x{args.width} on "
          f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"reference: {reference_kind}")

    def run_reference(count=args.frames):
        return reference_scores(*reference, images[:count], PROMPT, args.device)

    def run_ours(count=args.frames):
        ours._prompt_cache.clear()  # ours pays for its one prompt encoding every run
        with torch.no_grad():
            return ours.score(frames[:count], [PROMPT] * count)

    def run_floor(count=args.frames):
        with torch.no_grad():
            return clip.encode_image(pixels[:count])

    paths = {"reference": run_reference, "ours": run_ours, "floor": run_floor}
    for fn in paths.values():  # warm-up: one frame through every path
        fn(1)
    times: dict[str, list[float]] = {name: [] for name in paths}
    results = {}
    for repeat in range(args.repeats):
        order = list(paths) if repeat % 2 == 0 else list(reversed(paths))
        for name in order:
            results[name], seconds = timed(paths[name])
            times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    max_diff = float((results["ours"].cpu() - torch.tensor(results["reference"])).abs().max())

    def line(name, label):
        runs = ", ".join(f"{s:.2f}" for s in times[name])
        return (f"{label}: {median[name]:8.2f} s median ({median[name] / args.frames:6.3f} s/frame; "
                f"runs {runs})")

    print(line("reference", "reference (per-image PIL + forward)"))
    print(line("ours", "ours (batched tensor path)         "))
    print(line("floor", "floor (bare image-encoder forward) "))
    speedup, over_floor = median["reference"] / median["ours"], median["ours"] / median["floor"]
    goals = {
        f"speed-up vs reference: {speedup:.2f}x (goal >= 4x)": speedup >= 4,
        f"ours / floor: {over_floor:.3f}x (goal <= 1.15x)": over_floor <= 1.15,
        f"max |score difference|: {max_diff:.2e} (goal <= {TOLERANCE:g})": max_diff <= TOLERANCE,
    }
    for text, met in goals.items():
        print(f"{text}: {'MET' if met else 'NOT MET'}")
    if max_diff > TOLERANCE:
        print(f"FAIL: scores differ from the reference by {max_diff:.2e} > {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
