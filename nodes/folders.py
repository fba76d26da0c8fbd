"""The model folders this pack adds to ComfyUI's ``folder_paths``."""

import os

import folder_paths

from ..training.rewards.registry import REWARD_EXTENSIONS

REWARD_MODELS = "reward_models"


def register_model_folders() -> None:
    """Register ``models/reward_models`` listing only the files the reward loader reads.

    extra_model_paths.yaml is read before custom nodes load and may already have
    created the key (with an empty extension set, which lists every file); keep its
    paths, add ours, and restrict the extensions.
    """
    default = os.path.join(folder_paths.models_dir, REWARD_MODELS)
    paths, _ = folder_paths.folder_names_and_paths.get(REWARD_MODELS, ([], set()))
    paths = list(paths)
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[REWARD_MODELS] = (paths, set(REWARD_EXTENSIONS))
