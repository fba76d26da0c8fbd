"""The 20 extra input channels of the I2V / Fun-InP experts (36 = 16 noise + 4 mask + 16 video).

Text to video (the reference's training, the default): all 20 channels are zero.

With a start image, as Wan2.2-Fun-InP's pipeline builds them (read in VideoX-Fun
``pipeline_wan2_2_fun_inpaint.py`` and ``utils.get_image_to_video_latent``):
- the masked video: the image in frame 0, every later frame 0 (mid-grey in [-1, 1]); its
  VAE latent (posterior mode, normalised with the VAE's latent mean and std) is 16 channels;
- the mask: 4 channels per latent frame, 1 where the video is given (the first latent frame,
  whose 4 channels stand for pixel frame 0 repeated 4 times), 0 where it is generated.
Images are stretched to the training size (bicubic, antialiased), as the reference resizes
them to the sample size.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..safe_io import UserFileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_CHANNELS = 4


def read_start_images(path: str | os.PathLike, count_only: bool = False) -> list[torch.Tensor] | int:
    """Start images [3, H, W] in [0, 1] from a folder of images (sorted by name) or a safetensors
    file with ``images`` [N, 3, H, W]; with ``count_only`` just their number (files checked)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserFileError(f"start images folder {path} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        if count_only:
            return len(files)
        return [_read_image(p) for p in files]
    from ..safe_io import read_safetensors_header, read_state_dict

    index = read_safetensors_header(path, "start images")
    info = index.tensors.get("images")
    if info is None or len(info.shape) != 4 or info.shape[1] != 3 or info.shape[0] < 1:
        raise UserFileError(f"start images {path} must hold 'images' [N, 3, H, W] (found "
                            f"{ {k: list(v.shape) for k, v in list(index.tensors.items())[:3]} })")
    if count_only:
        return info.shape[0]
    images = read_state_dict(path, "start images")["images"].float()
    if not bool(torch.isfinite(images).all()) or images.min() < 0 or images.max() > 1:
        raise UserFileError(f"start images {path}: values must be finite and in [0, 1]")
    return list(images)


def _read_image(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise UserFileError(f"start image {path} cannot be read as an image ({exc})") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def fit_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, h, w] -> [3, height, width], stretched (bicubic, antialiased), in [0, 1]."""
    if tuple(image.shape[1:]) == (height, width):
        return image.float()
    out = F.interpolate(image[None].float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp(0, 1)


def zero_condition(batch: int, latent_frames: int, height: int, width: int, device) -> torch.Tensor:
    """The text-to-video conditioning: 4 mask + 16 video channels of zeros."""
    return torch.zeros(batch, MASK_CHANNELS + 16, latent_frames, height // 8, width // 8, device=device)


def encode_normalised(vae, video: torch.Tensor) -> torch.Tensor:
    """Frames [B, 3, F, H, W] in [-1, 1] -> the normalised latent (posterior mode) [B, 16, T, h, w]."""
    dtype = next(vae.parameters()).dtype
    mode = vae.encode(video.to(dtype)).latent_dist.mode().float()
    mean = torch.tensor(vae.config.latents_mean, device=mode.device, dtype=torch.float32).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=mode.device, dtype=torch.float32).view(1, -1, 1, 1, 1)
    return (mode - mean) / std


@torch.no_grad()
def start_image_condition(vae, image: torch.Tensor, frames: int) -> torch.Tensor:
    """The Fun-InP conditioning [1, 20, T, h, w] of one start image [3, H, W] in [0, 1] (at the
    training size) for a video of ``frames`` frames."""
    _, height, width = image.shape
    video = torch.zeros(1, 3, frames, height, width, device=image.device)
    video[:, :, 0] = image * 2 - 1
    latent = encode_normalised(vae, video)
    mask = torch.zeros(1, MASK_CHANNELS, *latent.shape[2:], device=latent.device)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latent], dim=1)


class StartImages:
    """Start images at the training size and their conditionings, each computed once (cached on
    the CPU: a VAE encode of the whole masked video per image)."""

    def __init__(self, images: list[torch.Tensor], height: int, width: int, frames: int):
        self.images = [fit_image(image, height, width) for image in images]
        self.frames = frames
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.images)

    def condition(self, vae, indices: list[int], device) -> torch.Tensor:
        """[B, 20, T, h, w] for images ``indices`` (taken modulo the number of images)."""
        out = []
        for index in indices:
            index %= len(self.images)
            if index not in self._cache:
                self._cache[index] = start_image_condition(vae, self.images[index].to(device), self.frames).cpu()
            out.append(self._cache[index])
        return torch.cat(out).to(device)
