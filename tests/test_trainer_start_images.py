"""Start images for the I2V / Fun-InP experts: the 20 conditioning channels equal an independent
computation of Wan2.2-Fun-InP's layout (written here from VideoX-Fun's pipeline_wan2_2_fun_inpaint.py
and utils.get_image_to_video_latent), they change the trajectory, and a run trains with them."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from training.demo import write_tiny_run
from training.trainer.conditioning import StartImages, read_start_images, start_image_condition
from training.trainer.config import ConfigError, config_from_dict
from training.trainer.recipe import train
from training.trainer.models import load_wan_vae
from training.trainer.progress import Progress, parse_events

H = W = 32
FRAMES = 9


def videox_fun_inp_condition(vae, image: torch.Tensor, frames: int) -> torch.Tensor:
    """The reference's steps, one by one: the start image tiled over the video and a 0/255 mask
    (0 = keep frame 0), init video in [-1, 1], binarised mask, masked video = video * (mask < 0.5),
    its VAE posterior mode normalised; the mask with frame 0 repeated 4 times, folded to 4 channels
    per latent frame, inverted and resized to the latent (trilinear, first frame apart)."""
    video = image[None, :, None].repeat(1, 1, frames, 1, 1)                 # [1, 3, F, H, W] in [0, 1]
    mask_video = torch.zeros(1, 1, frames, *image.shape[1:])
    mask_video[:, :, 1:] = 255
    init_video = video * 2 - 1
    mask = (mask_video / 255 > 0.5).float()
    masked_video = init_video * (mask.repeat(1, 3, 1, 1, 1) < 0.5)
    mode = vae.encode(masked_video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = (mode - mean) / std
    mask = torch.cat([mask[:, :, :1].repeat_interleave(4, dim=2), mask[:, :, 1:]], dim=2)
    mask = mask.view(1, mask.shape[2] // 4, 4, *mask.shape[3:]).transpose(1, 2)
    inverted = 1 - mask
    first = F.interpolate(inverted[:, :, :1], size=(1, *latents.shape[3:]), mode="trilinear", align_corners=False)
    rest = F.interpolate(inverted[:, :, 1:], size=(latents.shape[2] - 1, *latents.shape[3:]), mode="trilinear",
                         align_corners=False)
    return torch.cat([torch.cat([first, rest], dim=2), latents], dim=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("start")
    config = yaml.safe_load(write_tiny_run(folder).read_text())
    images = folder / "start"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate(((48, 40), (32, 32), (20, 36))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(images / f"img{i}.png")
    held_out = folder / "held_out"
    held_out.mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(held_out / "val.png")
    config.update(frames=FRAMES, height=H, width=W)
    return folder, config, images, held_out


def test_conditioning_equals_the_fun_inp_layout(tiny):
    _, config, images, _ = tiny
    vae = load_wan_vae(config["vae"], torch.float32)
    image = StartImages(read_start_images(images), H, W, FRAMES).images[0]
    with torch.no_grad():
        ours = start_image_condition(vae, image, FRAMES)
        reference = videox_fun_inp_condition(vae, image, FRAMES)
    assert ours.shape == (1, 20, (FRAMES - 1) // 4 + 1, H // 8, W // 8)
    assert torch.allclose(ours, reference, atol=1e-6)
    assert ours[:, :4, 0].eq(1).all() and ours[:, :4, 1:].eq(0).all()  # given frame 0, the rest generated


def test_start_images_change_the_trajectory(tiny):
    from training.trainer.step import RewardStep
    from training.trainer.models import load_wan_expert, read_prompt_embeddings

    _, config, images, _ = tiny
    cfg = config_from_dict(dict(config, start_images=str(images), validation_start_images=None, validation_every=0))
    experts = {n: load_wan_expert(getattr(cfg, f"{n}_noise_model"), torch.float32) for n in ("high", "low")}
    vae = load_wan_vae(cfg.vae, torch.float32)
    trainer = RewardStep(cfg, experts, vae, [], read_prompt_embeddings(cfg.prompt_embeddings), cfg.prompts,
                            torch.device("cpu"), 0, start_images=StartImages(read_start_images(images), H, W, FRAMES))
    noise = trainer.noise(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        zero = trainer.trajectory(cfg.prompts[:1], noise, None, trainer.condition(1, None, [0]))
        first = trainer.trajectory(cfg.prompts[:1], noise, None, trainer.condition(1, trainer.start_images, [0]))
        second = trainer.trajectory(cfg.prompts[:1], noise, None, trainer.condition(1, trainer.start_images, [1]))
    assert (first - zero).abs().max() > 1e-3 and (first - second).abs().max() > 1e-3
    # sample k uses image k mod N: the 4th sample of a run wraps round to the first image
    _, _, _, indices = trainer.step_inputs(3, 0)
    assert indices == [3] and torch.equal(trainer.condition(1, trainer.start_images, indices),
                                          trainer.condition(1, trainer.start_images, [0]))


def test_a_run_trains_and_validates_with_start_images(tiny):
    folder, config, images, held_out = tiny
    cfg = config_from_dict(dict(config, start_images=str(images), validation_start_images=str(held_out),
                                max_steps=2, validation_every=2, output_dir=str(folder / "run"), resume=False))
    out = io.StringIO()
    torch.set_num_threads(1)
    assert train(cfg, Progress(cfg.output_dir, stream=out)) == 0
    events = parse_events(out.getvalue())
    assert events[0]["start_images"] == 3
    assert [e["step"] for e in events if e["event"] == "validation"] == [0, 2]


def test_bad_start_images_are_refused(tiny, tmp_path):
    from training.safe_io import save_safetensors
    from training.tiny_models import tiny_wan_state_dict

    folder, config, images, held_out = tiny
    with pytest.raises(ConfigError) as info:  # validation must not score the training images
        config_from_dict(dict(config, start_images=str(images)))
    assert info.value.field == "validation_start_images"
    t2v = {}
    for name in ("high", "low"):
        t2v[name] = tmp_path / f"t2v_{name}.safetensors"
        save_safetensors(tiny_wan_state_dict(seed=7, in_dim=16, text_dim=64), t2v[name])
    with pytest.raises(ConfigError) as info:
        config_from_dict(dict(config, start_images=str(images), validation_every=0,
                              high_noise_model=str(t2v["high"]), low_noise_model=str(t2v["low"])))
    assert info.value.field == "start_images" and "16 input channels" in str(info.value)
    empty = tmp_path / "no_images"
    empty.mkdir()
    with pytest.raises(ConfigError) as info:
        config_from_dict(dict(config, start_images=str(empty), validation_every=0))
    assert info.value.field == "start_images" and "holds no image" in str(info.value)
