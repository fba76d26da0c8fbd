"""Wan Reward LoRA: ComfyUI nodes for Wan2.2 A14B reward LoRAs.

ComfyUI imports this file. It only exposes the V3 entrypoint and the web folder;
everything that does work lives in ``training/`` (no ComfyUI import) and the thin
adapters in ``nodes/``. Do not add NODE_CLASS_MAPPINGS here: ComfyUI would then
ignore ``comfy_entrypoint``.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import WanRewardExtension, register_model_folders

    register_model_folders()
    return WanRewardExtension()
