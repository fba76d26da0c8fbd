"""Everything that runs without ComfyUI: LoRA formats, reward models, sampler, trainer.

Modules here use relative imports only, so the package works both as ``training``
(tests, the trainer subprocess) and inside ComfyUI as a sub-package of the pack.
Never import ComfyUI from here.
"""
