"""Trainer entry script, launched by path:

    accelerate launch --config_file training/configs/accelerate_zero3_offload.yaml \
        training/train_reward_lora.py --config run.yaml

Works whatever the pack's folder is called (e.g. ``ComfyUI-wan-reward-lora``, not a
Python identifier): it puts the pack root on sys.path and imports ``training``.
"""

import os
import sys

_PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _PACK_ROOT not in sys.path:
    sys.path.insert(0, _PACK_ROOT)

from training.trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
