"""Reward models under ComfyUI's memory management.

A reward model that scores on a GPU is wrapped in a ``ModelPatcher`` (load device: the chosen
GPU; offload device: ComfyUI's ``unet_offload_device()``, the CPU unless ``--highvram``) and
loaded through ``comfy.model_management.load_models_gpu`` before each scoring call, as ComfyUI
loads its own models: it stays on the GPU between calls while memory allows, ComfyUI unloads
it when another model needs the room, and ``--highvram`` keeps it there. It is always loaded
whole (``force_full_load``): its layers are plain torch modules, not ComfyUI's cast-on-the-fly
ops, so ``--lowvram``'s partial loading cannot split it; where ComfyUI still leaves part of it
on the CPU (``--novram``), it is moved to the GPU for the call and back after, as before.
On the CPU nothing is moved or registered.
"""

from __future__ import annotations

import contextlib

import torch

# headroom for one scoring batch of ViT-H activations
ACTIVATION_BYTES = 1 << 30


class RewardModelHolder(torch.nn.Module):
    """What the ModelPatcher manages: the reward model as a submodule, and the plain ``device``
    attribute ComfyUI sets on its models (``RewardModel.device`` is a read-only property)."""

    def __init__(self, reward):
        super().__init__()
        self.reward = reward
        self.device = reward.device


def patcher_of(model, load_device: torch.device):
    """The model's ModelPatcher for ``load_device`` (made once, kept on the model)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    patcher = getattr(model, "_comfy_patcher", None)
    if patcher is None or patcher.load_device != load_device:
        patcher = comfy.model_patcher.ModelPatcher(RewardModelHolder(model), load_device=load_device,
                                                   offload_device=mm.unet_offload_device())
        object.__setattr__(model, "_comfy_patcher", patcher)  # a plain attribute, not a submodule
    return patcher


def target_device(model) -> torch.device:
    return torch.device(getattr(model, "target_device", model.device))


@contextlib.contextmanager
def on_scoring_device(model):
    """Yield ``model`` on its ``target_device``, loaded as ComfyUI loads its models (see above)."""
    target = target_device(model)
    if target.type == "cpu":
        yield model
        return
    import comfy.model_management as mm

    mm.load_models_gpu([patcher_of(model, target)], memory_required=ACTIVATION_BYTES, force_full_load=True)
    if all(p.device == target for p in model.parameters()):
        yield model
        return
    try:  # partly left on the offload device (--novram): the whole model for this call only
        yield model.to(target)
    finally:
        model.to(mm.unet_offload_device())
        mm.soft_empty_cache()
