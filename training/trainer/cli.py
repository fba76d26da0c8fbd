"""Command line entry of the trainer: ``--config run.yaml [--check-only]``.

Exit codes and the progress stream are defined in ``progress.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

from .config import ConfigError, load_config
from .recipes import recipe_overrides
from .progress import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_PREFLIGHT, Progress, warn


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_reward_lora", description="Train a Wan2.2 reward LoRA.")
    parser.add_argument("--config", required=True, help="run config YAML (fields: docs/training-config.md)")
    parser.add_argument("--check-only", action="store_true",
                        help="validate the config and the environment, load nothing, exit")
    args = parser.parse_args(argv)
    progress = Progress(None, main_process=_is_main_process())
    try:
        with warnings.catch_warnings(record=True) as deprecated:
            warnings.simplefilter("always", DeprecationWarning)
            cfg = load_config(args.config)
    except ConfigError as exc:
        progress.emit("error", kind="config", field=exc.field, message=str(exc))
        return EXIT_CONFIG
    # until training starts, events go to stdout only: a refused run writes nothing into its folder
    from .preflight import PreflightError, check_environment, unchecked_decision

    try:
        decision = check_environment(cfg) if cfg.preflight else unchecked_decision(cfg)
    except PreflightError as exc:
        progress.emit("error", kind="preflight", field=None, message=str(exc))
        return EXIT_PREFLIGHT
    if cfg.expert == "both":
        progress.emit("error", kind="config", field="expert", message=(
            "config field 'expert': both is two runs, the high-noise LoRA then the low-noise one: the Reward LoRA "
            "Train node runs them in turn; from a shell, write their configs with `python -m "
            f"training.trainer.phases --config {args.config}` and launch the two in order"))
        return EXIT_CONFIG
    for warning in deprecated:
        progress.emit("warning", step=None, message=str(warning.message))
    if args.check_only:  # the resolved config, the memory mode, and every mode's estimate
        from .memory_estimate import run_size
        from .placement import check_only_table
        from .preflight import deepspeed_shape

        progress.emit("checked", config_hash=cfg.config_hash(), config=cfg.to_dict(),
                      overrides={k: {"recipe": a, "run": b} for k, (a, b) in recipe_overrides(cfg).items()},
                      memory_mode=decision.mode, memory_reason=decision.reason,
                      memory=check_only_table(run_size(cfg), deepspeed_shape()))
        return EXIT_OK
    progress = Progress(cfg.output_dir, main_process=_is_main_process())
    try:
        from .distributed import end_process_group
        from .recipe import train

        code = train(cfg, progress, decision=decision)  # returns with every rank past the last collective
        end_process_group()
        return code
    except ConfigError as exc:  # late checks that need the files (prompts vs embeddings, ...)
        progress.emit("error", kind="config", field=exc.field, message=str(exc))
        return EXIT_CONFIG
    except Exception as exc:  # report, then a non-zero exit; the traceback goes to stderr
        warn(traceback.format_exc().rstrip())
        progress.emit("error", kind="runtime", field=None, message=f"{type(exc).__name__}: {exc}")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
