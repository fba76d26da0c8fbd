"""Progress stream, exit codes and run control (stop / save-now / sample-now).

Progress: one JSON object per line on stdout, written by the main process only, each
starting with ``{"event": "<name>"`` (other libraries may print other lines: skip lines that
do not parse as JSON objects with an "event" key). Every event is also appended to
``<output_dir>/metrics.jsonl``. The events and their fields are declared once, in ``EVENTS``
below: ``Progress.emit`` refuses an undeclared event or field, the node forwards them, the web
extension reads ``web/progress_events.js`` and the reference ``docs/progress-protocol.md`` is
generated from them (``python -m training.trainer.progress --markdown`` / ``--js``; tests
keep both files equal to it).

Control: create an empty file named ``STOP``, ``SAVE_NOW`` or ``SAMPLE_NOW`` in the output
folder. The trainer checks between steps, deletes the file and acts: STOP saves a
checkpoint and the LoRA, then exits with code 0 and ``finished`` reason "stopped";
SAVE_NOW saves both and continues; SAMPLE_NOW writes the next step's frames. SIGTERM and
SIGINT act like STOP (a second signal aborts at once), and so does the death of the ComfyUI
that started the trainer (``WAN_REWARD_PARENT_PID``): the events then go to metrics.jsonl
only, and a trainer that has not stopped ``WAN_REWARD_ORPHAN_GRACE_S`` (900) seconds later
exits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

# exit codes
EXIT_OK = 0  # completed, or stopped on request / by the gaming guard after saving
EXIT_ERROR = 1  # unexpected failure (an "error" event says what)
EXIT_CONFIG = 2  # the config is invalid (error.kind "config", error.field names the field)
EXIT_PREFLIGHT = 3  # the machine cannot run this preset (error.kind "preflight")

STOP_FILE = "STOP"
SAVE_NOW_FILE = "SAVE_NOW"
SAMPLE_NOW_FILE = "SAMPLE_NOW"
METRICS_FILE = "metrics.jsonl"


CHECKPOINT_REASONS = ("periodic", "stop", "save_now", "final", "gaming_guard", "fault")
FINISH_REASONS = ("completed", "stopped", "gaming_guard")

# event -> {field: meaning}; every event also has "event" and "time" (a Unix timestamp)
EVENTS: dict[str, dict[str, str]] = {
    "started": {
        "step": "first step to run (> 0 on resume)", "max_steps": "optimizer steps in all",
        "expert": "high or low", "world_size": "processes", "output_dir": "the run folder",
        "lora_path": "the LoRA file the run writes", "config_hash": "hash of the settings that shape the LoRA",
        "resumed_from": "checkpoint folder, or null", "replaced_checkpoints": "where resume: false moved an earlier "
        "run's checkpoints, or null", "adapted_modules": "LoRA modules", "deepspeed": "bool",
        "gradient_clipping": "the clipping really applied (0 = none)", "memory_at_start_mb": "GPU allocated or host "
        "resident memory after loading", "recipe": "the recipe the config started from, or null",
        "batch_size": "prompts per process per micro-step", "gradient_accumulation_steps": "micro-steps per step",
        "effective_batch": "batch x accumulation x processes", "lora_rank": "rank", "lora_alpha": "alpha",
        "init_lora": "the LoRA the run started from, or null", "start_images": "number of start images (0: T2V-style "
        "zero conditioning)", "memory_mode": "fast, sharded or low (docs/memory.md)", "memory_reason": "why this mode "
        "(auto: the estimates of the faster modes)", "frozen_local_fraction": "the share of the frozen expert this "
        "process holds (1.0 unless sharded)", "zero_stage": "DeepSpeed ZeRO stage (DeepSpeed only)",
        "offload_param_device": "cpu, nvme or none (DeepSpeed only)", "offload_optimizer_device": "cpu, nvme or none "
        "(DeepSpeed only)", "lora_params_partitioned": "bool (DeepSpeed only)"},
    "step": {
        "step": "completed optimizer steps (1-based)", "max_steps": "optimizer steps in all", "loss": "mean loss",
        "reward": "weighted mean of the training rewards", "rewards": "{reward: mean}", "motion_term": "the motion "
        "hinge's mean (with motion_weight > 0)", "lr": "learning rate", "grad_norm": "before clipping, or null",
        "seconds": "this step", "peak_memory_mb": "GPU: peak allocated this step; CPU: peak resident set",
        "eta_seconds": "estimated time left"},
    "checkpoint": {"step": "the step saved", "path": "checkpoint folder", "lora_path": "the LoRA written",
                   "reason": " | ".join(CHECKPOINT_REASONS)},
    "validation": {
        "step": "0 = the base model", "rewards": "{training reward: mean over the validation prompts}",
        "held_out": "{held-out reward: mean}", "motion": "motion score of the full clip, or null",
        "best": "this step's LoRA is the new best", "best_lora_path": "the best LoRA, or null while the base model "
        "scores best", "criterion": "what best is measured by", "criterion_value": "its value now",
        "best_score": "the best value so far", "best_step": "the step of the best (0 = the base model)"},
    "sample": {"step": "the step", "paths": "PNG files of the decoded training frames"},
    "warning": {"step": "the step, or null", "message": "what to look at (e.g. reward gaming suspected)"},
    "finished": {"step": "the last step", "reason": " | ".join(FINISH_REASONS), "lora_path": "the LoRA",
                 "best_lora_path": "the best validation LoRA, or null", "average_lora_path": "the checkpoint average, "
                 "or null"},
    "error": {"kind": "config | preflight | runtime", "field": "the config field, or null", "message": "what failed "
              "and what to do", "step": "a fault in a step: the last good step (saved first)"},
    "checked": {"config_hash": "hash of the settings", "config": "the resolved config (the recipe's values with the "
                "run's on top)", "overrides": "{field: {recipe, run}} the run sets on top of its recipe",
                "memory_mode": "the mode the run would use here", "memory_reason": "why",
                "memory": "estimated peak GPU and host memory of each mode for 1, 2 and 8 GPUs, and the mode auto "
                "picks for 24, 32, 48 and 80 GB GPUs"},
}
# Events the ComfyUI node itself sends on the websocket, besides the trainer's.
NODE_EVENTS: dict[str, dict[str, str]] = {
    "plan": {"text": "recipe, effective batch, what the inputs set on top of the recipe, warnings",
             "phase": "high or low (expert: both), or null"},
    "cancelled": {"message": "what happened and how to continue"},
}


def check_event(event: str, fields) -> None:
    """Refuse an event or a field ``EVENTS`` does not declare (a programming error, caught by tests)."""
    declared = EVENTS.get(event)
    if declared is None:
        raise ValueError(f"undeclared progress event {event!r} (declare it in progress.EVENTS)")
    unknown = set(fields) - set(declared)
    if unknown:
        raise ValueError(f"progress event {event!r}: undeclared field(s) {sorted(unknown)} (declare them in EVENTS)")


class Progress:
    """Writes events to stdout and metrics.jsonl (main process only)."""

    def __init__(self, output_dir: str | os.PathLike | None, main_process: bool = True, stream=None):
        self.main = main_process
        self.stream = stream or sys.stdout
        self.metrics = Path(output_dir) / METRICS_FILE if output_dir else None

    def emit(self, event: str, **fields) -> dict:
        check_event(event, fields)
        record = {"event": event, "time": round(time.time(), 3), **fields}
        if not self.main:
            return record
        line = json.dumps(record, default=_jsonable)
        try:
            print(line, file=self.stream, flush=True)
        except (BrokenPipeError, ValueError):  # the reader (a killed ComfyUI) is gone: metrics.jsonl goes on
            discard_broken_stream(self.stream)
        if self.metrics is not None:
            try:
                self.metrics.parent.mkdir(parents=True, exist_ok=True)
                with open(self.metrics, "a", encoding="utf-8") as handle:
                    handle.write(line + "\n")
            except OSError as exc:  # a full disk: the events still reach stdout (and the node)
                warn(f"warning: {self.metrics} could not be written ({exc}); no more metrics are logged there")
                self.metrics = None
        return record


def discard_broken_stream(stream) -> None:
    """After EPIPE on stdout/stderr (the process reading it died): point its file descriptor at the
    null device, so later writes (the exit's flush included) go nowhere instead of failing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (a test's StringIO)
        pass


def warn(message: str) -> None:
    """A line on stderr that cannot fail the run."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError):
        discard_broken_stream(sys.stderr)


def _jsonable(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def parse_event(line: str) -> dict | None:
    """A progress event from one stdout line, or None for any other output (the one parser:
    the launcher reads the stream line by line with it)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "event" in record else None


def parse_events(text: str) -> list[dict]:
    """The progress events in a stdout capture."""
    return [e for e in map(parse_event, text.splitlines()) if e is not None]


PARENT_PID_ENV = "WAN_REWARD_PARENT_PID"
ORPHAN_GRACE_ENV = "WAN_REWARD_ORPHAN_GRACE_S"
ORPHAN_GRACE_S = 900.0  # time for a trainer whose ComfyUI died to finish its step and save
TRAINER_TAG = "wan-reward-lora reward backprop"  # the "trainer" metadata of every LoRA we write
# A stop sends SIGTERM from both the launcher and torch's agent: signals this close count as one.
SIGNAL_REPEAT_WINDOW_S = 2.0


def parent_gone() -> bool:
    """True when the process named in WAN_REWARD_PARENT_PID (the ComfyUI that launched us) has exited."""
    value = os.environ.get(PARENT_PID_ENV)
    if not value:
        return False
    try:
        os.kill(int(value), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


_parent_watched = False


class Control:
    """Stop / save-now / sample-now requests from flag files, SIGTERM/SIGINT and a vanished parent."""

    def __init__(self, output_dir: str | os.PathLike, read_files: bool = True):
        self.dir = Path(output_dir)
        self.read_files = read_files  # rank 0 only: the flags are consumed once, then shared
        self.signalled = False
        self.signalled_at = 0.0

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            now = time.monotonic()
            if self.signalled and now - self.signalled_at > SIGNAL_REPEAT_WINDOW_S:
                raise KeyboardInterrupt  # a second, separate signal: give up at once
            if not self.signalled:
                self.signalled, self.signalled_at = True, now

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)
        self._watch_parent()

    def _watch_parent(self) -> None:
        """Once ComfyUI (``WAN_REWARD_PARENT_PID``) is gone, the run saves and stops at the end of its
        step (``poll``); a trainer still running ORPHAN_GRACE_S later (hung) ends itself, so no
        orphan holds the GPUs for ever. Every rank watches."""
        global _parent_watched
        if not os.environ.get(PARENT_PID_ENV) or _parent_watched:
            return
        _parent_watched = True  # once per process (train() may run several times in one)
        grace = float(os.environ.get(ORPHAN_GRACE_ENV) or ORPHAN_GRACE_S)

        def watch() -> None:
            while not parent_gone():
                time.sleep(1.0)
            time.sleep(grace)
            warn(f"the ComfyUI that started this trainer is gone and the run did not stop within {grace:g} s: "
                 "exiting without saving")
            os._exit(EXIT_ERROR)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()

    def clear_stale(self) -> None:
        """Remove flags left from an earlier run (a STOP would end the new run at once)."""
        for name in (STOP_FILE, SAVE_NOW_FILE, SAMPLE_NOW_FILE):
            (self.dir / name).unlink(missing_ok=True)

    def poll(self) -> dict[str, bool]:
        """Requests seen since the last poll; flag files are consumed."""
        requests = {"stop": self.signalled, "save_now": False, "sample_now": False}
        if not self.read_files:
            return requests
        if parent_gone():  # ComfyUI was killed: save and stop rather than train on as an orphan
            requests["stop"] = True
        for key, name in (("stop", STOP_FILE), ("save_now", SAVE_NOW_FILE), ("sample_now", SAMPLE_NOW_FILE)):
            path = self.dir / name
            if path.exists():
                requests[key] = True
                path.unlink(missing_ok=True)
        return requests


def markdown_reference() -> str:
    """docs/progress-protocol.md from EVENTS."""
    lines = ["# Progress protocol", "",
             "Generated from `training/trainer/progress.py` (`python -m training.trainer.progress --markdown`); a test "
             "keeps this file equal to it.", "",
             "The trainer writes one JSON object per line on stdout (main process only) and appends each to "
             "`<output_dir>/metrics.jsonl`. Skip lines that are not JSON objects with an `event` key. Every event "
             "has `event` and `time` (Unix seconds).", "",
             "Exit codes: 0 completed or stopped on request, 1 runtime error (a fault in a step stops every "
             "process together after saving the last good step), 2 invalid config, 3 refused by the preflight check.",
             "", "| event | field | meaning |", "|---|---|---|"]
    for event, fields in EVENTS.items():
        for i, (name, meaning) in enumerate(fields.items()):
            lines.append(f"| {'`' + event + '`' if i == 0 else ''} | `{name}` | {meaning} |")
    lines += ["", "Sent by the ComfyUI node on its websocket event `wan_reward.train`, besides the trainer's events "
              "(each also carries `node` and `prompt_id`):", "", "| event | field | meaning |", "|---|---|---|"]
    for event, fields in NODE_EVENTS.items():
        for i, (name, meaning) in enumerate(fields.items()):
            lines.append(f"| {'`' + event + '`' if i == 0 else ''} | `{name}` | {meaning} |")
    return "\n".join(lines) + "\n"


def javascript_module() -> str:
    """web/progress_events.js: the events and fields the web extension receives."""
    names = {event: sorted(fields) for event, fields in {**EVENTS, **NODE_EVENTS}.items()}
    return ("// Generated from training/trainer/progress.py (python -m training.trainer.progress --js); a test keeps\n"
            "// this file equal to it. The progress events the node forwards, with their fields.\n"
            f"export const EVENT_FIELDS = {json.dumps(names, indent=2)};\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        sys.stdout.write(markdown_reference())
    elif sys.argv[1:] == ["--js"]:
        sys.stdout.write(javascript_module())
    else:
        sys.exit("usage: python -m training.trainer.progress --markdown | --js")
