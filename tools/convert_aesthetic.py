"""Join the LAION aesthetic predictor's MLP and its CLIP ViT-L/14 image encoder into the one file
Load Reward Model reads (``join_aesthetic`` in training/rewards/aesthetic.py).

    python -m tools.convert_aesthetic sac+logos+ava1-l14-linearMSE.pth \\
        clip-vit-large-patch14.safetensors laion_aesthetic_v2.safetensors          # from the pack folder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.rewards.aesthetic import join_aesthetic
from training.rewards.registry import read_state_dict
from training.safe_io import UserFileError, save_safetensors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mlp", help="sac+logos+ava1-l14-linearMSE.pth (the predictor's MLP)")
    parser.add_argument("clip", help="the CLIP ViT-L/14 file in the transformers layout (.safetensors or .bin)")
    parser.add_argument("target", help="output .safetensors")
    args = parser.parse_args(argv)
    if not args.target.endswith(".safetensors"):
        parser.error("target must end in .safetensors")
    try:
        joined = join_aesthetic(read_state_dict(args.mlp), read_state_dict(args.clip))
    except UserFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_safetensors(joined, args.target, metadata={"kind": "laion_aesthetic_v2", "mlp": Path(args.mlp).name,
                                                   "encoder": Path(args.clip).name})
    print(f"wrote {args.target}: {len(joined)} tensors (aesthetic predictor: CLIP vision tower + MLP)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
