"""What to tell the user when a run cannot start or fails: ``LaunchError`` (the run cannot start:
a bad GPU choice, a busy GPU, a missing preset) and one message for a failed run, with hints."""

from __future__ import annotations

from .progress import EXIT_CONFIG, EXIT_PREFLIGHT


class LaunchError(RuntimeError):
    """The run cannot start (bad GPU choice, preset file missing, GPUs busy); the message says why."""


_OOM_MARKERS = ("out of memory", "outofmemoryerror", "cuda error: out of memory", "cannot allocate memory",
                "memoryerror")


def failure_message(result, visible_gpus: int | None = None) -> str:
    """One message for a failed run: what failed, a hint, and the last lines of the log."""
    error = result.error or {}
    message = error.get("message") or f"the trainer exited with code {result.returncode}"
    text = (message + "\n" + result.log_tail).lower()
    hints = []
    if any(marker in text for marker in _OOM_MARKERS):
        hints.append("out of memory: the message above names the memory mode that ran and the one that would "
                     "fit (set the memory input to it); or fewer frames, a lower resolution, a smaller backprop "
                     "window, or more GPUs")
    if ("gpu(s) visible" in text or "no gpu is visible" in text or "too few gpu" in text
            or "invalid device ordinal" in text):
        seen = f"{visible_gpus} GPU(s) are visible to ComfyUI" if visible_gpus is not None else "check the GPU count"
        hints.append(f"too few GPUs: {seen}; lower the gpus setting or expose more GPUs (CUDA_VISIBLE_DEVICES)")
    if result.returncode == EXIT_CONFIG or error.get("kind") == "config":
        hints.append("a setting is invalid: fix the field named above")
    elif result.returncode == EXIT_PREFLIGHT or error.get("kind") == "preflight":
        hints.append("the machine cannot run this preset as set up (see above)")
    parts = [f"Reward LoRA training failed: {message}"]
    parts += [f"Hint: {h}" for h in hints]
    if result.log_tail:
        parts.append("Last lines of the trainer log:\n" + result.log_tail)
    return "\n".join(parts)
