"""Differentiable, batched CLIP preprocessing of frames in [0, 1] ([B, 3, H, W] tensors).

Written by hand because the references do it per PIL image; these are the same
operations on a batch so the trainer can backpropagate through them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_MODES = ("reference", "squash")
# Values this far outside [0, 1] are a caller error (e.g. frames in [-1, 1] or 0..255).
RANGE_TOLERANCE = 1e-3


def check_frames(frames, what: str = "frames") -> None:
    """Raise ValueError naming the problem unless ``frames`` is float [B>0, 3 or 4, H>0, W>0] in [0, 1]
    (a 4th channel is alpha: ``rgb`` drops it)."""
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor [B, 3, H, W] in [0, 1], got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[1] not in (3, 4):
        raise ValueError(
            f"{what} must have shape [B, 3, H, W] (RGB, channels first; RGBA's alpha is dropped), got "
            f"{tuple(frames.shape)}; ComfyUI IMAGE batches are [B, H, W, C]: permute(0, 3, 1, 2) them"
        )
    if frames.shape[0] == 0:
        raise ValueError(f"{what} is empty (0 frames): nothing to score")
    if frames.shape[2] == 0 or frames.shape[3] == 0:
        raise ValueError(f"{what} has an empty image size {tuple(frames.shape[2:])}")
    if not frames.is_floating_point():
        raise ValueError(f"{what} must be a float tensor in [0, 1], got dtype {frames.dtype} (divide uint8 by 255)")
    with torch.no_grad():
        low, high = torch.aminmax(frames.detach().float())
        low, high = float(low), float(high)
    if low != low or high != high:
        bad = torch.isnan(frames.detach().flatten(1)).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{what} has NaN values (in frames {bad[:8]}{' ...' if len(bad) > 8 else ''}): the node that "
                         "made them failed (e.g. a VAE decode in fp16 that overflowed)")
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"{what} must lie in [0, 1], got values in [{low:.4g}, {high:.4g}] "
            "(decoded VAE output in [-1, 1] needs (x + 1) / 2; 0..255 needs / 255)"
        )


def comfy_image_to_frames(images, name: str = "images") -> torch.Tensor:
    """A ComfyUI IMAGE batch [B, H, W, C] (C = 3 RGB or 4 RGBA, floats in [0, 1]) as frames
    [B, C, H, W], checked whole; ValueError naming the input ``name`` and what it holds."""
    layout = "ComfyUI's IMAGE layout is [B, H, W, C] with C = 3 (RGB) or 4 (RGBA), floats in [0, 1]"
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be an IMAGE batch ({layout}), got {type(images).__name__}")
    shape = tuple(images.shape)
    if images.ndim != 4:
        raise ValueError(f"{name} must be an IMAGE batch ({layout}), got a tensor of shape {list(shape)}")
    if shape[-1] not in (3, 4):
        if shape[1] in (3, 4):
            raise ValueError(f"{name} has shape {list(shape)}: channels first ([B, C, H, W]); {layout}. The node "
                             "that made it returns another layout: move the channels last (permute(0, 2, 3, 1))")
        raise ValueError(f"{name} has {shape[-1]} channels (shape {list(shape)}); {layout}. A {shape[-1]}-channel "
                         "image (a mask, a depth or flow map, a latent) is not a picture to score")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty (0 frames): nothing to score; check the node that feeds it")
    frames = images.permute(0, 3, 1, 2)
    check_frames(frames, name)
    return frames


def rgb(frames: torch.Tensor) -> torch.Tensor:
    """Drop an alpha channel ([B, 4, H, W] -> [B, 3, H, W]); the colour is scored as it is, not composited."""
    return frames[:, :3] if frames.shape[1] == 4 else frames


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _bicubic(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=size, mode="bicubic", align_corners=False, antialias=True)


def resize_long_side_and_pad(frames: torch.Tensor, size: int = 224) -> torch.Tensor:
    """hpsv2 ``ResizeMaxSize``: long side to ``size`` (bicubic, antialias, no clamp), zero-pad centred.

    Unlike the reference, an image whose long side already equals ``size`` is padded
    too (the reference leaves it non-square and the model crashes).
    """
    height, width = frames.shape[-2:]
    scale = size / max(height, width)
    if scale != 1.0:
        # Python round (banker's rounding), as the reference.
        frames = _bicubic(frames, (round(height * scale), round(width * scale)))
    pad_h, pad_w = size - frames.shape[-2], size - frames.shape[-1]
    if pad_h or pad_w:
        frames = F.pad(frames, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return frames


def resize_short_side_and_crop(frames: torch.Tensor, size: int = 224, crop_top: str = "floor") -> torch.Tensor:
    """Short side to ``size`` (long side floored), then a centre crop: CLIPImageProcessor
    (transformers; MPS and PickScore) puts the crop at ``(H - size) // 2`` (``crop_top="floor"``),
    torchvision's CenterCrop (OpenAI CLIP; the aesthetic predictor) at ``round((H - size) / 2)``
    (``crop_top="round"``). Tensor bicubic with antialias approximates the references' PIL
    resize (mean difference about 0.3/255)."""
    height, width = frames.shape[-2:]
    if height <= width:
        new = (size, int(size * width / height))
    else:
        new = (int(size * height / width), size)
    frames = _bicubic(frames, new)
    if crop_top == "floor":
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
    elif crop_top == "round":
        top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    else:
        raise ValueError(f"crop_top must be 'floor' or 'round', got {crop_top!r}")
    return frames[..., top:top + size, left:left + size]


def squash(frames: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The reference trainer's transform: ``Resize((size, size), bicubic)``, aspect ratio not kept."""
    return _bicubic(frames, (size, size))


def check_mode(mode: str) -> str:
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {mode!r}")
    return mode
