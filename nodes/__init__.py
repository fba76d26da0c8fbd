"""ComfyUI adapters of the pack (V3 schema API). No math lives here."""

from comfy_api.latest import ComfyExtension, io

from .folders import register_model_folders

# One module per capability; each exports NODES, a list of io.ComfyNode classes.
from . import lora_loader, reward_nodes, train_node, train_options

_NODE_MODULES = (lora_loader, reward_nodes, train_node, train_options)


class WanRewardExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node for module in _NODE_MODULES for node in module.NODES]


__all__ = ["WanRewardExtension", "register_model_folders"]
