"""Progress stream, exit codes and run control (stop / save-now / sample-now).

Progress: one JSON object per line on stdout, written by the main process only, each
starting with ``{"event": "<name>"`` (other libraries may print other lines: skip
lines that do not parse as JSON objects with an "event" key). Every event is also
appended to ``<output_dir>/metrics.jsonl``. Events and fields (all have ``event`` and
``time``, a Unix timestamp):

  started     step (first step to run, > 0 on resume), max_steps, expert, world_size,
              output_dir, lora_path, config_hash, resumed_from (checkpoint dir or null),
              deepspeed (bool), gradient_clipping, memory_at_start_mb, adapted_modules,
              replaced_checkpoints (where resume: false moved an earlier run's checkpoints, or
              null); with DeepSpeed also zero_stage, offload_param_device and
              offload_optimizer_device ("cpu", "nvme" or "none"), lora_params_partitioned
  step        step (1-based, completed optimizer steps), max_steps, loss, reward (weighted
              mean of the training rewards), rewards {name: mean}, lr, grad_norm (before
              clipping, null if unknown), seconds (this step), peak_memory_mb (GPU: peak
              allocated this step; CPU: the process's peak resident set), eta_seconds
  checkpoint  step, path (checkpoint folder), lora_path, reason (periodic|stop|save_now|final|
              gaming_guard|fault)
  validation  step, rewards {name: mean over validation prompts}, held_out {name: mean},
              motion, best (bool: this step's LoRA is the new best), best_lora_path (null
              while the base model scores best), criterion (what "best" is measured by: the
              held-out rewards' mean, or the training rewards' when none is held out),
              criterion_value, best_score, best_step (0 = the base model)
  sample      step, paths (PNG files of the decoded training frames)
  warning     step, message (e.g. reward gaming suspected)
  finished    step, reason (completed|stopped|gaming_guard), lora_path, best_lora_path
              (or null), average_lora_path (or null)
  error       message, kind (config|preflight|runtime), field (config field or null); a fault in a
              training step (every rank stops together) also step: the last good step, saved first
  checked     config_hash (only with --check-only: config and machine are fine, nothing loaded)

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


class Progress:
    """Writes events to stdout and metrics.jsonl (main process only)."""

    def __init__(self, output_dir: str | os.PathLike | None, main_process: bool = True, stream=None):
        self.main = main_process
        self.stream = stream or sys.stdout
        self.metrics = Path(output_dir) / METRICS_FILE if output_dir else None

    def emit(self, event: str, **fields) -> dict:
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
