"""Reward nodes: Load Reward Model, Score Frames, Pick Best by Reward (adapters over training.rewards)."""

from __future__ import annotations

import json
import math
import os

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..training.file_cache import FileCache
from ..training.rewards import load_reward_model
from ..training.rewards.preprocess import PREPROCESS_MODES, comfy_image_to_frames
from ..training.rewards.registry import EXPECTED_FILES
from ..training.rewards.report import (FRAME_SELECTIONS, combine_reports, pick_best, pick_text, plot_scores,
                                       report_json, report_text, score_report, split_videos, video_summary)
from ..training.safe_io import UserFileError
from .folders import REWARD_MODELS
from .reward_memory import on_scoring_device

RewardModelType = io.Custom("WAN_REWARD_MODEL")
CATEGORY = "Wan Reward LoRA/reward"
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MPS_VARIANTS = ("official", "videox_fun")
# V3 nodes have no instance state. Cached models are loaded on the CPU; one that scores on a GPU
# is then under ComfyUI's memory management (nodes/reward_memory.py).
_CACHE: FileCache = FileCache(size=2)
MAX_CANDIDATES = 8
MAX_PLOT_PANELS = 16
KIND_NAMES = {"hps_v2.1": "HPS v2.1", "mps": "MPS", "pickscore": "PickScore", "aesthetic": "LAION aesthetic v2"}


def _devices() -> list[str]:
    options = ["auto", "cpu"]
    if torch.cuda.is_available():
        options += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return options


def _resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        import comfy.model_management as mm

        return mm.get_torch_device()
    return torch.device(choice)


def _resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if DTYPES.get(choice) is not None:
        return DTYPES[choice]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_cached(path: str, device: torch.device, dtype: torch.dtype, variant: str):
    """The model for ``path``, loaded on the CPU; ``model.target_device`` is where it scores
    (``reward_memory.on_scoring_device``)."""
    def read():
        model = load_reward_model(path, device="cpu", dtype=dtype, variant=variant, mps_variant_only=True)
        if model.name != "mps":
            model.variant = None
        model.target_device = device
        return model

    return _CACHE.get(path, read, options=(str(device), str(dtype), variant))


def _frame_inputs() -> list:
    return [
        io.Combo.Input("frames", options=list(FRAME_SELECTIONS), default="all",
                       tooltip="which frames to score: all, the first, every Nth, or N evenly spaced"),
        io.Int.Input("n", default=4, min=1, max=10000, tooltip="N for every_nth / evenly_spaced"),
        io.Combo.Input("preprocess", options=list(PREPROCESS_MODES), default="reference",
                       tooltip="reference: the model's published pipeline (HPS: long side + pad; MPS, PickScore, "
                               "aesthetic: short side + centre crop). squash: stretch to 224x224 as the reference trainer "
                               "does"),
        io.Int.Input("batch_size", default=8, min=1, max=256, tooltip="frames per forward pass"),
        io.Int.Input("frames_per_video", default=0, min=0, max=100000, optional=True,
                     tooltip="0: each IMAGE input is one video. N: each holds videos of N frames one after another, "
                             "as VAE Decode gives a sampler's batch of videos (e.g. 81)"),
    ]


def _video_label(name: str, video: int, videos: int) -> str:
    return name if videos == 1 else f"{name}[video {video}]"


class WanRewardLoadRewardModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WanRewardLoadRewardModel", display_name="Load Reward Model (HPS, MPS, PickScore, Aesthetic)",
            category=CATEGORY,
            description="Load a reward model from models/reward_models: HPS v2.1, MPS, PickScore or the LAION aesthetic "
                        "predictor (the kind is read from the file's keys).",
            inputs=[
                io.Combo.Input("model_name", options=folder_paths.get_filename_list(REWARD_MODELS),
                               tooltip="a file in ComfyUI/models/reward_models: HPS_v2.1_compressed.pt, an MPS "
                                       "state-dict conversion, PickScore_v1's model.safetensors, or the joined "
                                       "aesthetic predictor"),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="auto: bf16/fp16 on GPU, fp32 on CPU"),
                io.Combo.Input("device", options=_devices(), default="auto"),
                io.Combo.Input("mps_variant", options=list(MPS_VARIANTS), default="official",
                               tooltip="MPS only (ignored for other files). official: single-image scorer (threshold "
                                       "0.3, ~100*cos). videox_fun: the reference trainer's reward (threshold 0.01, cosine)"),
            ],
            outputs=[RewardModelType.Output(display_name="reward_model")],
        )

    @classmethod
    def execute(cls, model_name, dtype, device, mps_variant) -> io.NodeOutput:
        path = folder_paths.get_full_path(REWARD_MODELS, model_name)
        if path is None:
            folders = ", ".join(folder_paths.get_folder_paths(REWARD_MODELS))
            raise FileNotFoundError(f"reward model checkpoint not found: {model_name!r} is not in the reward_models "
                                    f"folder ({folders}); press R to refresh the list.\n{EXPECTED_FILES}")
        torch_device = _resolve_device(device)
        try:
            model = load_cached(path, torch_device, _resolve_dtype(dtype, torch_device), mps_variant)
        except UserFileError as exc:
            text = str(exc)
            raise UserFileError(text if os.path.basename(path) in text else f"model_name {model_name}: {text}") from None
        detail = f" ({model.variant})" if model.name == "mps" else ""
        where = f"scores on {torch_device}" + (", under ComfyUI's memory management (stays loaded between runs "
                                               "while memory allows)" if torch_device.type != "cpu" else "")
        return io.NodeOutput(model, ui=ui.PreviewText(f"{KIND_NAMES.get(model.name, model.name)}{detail} from "
                                                      f"{model_name}; {where}; {str(model.dtype).replace('torch.', '')}"))


def _score_video(models, weights, clip, prompt, frames, n, batch_size, preprocess) -> tuple[dict, str, list[dict]]:
    """(report, text, plot panels) of one video with one model, or two combined by weight."""
    reports = []
    for model in models:
        with on_scoring_device(model):
            reports.append(score_report(model, clip, prompt, frames, n, batch_size, preprocess))
    if len(reports) == 1:
        return reports[0], report_text(reports[0]), reports
    combined = combine_reports(reports, weights)
    text = "\n".join([report_text(combined).split("\n")[0]] + [report_text(r) for r in reports])
    return combined, text, [combined, *reports]


class WanRewardScoreFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WanRewardScoreFrames", display_name="Score Frames (Reward)", category=CATEGORY,
            description="Score decoded frames (one video, or a batch of videos) with a reward model (HPS, MPS, "
                        "PickScore, aesthetic); shows per-frame scores and the motion score.",
            inputs=[
                RewardModelType.Input("reward_model"),
                io.Image.Input("images", tooltip="decoded frames (an IMAGE batch): one video, or several of "
                                                 "frames_per_video frames each"),
                io.String.Input("prompt", multiline=True, default=""),
                *_frame_inputs(),
                io.Float.Input("weight", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True,
                               tooltip="weight of reward_model when reward_model_2 is connected"),
                RewardModelType.Input("reward_model_2", optional=True,
                                      tooltip="optional second model: mean_score = weight*model + weight_2*model_2"),
                io.Float.Input("weight_2", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True),
            ],
            outputs=[
                io.Float.Output(display_name="mean_score", tooltip="the mean score (over the videos of a batch)"),
                io.String.Output(display_name="scores_json"),
                io.Image.Output(display_name="plot"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, reward_model, images, prompt, frames, n, preprocess, batch_size, frames_per_video=0, weight=1.0,
                reward_model_2=None, weight_2=1.0) -> io.NodeOutput:
        clips = split_videos(comfy_image_to_frames(images, "images"), frames_per_video, "images")
        models = [reward_model] if reward_model_2 is None else [reward_model, reward_model_2]
        scored = [_score_video(models, [weight, weight_2], clip, prompt, frames, n, batch_size, preprocess)
                  for clip in clips]
        if len(scored) == 1:
            report, text, panels = scored[0]
        else:
            videos = [dict(r, index=i) for i, (r, _, _) in enumerate(scored)]
            report = {"frames_per_video": frames_per_video, "videos": videos, **video_summary(videos)}
            text = "\n".join([f"{len(videos)} videos of {frames_per_video} frames: mean {report['mean']:.4f}, best "
                              f"video {report['best_video']} ({report['best_video_mean']:.4f})"]
                             + [f"video {i}: {t}" for i, (_, t, _) in enumerate(scored)])
            panels = [ps[0] for _, _, ps in scored][:MAX_PLOT_PANELS]
        plot = plot_scores(panels)
        return io.NodeOutput(report["mean"], report_json(report), plot,
                             ui={"text": (text,), **ui.PreviewImage(plot, cls=cls).as_dict()})


def _match_frames(batch: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``batch`` at ``like``'s frame size and channel count (ComfyUI's bilinear upscale; alpha dropped or opaque)."""
    if batch.shape[1:3] != like.shape[1:3]:
        import comfy.utils

        batch = comfy.utils.common_upscale(batch.movedim(-1, 1), like.shape[2], like.shape[1], "bilinear",
                                           "disabled").movedim(1, -1)
    if batch.shape[-1] > like.shape[-1]:
        batch = batch[..., :like.shape[-1]]
    elif batch.shape[-1] < like.shape[-1]:
        batch = torch.cat([batch, torch.ones_like(batch[..., :1]).expand(*batch.shape[:-1],
                                                                        like.shape[-1] - batch.shape[-1])], -1)
    return batch


def select_latents(latent: dict, indices: list[int]) -> dict:
    """The videos ``indices`` of a LATENT batch, in that order; ``batch_index`` keeps their places in the
    original batch (as core's Latent From Batch), so a sampler draws the same noise for them."""
    samples = latent["samples"]
    out = dict(latent, samples=samples[indices])
    mask = latent.get("noise_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim > 0 and mask.shape[0] == samples.shape[0]:
        out["noise_mask"] = mask[indices]
    original = latent.get("batch_index") or list(range(samples.shape[0]))
    out["batch_index"] = [original[i] for i in indices]
    return out


def _candidates(candidates: dict, frames_per_video: int, latent: dict | None) -> tuple[list, list, list]:
    """(indices, input labels, IMAGE batches) of the candidate videos. Without frames_per_video (and no
    latent to count them) each input is one candidate, index i = input candidate_{i+1}; with it, every
    input is split into videos, numbered 0.. in input order."""
    connected = [(i, candidates[f"candidate_{i + 1}"]) for i in range(MAX_CANDIDATES)
                 if candidates.get(f"candidate_{i + 1}") is not None]
    for i, images in connected:
        comfy_image_to_frames(images, f"candidate_{i + 1}")
    if frames_per_video == 0 and latent is not None:
        count = int(latent["samples"].shape[0])
        if len(connected) != 1:
            raise ValueError("latent is connected and frames_per_video is 0, with several candidate inputs: set "
                             "frames_per_video to the frames of one video")
        frames = connected[0][1].shape[0]
        if frames % count:
            raise ValueError(f"candidate_{connected[0][0] + 1} has {frames} frames for the latent's {count} videos: "
                             "set frames_per_video")
        frames_per_video = frames // count
    if frames_per_video == 0:
        if len(connected) < 2:
            raise ValueError("connect at least two candidates (candidate_1, candidate_2, ...), or one batch of "
                             "videos with frames_per_video set (or its latent connected)")
        return [i for i, _ in connected], [f"candidate_{i + 1}" for i, _ in connected], [b for _, b in connected]
    indices, labels, batches = [], [], []
    for i, images in connected:
        videos = split_videos(images, frames_per_video, f"candidate_{i + 1}")
        for j, video in enumerate(videos):
            indices.append(len(indices))
            labels.append(_video_label(f"candidate_{i + 1}", j, len(videos)))
            batches.append(video)
    if len(batches) < 2:
        raise ValueError(f"only one video to pick from ({labels[0]}): connect more candidates or a batch of videos")
    if latent is not None and int(latent["samples"].shape[0]) != len(batches):
        raise ValueError(f"latent holds {int(latent['samples'].shape[0])} videos but the candidates hold "
                         f"{len(batches)} (frames_per_video = {frames_per_video}): connect the latent batch the "
                         "candidate frames were decoded from")
    return indices, labels, batches


class WanRewardPickBest(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        candidates = [io.Image.Input(f"candidate_{i}", optional=i > 1,
                                     tooltip=("a video's frames (index 0 in the outputs), or a batch of videos (set "
                                              "frames_per_video, or connect their latent)") if i == 1 else
                                     f"a video's frames; index {i - 1} in the outputs")
                      for i in range(1, MAX_CANDIDATES + 1)]
        return io.Schema(
            node_id="WanRewardPickBest", display_name="Pick Best Video by Reward (Best-of-N)", category=CATEGORY,
            description="Best-of-N: score candidate videos (separate inputs, or one batch of N videos) by mean reward; "
                        "output the best, the top k above a threshold, the rest, and the chosen latents. Indices are "
                        "0-based: index i is candidate_{i+1}, or video i of a batch.",
            inputs=[
                RewardModelType.Input("reward_model"),
                io.String.Input("prompt", multiline=True, default=""),
                *candidates,
                *_frame_inputs(),
                io.Int.Input("top_k", default=1, min=1, max=64),
                io.Float.Input("threshold", default=-1000.0, min=-1000.0, max=1000.0, step=0.001,
                               tooltip="keep only candidates whose mean score is at least this (-1000: no "
                                       "threshold); when none reaches it, top_k holds the best alone"),
                io.Latent.Input("latent", optional=True,
                                tooltip="the LATENT batch the candidate videos were decoded from (one per video): "
                                        "the top_k videos' latents come out of 'latent', to refine only those"),
            ],
            outputs=[
                io.Image.Output(display_name="best"),
                io.Int.Output(display_name="best_index",
                              tooltip="0-based, like ComfyUI batch indices: candidate_1 = 0, or video 0 of a batch"),
                io.Float.Output(display_name="best_score"),
                io.Image.Output(display_name="top_k",
                                tooltip="the best top_k at or above the threshold, in rank order (never empty: "
                                        "the best alone when none reaches it); other frame sizes are resized to "
                                        "the best's"),
                io.Image.Output(display_name="rejected",
                                tooltip="the other candidates in rank order, resized to the best's frame size; "
                                        "an empty batch (0 frames) when there are none"),
                io.String.Output(display_name="report_json", tooltip="ranking and per-candidate reports, 0-based"),
                io.Latent.Output(display_name="latent",
                                 tooltip="the top_k videos' latents, in rank order (needs the latent input)"),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, reward_model, prompt, frames, n, preprocess, batch_size, top_k, threshold, frames_per_video=0,
                latent=None, **candidates) -> io.NodeOutput:
        slots, labels, clips = _candidates(candidates, frames_per_video, latent)
        batches = dict(zip(slots, clips))
        with on_scoring_device(reward_model):
            reports = [dict(score_report(reward_model, comfy_image_to_frames(batches[i], label), prompt, frames, n,
                                         batch_size, preprocess), index=i, input=label)
                       for i, label in zip(slots, labels)]
        pick = pick_best(reports, top_k, threshold if threshold > -1000.0 else -math.inf, indices=slots)
        best = batches[pick["best"]]
        resized = [i for i in slots if batches[i].shape[1:] != best.shape[1:]]

        def join(indices):
            return torch.cat([_match_frames(batches[i], best) for i in indices]) if indices else best[:0]

        text = pick_text(pick, reports, slots)
        if resized:
            text += f"\nresized to the best's {best.shape[2]}x{best.shape[1]} frames: indices {resized}"
        position = {i: k for k, i in enumerate(slots)}
        chosen = select_latents(latent, [position[i] for i in pick["top_k"]]) if latent is not None else None
        report = {"indices": "0-based: index i is input candidate_{i+1}, or video i of a batch",
                  "frames_per_video": frames_per_video, "pick": pick, "resized": resized, "candidates": reports}
        selection = {"node": cls.hidden.unique_id, "model": reward_model.name, "best_index": pick["best"],
                     "best_score": pick["best_score"], "top_k": pick["top_k"],
                     "scores": {str(r["index"]): r["mean"] for r in reports}}
        if isinstance(cls.hidden.extra_pnginfo, dict):  # core's SaveImage writes this dict into its PNGs
            cls.hidden.extra_pnginfo.setdefault("wan_reward_selection", {})[str(cls.hidden.unique_id)] = selection
            report["saved_image_metadata"] = "wan_reward_selection"
        return io.NodeOutput(best, pick["best"], pick["best_score"], join(pick["top_k"]),
                             join(pick["rejected"]), json.dumps(report, indent=1), chosen, ui=ui.PreviewText(text))


NODES = [WanRewardLoadRewardModel, WanRewardScoreFrames, WanRewardPickBest]
