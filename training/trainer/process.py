"""A trainer subprocess: start it in its own session, read its progress events, stop it (and every
process of its tree), and follow it to its end for a caller (``follow``).

Stop sequence (``TrainerProcess.stop``): create ``<output_dir>/STOP`` (the trainer saves a
checkpoint and the LoRA, then exits 0), after ``grace_s`` SIGTERM to every process of the
launcher's tree, after ``kill_s`` more SIGKILL to them. The tree is collected with psutil, not
by process group: torch's elastic agent starts each rank in a session of its own, so a
``killpg`` on the launcher's group would never reach the ranks.

If the caller dies (ComfyUI killed), nothing signals the launcher: the trainer finds the
caller's pid in ``WAN_REWARD_PARENT_PID`` gone, saves a checkpoint at the end of its step and
exits (its events then reach metrics.jsonl only), and the launcher ends with it. A parent-death
SIGTERM to the launcher, used before, lost the steps since the last checkpoint: accelerate's
launcher (1.16) passes it on and SIGKILLs its child 5 s later, and the trainer's next event met
the dead pipe. A trainer that has not stopped after ``WAN_REWARD_ORPHAN_GRACE_S`` ends itself
(progress.py).
"""

from __future__ import annotations

import atexit
import collections
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .launcher import PACK_ROOT
from .progress import STOP_FILE, parse_event

LOG_FILE = "train.log"


@dataclass
class RunResult:
    returncode: int
    events: list[dict] = field(default_factory=list)
    log_tail: str = ""
    stopped: bool = False

    @property
    def finished(self) -> dict | None:
        return next((e for e in reversed(self.events) if e.get("event") == "finished"), None)

    @property
    def error(self) -> dict | None:
        return next((e for e in reversed(self.events) if e.get("event") == "error"), None)


class TrainerProcess:
    """A trainer subprocess in its own session; stdout+stderr go to ``<output_dir>/train.log``
    and a reader thread turns progress lines into events (``next_event``). Its process tree
    (launcher, agent, ranks, their helpers) is tracked so that ``stop`` leaves none behind."""

    def __init__(self, command: list[str], env: dict[str, str], output_dir: str | os.PathLike,
                 tail_lines: int = 60, cwd: str | os.PathLike | None = None):
        self.command = command
        self.env = env
        self.output_dir = Path(output_dir)
        self.cwd = str(cwd or PACK_ROOT)
        self.events: list[dict] = []
        self._queue: "queue.Queue[dict]" = queue.Queue()
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._tree: dict[int, psutil.Process] = {}  # every process of the run seen so far
        self._collected = 0.0
        self.stop_requested = False

    @property
    def log_path(self) -> Path:
        return self.output_dir / LOG_FILE

    def start(self) -> "TrainerProcess":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / STOP_FILE).unlink(missing_ok=True)
        self.process = subprocess.Popen(
            self.command, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, text=True, encoding="utf-8", errors="replace",
            bufsize=1,
        )
        try:
            self._tree[self.process.pid] = psutil.Process(self.process.pid)
        except psutil.NoSuchProcess:
            pass
        self._reader = threading.Thread(target=self._read, name="trainer-stdout", daemon=True)
        self._reader.start()
        _RUNNING.add(self)
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None  # noqa: S101 (for type checkers)
        try:
            log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed below or on a write error)
        except OSError as exc:
            log = self._log_failed(exc, None)
        for line in self.process.stdout:
            if log is not None:
                try:
                    log.write(line)
                    log.flush()
                except OSError as exc:  # a full disk: keep reading, or the trainer blocks on a full pipe
                    log = self._log_failed(exc, log)
            event = parse_event(line)
            if event is not None:
                self.events.append(event)
                self._queue.put(event)
            elif line.strip():
                self._tail.append(line.rstrip("\n"))
        if log is not None:
            _close_quietly(log)

    def _log_failed(self, exc: OSError, log) -> None:
        self._tail.append(f"[{self.log_path} could not be written ({exc}); the log stops here]")
        if log is not None:
            _close_quietly(log)

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def next_event(self, timeout: float) -> dict | None:
        if time.monotonic() - self._collected > 1.0:
            self.collect_tree()  # follow the tree while it runs: ranks outlive a dead agent re-parented
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> list[dict]:
        """The events read but not yet taken by ``next_event`` (after ``wait``: all that are left)."""
        events = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                return events

    def log_tail(self, lines: int = 30) -> str:
        """The last output lines, without the launcher's own traceback (accelerate/torchrun report a
        failed rank with a long traceback of their own that would hide the trainer's)."""
        return "\n".join(strip_launcher_traceback(list(self._tail))[-lines:])

    def collect_tree(self) -> list[psutil.Process]:
        """Add the launcher's descendants (and those of every process already seen, which may have
        been re-parented after their parent exited) to the tracked tree; returns the live ones."""
        if self.process is None:
            return []
        self._collected = time.monotonic()
        for proc in list(self._tree.values()):
            try:
                for child in proc.children(recursive=True):
                    self._tree.setdefault(child.pid, child)
            except psutil.Error:
                continue
        live = [proc for proc in self._tree.values() if alive(proc)]
        self._tree = {proc.pid: proc for proc in live}
        return live

    def tree_alive(self) -> bool:
        """Whether any process of the run's psutil-collected tree still exists (zombies excluded)."""
        return bool(self.collect_tree())

    def _signal_tree(self, sig: int, skip: set[int] | None = None) -> None:
        """Send ``sig`` to every live process of the tree not in ``skip`` (then added to it)."""
        for proc in self.collect_tree():
            if skip is not None:
                if proc.pid in skip:
                    continue
                skip.add(proc.pid)
            try:
                proc.send_signal(sig)  # psutil checks the pid was not reused
            except psutil.Error:
                pass

    def stop(self, grace_s: float = 60.0, kill_s: float = 10.0) -> int:
        """STOP file, then SIGTERM to the whole tree after ``grace_s``, then SIGKILL after ``kill_s``
        (children are collected again each round, so late-spawned ranks are caught). Returns the
        exit code; on return no process of the tree is left."""
        if self.process is None:
            return 0
        self.stop_requested = True
        self.collect_tree()
        if self.process.poll() is None:
            try:
                (self.output_dir / STOP_FILE).touch()
            except OSError:
                pass
        for sig, wait_s in ((None, grace_s), (signal.SIGTERM, kill_s), (signal.SIGKILL, 5.0)):
            signalled: set[int] = set()
            deadline = time.monotonic() + wait_s
            while self.tree_alive():
                if sig is not None:  # each process once; collected again each round: late ranks too
                    self._signal_tree(sig, skip=signalled)
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
            else:
                break
        return self.wait(timeout=5.0)

    def wait(self, timeout: float | None = None) -> int:
        assert self.process is not None  # noqa: S101 (for type checkers)
        code = self.process.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout=5.0)
        if not self.tree_alive():
            _RUNNING.discard(self)
        return code

    def result(self) -> RunResult:
        code = self.poll()
        return RunResult(returncode=-1 if code is None else code, events=list(self.events),
                         log_tail=self.log_tail(), stopped=self.stop_requested)


_LAUNCHER_FRAMES = ("accelerate/commands/", "torch/distributed/run.py", "torch/distributed/launcher/",
                    "torch/distributed/elastic/")


def strip_launcher_traceback(lines: list[str]) -> list[str]:
    """Cut the log at the first traceback that runs through accelerate's or torchrun's launcher."""
    for i, line in enumerate(lines):
        if not line.startswith("Traceback"):
            continue
        frames = []
        for follow in lines[i + 1:]:
            if not follow.startswith(" "):
                break
            frames.append(follow)
        if any(f in "\n".join(frames) for f in _LAUNCHER_FRAMES):
            return lines[:i] if i else lines
    return lines


_RUNNING: "set[TrainerProcess]" = set()


@atexit.register
def _stop_running_trainers() -> None:
    """The caller exits (ComfyUI shut down): no trainer may outlive it holding the GPUs."""
    for run in list(_RUNNING):
        if run.process is not None:
            run._signal_tree(signal.SIGTERM)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and any(run.tree_alive() for run in _RUNNING):
        time.sleep(0.1)
    for run in list(_RUNNING):
        deadline = time.monotonic() + 5.0
        while run.tree_alive() and time.monotonic() < deadline:
            run._signal_tree(signal.SIGKILL)
            time.sleep(0.1)


def _close_quietly(handle) -> None:
    try:
        handle.close()
    except OSError:  # flushing into a full disk
        pass


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---- following a run to its end ----------------------------------------------------------------

STOP_GRACE_S = 300.0  # after a stop request: time for the trainer to finish its step and save before SIGTERM
TERM_GRACE_S = 20.0  # after SIGTERM: time before SIGKILL


class RunInterrupted(Exception):
    """The caller asked the run to stop; it was stopped (saving first once it had started)."""

    def __init__(self, returncode: int):
        super().__init__(f"stopped (exit code {returncode})")
        self.returncode = returncode


def follow(process: TrainerProcess, on_event: Callable[[dict], None], interrupted: Callable[[], bool],
           poll_s: float = 0.5, stop_grace_s: float = STOP_GRACE_S, kill_s: float = TERM_GRACE_S) -> RunResult:
    """Every event of ``process`` in order to ``on_event`` until it exits; when ``interrupted()``
    turns true, stop it (the STOP file, then signals; no grace while it is still loading models:
    nothing to save) and raise RunInterrupted. Exceptions of ``on_event`` stop the run too."""
    try:
        while True:
            if interrupted():
                raise RunInterrupted(-1)
            event = process.next_event(timeout=poll_s)
            if event is not None:
                on_event(event)
            elif process.poll() is not None:
                process.wait(timeout=30)  # joins the reader: every line of the stream is queued
                for event in process.drain():  # the last events, none dropped
                    on_event(event)
                break
    except BaseException as exc:
        started = any(e.get("event") == "started" for e in process.events)
        code = process.stop(grace_s=stop_grace_s if started else 0.0, kill_s=kill_s)
        if isinstance(exc, RunInterrupted):
            raise RunInterrupted(code) from None
        raise
    process.wait(timeout=30)
    if process.tree_alive():  # the launcher exited but left processes: end them
        process.stop(grace_s=0.0, kill_s=kill_s)
    return process.result()
