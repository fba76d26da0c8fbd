"""The Train node's inputs resolved to what the trainer reads: files of ComfyUI's folders, prompts
and their umT5 embeddings (encoded with ComfyUI's loaded text encoder), start images; every
refusal names the input."""

from __future__ import annotations

import os
import re
from pathlib import Path

import folder_paths
import torch

from ..training.safe_io import save_safetensors
from ..training.trainer.config import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,119}$")
# Config fields the node's inputs set, by the input's name (errors name the input the user sees).
FIELD_INPUTS = {"rewards[0]": "reward_model", "rewards[1]": "reward_model_2", "held_out_rewards[0]": "held_out_reward",
                "held_out_rewards[1]": "held_out_reward_2", "lora_rank": "rank", "lora_alpha": "alpha",
                "max_steps": "steps", "prompts": "prompts", "prompts_file": "prompts_file",
                "gradient_accumulation_steps": "gradient_accumulation",
                "prompt_embeddings": "clip / prompt_embeddings", "text_encoder": "clip", "tokenizer": "clip",
                "validation_prompts": "options: validation_prompts", "validation_every": "options: validation_every",
                "validation_start_images": "options: validation_start_images", "start_images": "start_images"}


class TrainInputError(ValueError):
    """A node input is wrong; the message names it."""


def input_error(exc: ConfigError) -> TrainInputError:
    """A config error as the node's: it names the node input, then the config field's message."""
    field_name = exc.field or ""
    base = field_name.split(".")[0]
    name = FIELD_INPUTS.get(base, FIELD_INPUTS.get(field_name, base))
    return TrainInputError(f"input '{name}': {exc}")


def safe_output_name(name: str) -> str:
    """The LoRA file stem: a plain name (no folders, no '..'); a trailing .safetensors is dropped."""
    stem = (name or "").strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not _NAME.match(stem) or ".." in stem:
        raise TrainInputError(f"output_name {name!r}: use a plain file name (letters, digits, '.', '_', '-', "
                              "space; no folders, no '..'); the LoRA is written to ComfyUI's loras folder")
    return stem


def input_path(name: str, what: str, folder: bool = False) -> str:
    """A file (or folder) in ComfyUI's input folder (subfolders allowed, nothing outside it)."""
    base = os.path.realpath(folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(base, name.strip()))
    if os.path.commonpath([base, path]) != base:
        raise TrainInputError(f"{what} {name!r}: give a {'folder' if folder else 'file'} inside ComfyUI's input "
                              f"folder ({base})")
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        raise TrainInputError(f"{what} {name!r}: {'folder' if folder else 'file'} not found in ComfyUI's input "
                              f"folder ({base})")
    return path


def model_file(folder: str, name: str, input_name: str) -> str:
    """The full path of a file of a ComfyUI model folder, or an error naming the input and the folders."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        places = ", ".join(folder_paths.get_folder_paths(folder))
        raise TrainInputError(f"input '{input_name}': {name!r} is not in the {folder} folder ({places}); put the "
                              "file there and press R to refresh the list")
    return path


def prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def encode_prompts(clip, prompts: list[str]) -> dict[str, torch.Tensor]:
    """umT5 embeddings of each prompt with ComfyUI's loaded CLIP, cut to the prompt's tokens ([L, 4096]).

    ComfyUI pads umT5 to 512 tokens with zeros (pad id 0); the trainer pads itself, so the
    padding is cut off here.
    """
    out = {}
    for prompt in prompts:
        tokens = clip.tokenize(prompt)
        cond = clip.encode_from_tokens(tokens)
        batches = next(iter(tokens.values()))
        length = sum(1 for batch in batches for tok in batch if int(tok[0]) != 0) or 1
        out[prompt] = cond[0, :length].float().cpu().contiguous()
    return out


def save_images(images: torch.Tensor, path: Path, input_name: str) -> str:
    """A ComfyUI IMAGE batch [N, H, W, C] as the trainer's start-images file ([N, 3, H, W] in [0, 1])."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise TrainInputError(f"input '{input_name}': expected an IMAGE batch [N, height, width, 3] (ComfyUI's "
                              f"layout), got {tuple(getattr(images, 'shape', ()))}")
    save_safetensors({"images": images[..., :3].permute(0, 3, 1, 2).float().clamp(0, 1).contiguous()}, path)
    return str(path)


def prompt_inputs(prompts: str, prompts_file: str, prompt_embeddings: str, clip, negative: bool,
                   validation_prompts, run_dir: Path) -> dict:
    """The training prompts and the embeddings file of every prompt the run uses (encoded here, once,
    with ComfyUI's loaded umT5 when ``clip`` is connected)."""
    lines = prompt_lines(prompts)
    prompts_file = (prompts_file or "").strip()
    if lines and prompts_file:
        raise TrainInputError("give the prompts either in 'prompts' or in 'prompts_file', not both")
    if prompts_file:
        from ..training.trainer.config import read_prompt_file

        try:
            lines = read_prompt_file(input_path(prompts_file, "prompts_file"), "prompts_file")
        except ConfigError as exc:
            raise input_error(exc) from None
    embeddings = (prompt_embeddings or "").strip()
    if clip is not None:
        if not lines:
            raise TrainInputError("input 'prompts' is empty: write the training prompts, one per line")
        from ..training.trainer.models import write_prompt_embeddings

        todo = list(dict.fromkeys(lines + list(validation_prompts) + ([""] if negative else [])))
        path = run_dir / "prompt_embeddings.safetensors"
        write_prompt_embeddings(path, encode_prompts(clip, todo))
        return {"prompts": tuple(lines), "prompt_embeddings": str(path)}
    if not embeddings:
        raise TrainInputError("connect the umt5 text encoder to 'clip' (CLIPLoader, type wan), or give "
                              "'prompt_embeddings': a precomputed embeddings file in the input folder")
    return {"prompts": tuple(lines), "prompt_embeddings": input_path(embeddings, "prompt_embeddings")}


def image_inputs(start_images, start_images_folder: str, options: dict, run_dir: Path) -> dict:
    out = {}
    for field_name, images, folder, label in (
            ("start_images", start_images, start_images_folder, "start_images"),
            ("validation_start_images", options.get("validation_start_images"),
             options.get("validation_start_images_folder", ""), "options: validation_start_images")):
        folder = (folder or "").strip()
        if images is not None and folder:
            raise TrainInputError(f"input '{label}': give the images or a folder, not both")
        if images is not None:
            out[field_name] = save_images(images, run_dir / f"{field_name}.safetensors", label)
        elif folder:
            out[field_name] = input_path(folder, f"{label}_folder", folder=True)
    return out
