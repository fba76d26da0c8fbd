"""Reward nodes: Load Reward Model, Score Frames, Pick Best by Reward (adapters over training.rewards)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import OrderedDict

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..training.rewards import load_reward_model
from ..training.rewards.preprocess import PREPROCESS_MODES
from ..training.rewards.registry import EXPECTED_FILES
from ..training.rewards.report import (FRAME_SELECTIONS, combine_reports, pick_best, pick_text, plot_scores,
                                       report_json, report_text, score_report)
from .folders import REWARD_MODELS

RewardModelType = io.Custom("WAN_REWARD_MODEL")
CATEGORY = "Wan Reward LoRA/reward"
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MPS_VARIANTS = ("official", "seed")
# V3 nodes have no instance state. Cached models live on the CPU; a GPU model is moved to its
# device only while it scores (after asking ComfyUI to free that much memory) and back after.
_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
_CACHE_SIZE = 2
_ACTIVATION_BYTES = 1 << 30  # headroom for one scoring batch of ViT-H activations
MAX_CANDIDATES = 8


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
    """The model for ``path``, kept on the CPU; ``model.target_device`` is where it scores (see ``_on_device``)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size, str(device), str(dtype), variant)
    if key not in _CACHE:
        model = load_reward_model(path, device="cpu", dtype=dtype, variant=variant, mps_variant_only=True)
        if model.name != "mps":
            model.variant = None
        model.target_device = device
        _CACHE[key] = model
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return _CACHE[key]


@contextlib.contextmanager
def _on_device(model):
    """Score on ``model.target_device``: a GPU model is moved there for the duration (ComfyUI first
    frees that much memory, unloading its own models if it must) and offloaded to the CPU after."""
    target = torch.device(getattr(model, "target_device", model.device))
    if target.type == "cpu" or model.device == target:
        yield model
        return
    import comfy.model_management as mm

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    mm.free_memory(size + _ACTIVATION_BYTES, target)
    try:
        yield model.to(target)
    finally:
        model.to("cpu")
        mm.soft_empty_cache()


def _image_to_frames(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] -> [B, C, H, W] (the reward models drop an alpha channel)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"{what} must be an IMAGE batch [B, H, W, C], got {getattr(images, 'shape', type(images))}")
    return images.permute(0, 3, 1, 2)


def _frame_inputs() -> list:
    return [
        io.Combo.Input("frames", options=list(FRAME_SELECTIONS), default="all",
                       tooltip="which frames to score: all, the first, every Nth, or N evenly spaced"),
        io.Int.Input("n", default=4, min=1, max=10000, tooltip="N for every_nth / evenly_spaced"),
        io.Combo.Input("preprocess", options=list(PREPROCESS_MODES), default="reference",
                       tooltip="reference: the model's published pipeline (HPS: long side + pad; MPS: short side "
                               "+ centre crop). squash: stretch to 224x224 as the seed's training does"),
        io.Int.Input("batch_size", default=8, min=1, max=256, tooltip="frames per forward pass"),
    ]


class WanRewardLoadRewardModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WanRewardLoadRewardModel", display_name="Load Reward Model", category=CATEGORY,
            description="Load HPS v2.1 or MPS from models/reward_models (detected from the file's keys).",
            inputs=[
                io.Combo.Input("model_name", options=folder_paths.get_filename_list(REWARD_MODELS),
                               tooltip="a file in ComfyUI/models/reward_models: HPS_v2.1_compressed.pt or an MPS "
                                       "state-dict conversion"),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="auto: bf16/fp16 on GPU, fp32 on CPU"),
                io.Combo.Input("device", options=_devices(), default="auto"),
                io.Combo.Input("mps_variant", options=list(MPS_VARIANTS), default="official",
                               tooltip="MPS only (ignored for HPS files). official: single-image scorer (threshold 0.3, ~100*cos). "
                                       "seed: the seed's training reward (threshold 0.01, cosine)"),
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
        model = load_cached(path, torch_device, _resolve_dtype(dtype, torch_device), mps_variant)
        detail = f" ({model.variant})" if model.name == "mps" else ""
        where = f"scores on {torch_device}" + (", kept on the CPU between runs" if torch_device.type != "cpu" else "")
        return io.NodeOutput(model, ui=ui.PreviewText(f"{model.name}{detail} from {model_name}; {where}; "
                                                      f"{str(model.dtype).replace('torch.', '')}"))


class WanRewardScoreFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WanRewardScoreFrames", display_name="Score Frames", category=CATEGORY,
            description="Score decoded frames with a reward model; shows per-frame scores and the motion score.",
            inputs=[
                RewardModelType.Input("reward_model"),
                io.Image.Input("images", tooltip="decoded frames (an IMAGE batch)"),
                io.String.Input("prompt", multiline=True, default=""),
                *_frame_inputs(),
                io.Float.Input("weight", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True,
                               tooltip="weight of reward_model when reward_model_2 is connected"),
                RewardModelType.Input("reward_model_2", optional=True,
                                      tooltip="optional second model: mean_score = weight*model + weight_2*model_2"),
                io.Float.Input("weight_2", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True),
            ],
            outputs=[
                io.Float.Output(display_name="mean_score"),
                io.String.Output(display_name="scores_json"),
                io.Image.Output(display_name="plot"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, reward_model, images, prompt, frames, n, preprocess, batch_size, weight=1.0,
                reward_model_2=None, weight_2=1.0) -> io.NodeOutput:
        clip = _image_to_frames(images)
        with _on_device(reward_model):
            report = score_report(reward_model, clip, prompt, frames, n, batch_size, preprocess)
        text = report_text(report)
        if reward_model_2 is not None:
            with _on_device(reward_model_2):
                second = score_report(reward_model_2, clip, prompt, frames, n, batch_size, preprocess)
            combined = combine_reports([report, second], [weight, weight_2])
            text = "\n".join([report_text(combined).split("\n")[0], text, report_text(second)])
            plot = plot_scores([combined, report, second])
            report = combined
        else:
            plot = plot_scores(report)
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


class WanRewardPickBest(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        candidates = [io.Image.Input(f"candidate_{i}", optional=i > 2,
                                     tooltip=f"a frame batch (e.g. one seed); index {i - 1} in the outputs")
                      for i in range(1, MAX_CANDIDATES + 1)]
        return io.Schema(
            node_id="WanRewardPickBest", display_name="Pick Best by Reward", category=CATEGORY,
            description="Best-of-N: score candidate frame batches by mean reward; output the best, the top k "
                        "above a threshold, and the rest. Indices are 0-based: index i is candidate_{i+1}.",
            inputs=[
                RewardModelType.Input("reward_model"),
                io.String.Input("prompt", multiline=True, default=""),
                *candidates,
                *_frame_inputs(),
                io.Int.Input("top_k", default=1, min=1, max=MAX_CANDIDATES),
                io.Float.Input("threshold", default=-1000.0, min=-1000.0, max=1000.0, step=0.001,
                               tooltip="keep only candidates whose mean score is at least this (-1000: no "
                                       "threshold); when none reaches it, top_k holds the best alone"),
            ],
            outputs=[
                io.Image.Output(display_name="best"),
                io.Int.Output(display_name="best_index",
                              tooltip="0-based, like ComfyUI batch indices: 0 = candidate_1, 1 = candidate_2, ..."),
                io.Float.Output(display_name="best_score"),
                io.Image.Output(display_name="top_k",
                                tooltip="the best top_k at or above the threshold, in rank order (never empty: "
                                        "the best alone when none reaches it); other frame sizes are resized to "
                                        "the best's"),
                io.Image.Output(display_name="rejected",
                                tooltip="the other candidates in rank order, resized to the best's frame size; "
                                        "an empty batch (0 frames) when there are none"),
                io.String.Output(display_name="report_json", tooltip="ranking and per-candidate reports, 0-based"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, reward_model, prompt, frames, n, preprocess, batch_size, top_k, threshold,
                **candidates) -> io.NodeOutput:
        batches = {i: candidates[f"candidate_{i + 1}"] for i in range(MAX_CANDIDATES)
                   if candidates.get(f"candidate_{i + 1}") is not None}
        slots = list(batches)
        with _on_device(reward_model):
            reports = [dict(score_report(reward_model, _image_to_frames(batches[i], f"candidate_{i + 1}"), prompt,
                                         frames, n, batch_size, preprocess), index=i, input=f"candidate_{i + 1}")
                       for i in slots]
        pick = pick_best(reports, top_k, threshold if threshold > -1000.0 else -math.inf, indices=slots)
        best = batches[pick["best"]]
        resized = [i for i in slots if batches[i].shape[1:] != best.shape[1:]]

        def join(indices):
            return torch.cat([_match_frames(batches[i], best) for i in indices]) if indices else best[:0]

        text = pick_text(pick, reports, slots)
        if resized:
            text += f"\nresized to the best's {best.shape[2]}x{best.shape[1]} frames: indices {resized}"
        report = {"indices": "0-based: index i is input candidate_{i+1}", "pick": pick, "resized": resized,
                  "candidates": reports}
        return io.NodeOutput(best, pick["best"], pick["best_score"], join(pick["top_k"]),
                             join(pick["rejected"]), json.dumps(report, indent=1), ui=ui.PreviewText(text))


NODES = [WanRewardLoadRewardModel, WanRewardScoreFrames, WanRewardPickBest]
