"""Convert the official ``MPS_overall_checkpoint.pth`` (a whole pickled module) into a safetensors
state dict, without running any code from the file (training/rewards/pickled_module.py).

    python -m tools.convert_mps MPS_overall_checkpoint.pth MPS_overall.safetensors   # from the pack folder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.rewards.pickled_module import read_pickled_module
from training.rewards.registry import detect_kind
from training.safe_io import UserFileError, save_safetensors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="MPS_overall_checkpoint.pth (the official whole-module pickle)")
    parser.add_argument("target", help="output .safetensors (state dict: model.*, cross_model.*)")
    args = parser.parse_args(argv)
    if not args.target.endswith(".safetensors"):
        parser.error("target must end in .safetensors")
    try:
        state_dict, facts = read_pickled_module(args.source)
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}
        kind = detect_kind(state_dict)
    except UserFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_safetensors(state_dict, args.target, metadata={"converted_from": Path(args.source).name, **{
        k: str(v) for k, v in facts.items()}})
    print(f"wrote {args.target}: {kind}, {len(state_dict)} tensors, {facts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
