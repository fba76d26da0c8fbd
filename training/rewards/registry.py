"""``load_reward_model``: read a checkpoint safely, tell its kind (HPS, MPS, PickScore, aesthetic) by its keys, load strictly.

The kinds are a table (``KINDS``): each names the keys that mark it in a state dict and the
builder that loads it, tried in order, the way diffusers picks a LoRA converter by key prefix.
Adding a reward model is one row here and its module."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import safe_io
from ..safe_io import SAFETENSORS_SUFFIXES, UserFileError
from ..torch_file_check import torch_file_problem
from .aesthetic import AESTHETIC_MARKER_KEYS, build_aesthetic, is_mlp_only
from .base import RewardModel
from .hps import HPS_MARKER_KEYS, build_hps
from .loading import describe_keys, has_keys, strip_prefixes
from .mps import MPS_MARKER_KEYS, build_mps
from .pickled_module import read_pickled_module
from .pickscore import PICKSCORE_MARKER_KEYS, build_pickscore

EXPECTED_FILES = (
    "Put one of these files in ComfyUI/models/reward_models/ (or give its full path):\n"
    "  HPS v2.1: HPS_v2.1_compressed.pt from https://huggingface.co/xswu/HPSv2 (Apache-2.0), "
    "or a safetensors conversion (HPS_v2.1_compressed.safetensors, DiffSynth-Studio/QualityMetric_reward_pretrained "
    "on ModelScope; RE-N-Y/hpsv21 model.safetensors on Hugging Face)\n"
    "  MPS: a state-dict conversion of MPS_overall_checkpoint.pth (github.com/Kwai-Kolors/MPS; no stated "
    "licence, download it yourself): VideoX-Fun's MPS_overall.pth, RE-N-Y/mpsv1 model.safetensors, or "
    "MPS_overall_checkpoint_diffsynth.safetensors\n"
    "  PickScore: model.safetensors of https://huggingface.co/yuvalkirstain/PickScore_v1 (MIT), renamed e.g. "
    "PickScore_v1.safetensors\n"
    "  LAION aesthetic predictor v2: sac+logos+ava1-l14-linearMSE.pth (github.com/christophschuhmann/"
    "improved-aesthetic-predictor, Apache-2.0) joined with the CLIP ViT-L/14 encoder (model.safetensors of "
    "https://huggingface.co/openai/clip-vit-large-patch14, MIT) by "
    "`python -m tools.convert_aesthetic MLP.pth CLIP.safetensors laion_aesthetic_v2.safetensors` (from the pack folder)"
)
# Every file suffix the loader reads (compared in lower case); the node's dropdown lists only these.
REWARD_EXTENSIONS = SAFETENSORS_SUFFIXES + (".pt", ".pth", ".bin", ".ckpt")


def _corrupt(path: Path, what: str, exc: BaseException) -> UserFileError:
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return safe_io.damaged_file_error("reward model checkpoint", path, what, detail)


def _read_torch_pickle(path: Path, kind: str, mmap: bool = False):
    """Weights-only load (``mmap``: a zip checkpoint's tensors mapped, not read); only a pickle
    that names code goes on to the restricted module reader."""
    problem = torch_file_problem(path)  # e.g. claims of data the file does not hold: before allocating
    if problem:
        raise _corrupt(path, "PyTorch checkpoint", ValueError(problem))
    if kind == "torch-zip" and not zipfile.is_zipfile(path):
        raise _corrupt(path, "PyTorch checkpoint", ValueError("the zip archive has no central directory"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and kind == "torch-zip")
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise _corrupt(path, "PyTorch checkpoint", exc) from exc
        needs_code = exc
    except Exception as exc:  # EOFError, RuntimeError (zip reader), ...
        raise _corrupt(path, "PyTorch checkpoint", exc) from exc
    # A whole pickled module (the official MPS file): rebuild only its tensors, run none of its code.
    try:
        return read_pickled_module(path)[0]
    except UserFileError:
        lines = [line.strip() for line in str(needs_code).split("WeightsUnpickler error:")[-1].splitlines()]
        unsupported = next((line for line in lines if line), "it names Python code")
        raise UserFileError(
            f"{path.name} is a pickle that needs code execution to load ({unsupported[:200]}) and is not a "
            "pickled module whose weights can be read without running code. This pack never runs pickled code. "
            "Convert it once, in a Python session you trust: `import torch; from safetensors.torch import "
            f"save_file; save_file(torch.load('{path.name}', weights_only=False), '{path.stem}.safetensors')` "
            "and choose the .safetensors file."
        ) from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a reward checkpoint: safetensors, a weights-only torch pickle, or the official
    MPS whole-module pickle (read without running its code)."""
    return safe_io.read_state_dict(path, "reward model checkpoint", hint=EXPECTED_FILES,
                                   read_pickle=_read_torch_pickle)


def _clean_mps(state_dict) -> dict:
    """Drop buffers older transformers saved (``position_ids``) and cached rotary tables."""
    return {k: v for k, v in state_dict.items()
            if not k.endswith("embeddings.position_ids") and not k.endswith(".pos_emb")}


@dataclass(frozen=True)
class RewardKind:
    """One kind of reward checkpoint: the keys that mark it, and its builder
    ``build(state_dict, variant, preprocess) -> RewardModel``."""

    name: str
    marker_keys: tuple[str, ...]
    build: Callable[[dict, str | None, str], RewardModel]


# In the order they are tried: the aesthetic predictor's vision tower and projection are PickScore
# keys too, so its MLP keys are tested first.
KINDS = (
    RewardKind("hps", HPS_MARKER_KEYS, lambda sd, variant, preprocess: build_hps(sd, preprocess)),
    RewardKind("mps", MPS_MARKER_KEYS, lambda sd, variant, preprocess: build_mps(_clean_mps(sd), variant, preprocess)),
    RewardKind("aesthetic", AESTHETIC_MARKER_KEYS, lambda sd, variant, preprocess: build_aesthetic(sd, preprocess)),
    RewardKind("pickscore", PICKSCORE_MARKER_KEYS, lambda sd, variant, preprocess: build_pickscore(sd, preprocess)),
)
REWARD_KINDS = tuple(kind.name for kind in KINDS)


def detect_kind(state_dict) -> str:
    """The kind's name (``REWARD_KINDS``) from the keys; UserFileError naming what was found otherwise."""
    return _kind_of(state_dict).name


def _kind_of(state_dict) -> RewardKind:
    for kind in KINDS:
        if has_keys(state_dict, kind.marker_keys):
            return kind
    if is_mlp_only(state_dict):
        raise UserFileError(
            "this is the LAION aesthetic predictor's MLP alone (" + describe_keys(state_dict) + "); it scores CLIP "
            "ViT-L/14 image embeddings, so it needs that encoder too. Join the two files once: "
            "`python -m tools.convert_aesthetic sac+logos+ava1-l14-linearMSE.pth "
            "clip-vit-large-patch14.safetensors laion_aesthetic_v2.safetensors` (the CLIP file: model.safetensors of "
            "openai/clip-vit-large-patch14) and choose the joined file.")
    hint = ""
    if any(k.startswith("vision_model.") or k.startswith("text_model.") for k in state_dict):
        hint = (" It looks like part of a transformers CLIP model (PickScore needs both towers, their projections "
                "and logit_scale; MPS also its cross_model.*): HPS must be the open_clip layout (visual.*, "
                "transformer.*).")
    elif any("diffusion" in k or k.startswith("blocks.") or "lora" in k for k in state_dict):
        hint = " It looks like a diffusion model or LoRA, which belongs in another model folder."
    raise UserFileError(
        "not an HPS v2.1 (open_clip CLIP: visual.conv1.weight, token_embedding.weight, text_projection) nor an "
        "MPS (model.vision_model.*, cross_model.layers.*), PickScore (transformers CLIPModel: text_model.*, "
        "vision_model.*, text_projection, visual_projection, logit_scale) or aesthetic predictor (vision_model.*, "
        "visual_projection, mlp.layers.*) state dict: found " + describe_keys(state_dict) + "." + hint
    )


def checkpoint_kind(path: str | os.PathLike) -> str:
    """The kind (``REWARD_KINDS``) from a checkpoint's keys, without reading its tensors where the
    format allows (a safetensors header; a zip checkpoint memory-mapped). UserFileError names the file."""
    index = safe_io.tensor_index(path, "reward model checkpoint", hint=EXPECTED_FILES,
                                 read_pickle=lambda p, kind: _read_torch_pickle(p, kind, mmap=True))
    try:
        return detect_kind(strip_prefixes(index.tensors))
    except UserFileError as exc:
        raise UserFileError(f"reward model checkpoint {Path(path)}: {exc}") from None


def _shape_error(path, kind, exc) -> UserFileError:
    return UserFileError(f"{Path(path).name} has {kind.upper()} key names but inconsistent shapes ({exc})")


def load_reward_model(path, device="cpu", dtype=torch.float32, variant: str | None = None,
                      preprocess: str = "reference", *, mps_variant_only: bool = False) -> RewardModel:
    """Load HPS v2.1, MPS, PickScore or the aesthetic predictor from ``path`` (detected from the
    keys), frozen, in eval mode.

    ``variant`` applies to MPS only: "official" (default) or "videox_fun"; for another file a
    non-official variant is an error unless ``mps_variant_only`` (a UI that always passes
    its MPS variant choice): then it is ignored. ``preprocess``: "reference" or "squash"
    (also selectable per ``score`` call).
    """
    state_dict = strip_prefixes(read_state_dict(path))
    try:
        kind = _kind_of(state_dict)
    except UserFileError as exc:
        raise UserFileError(f"{Path(path).name}: {exc}") from None
    if variant not in (None, "official") and kind.name != "mps" and not mps_variant_only:
        raise ValueError(f"variant {variant!r} applies to MPS only; {Path(path).name} is {kind.name}")
    try:
        model = kind.build(state_dict, variant, preprocess)
    except UserFileError as exc:
        raise UserFileError(f"{Path(path).name}: {exc}") from None
    except (KeyError, RuntimeError, ValueError) as exc:
        raise _shape_error(path, kind.name, exc) from exc
    model.source_path = str(path)
    return model.to(device=device, dtype=dtype)
