"""One run per GPU and per run folder: ``FileLock``, an exclusive ``flock`` on one file per key (a
physical GPU, a run), released on close or when its holder dies. A dead holder's text stays in
the file, so the next run learns that an earlier one was interrupted (``interrupted_run_notice``)."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

import psutil

from .failures import LaunchError
from .launcher import ENTRY_SCRIPT
from .process import alive


def lock_dir() -> Path:
    """The folder of the GPU locks (shared by every ComfyUI of the machine); created on acquire."""
    return Path(os.environ.get("WAN_REWARD_LOCK_DIR") or Path(tempfile.gettempdir()) / "wan_reward_lora_locks")


RUN_LOCKS_FOLDER = ".locks"  # in the runs folder: output names start with a letter or digit, so no run is named so


def run_lock(runs_folder: str | os.PathLike, name: str, owner: str = "") -> FileLock:
    """The lock of the run folder ``runs_folder/name``: ``runs_folder/.locks/<name>.lock`` (a folder of
    its own, so no output name, ``x.lock`` included, can collide with a lock file)."""
    return FileLock([name], owner=owner, folder=Path(runs_folder) / RUN_LOCKS_FOLDER,
                      names={name: f"the run {name!r}"})


class FileLock:
    """Exclusive ``flock`` on one file per key (a physical GPU, a run) in ``folder``; released on
    close or process death."""

    def __init__(self, keys: list[str], owner: str = "", folder: Path | None = None,
                 names: dict[str, str] | None = None):
        self.keys = list(keys)
        self.names = names or {}  # key -> what to call it in the refusal
        self.owner = owner
        self.folder = folder or lock_dir()
        self._handles: list = []
        # key -> what the lock file said when this lock was taken: a holder that died holding it
        # (flock ends with the process, the "owner pid N" text stays; a release empties it)
        self.previous: dict[str, str] = {}

    def acquire(self) -> "FileLock":
        for key in self.keys:
            path = self.folder / f"{key}.lock"
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                handle = open(path, "a+", encoding="utf-8")
            except OSError as exc:
                self.release()
                raise LaunchError(f"cannot open the lock file {path} ({exc.strerror or exc}); make that folder "
                                  "writable, or set WAN_REWARD_LOCK_DIR to a writable folder for GPU locks") from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another run"
                handle.close()
                self.release()
                what = self.names.get(key) or (f"GPU {key[3:]}" if key.startswith("gpu") else key)
                raise LaunchError(f"{what} is already training ({holder}); wait for that run to finish, "
                                  "cancel it, or choose other GPUs") from None
            handle.seek(0)
            left = handle.read().strip()
            if left:
                self.previous[key] = left
            handle.seek(0)
            handle.truncate()
            handle.write(f"{self.owner} pid {os.getpid()}")
            handle.flush()
            self._handles.append(handle)
        return self

    def release(self) -> None:
        for handle in self._handles:
            try:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle, fcntl.LOCK_UN)
            finally:
                handle.close()
        self._handles = []

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---- a run interrupted by the death of its caller ----------------------------------------------

TRAINER_MARKERS = (ENTRY_SCRIPT.name, "training.trainer.cli")  # in the command line of every trainer process


def trainer_processes(run_dir: str | os.PathLike) -> list[psutil.Process]:
    """Live processes of a trainer (launcher, agent, ranks) whose ``--config`` is a file in
    ``run_dir`` or a subfolder (a phase of ``expert: both``), whoever started them: a ComfyUI that
    has died, or a command line."""
    run_dir = Path(run_dir).resolve()
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if proc.pid == os.getpid() or not any(m in arg for arg in cmd for m in TRAINER_MARKERS):
            continue
        configs = [cmd[i + 1] for i, arg in enumerate(cmd[:-1]) if arg == "--config"]
        configs += [arg.split("=", 1)[1] for arg in cmd if arg.startswith("--config=")]
        try:
            paths = [Path(c) if Path(c).is_absolute() else Path(proc.cwd()) / c for c in configs]
            if any(run_dir in p.resolve().parents for p in paths) and alive(proc):  # a phase's subfolder too
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def interrupted_run_notice(run_dir: str | os.PathLike, previous_holder: str | None, resume: bool) -> str | None:
    """Call with the run's lock held. LaunchError while trainer processes of ``run_dir`` still
    live (a dead ComfyUI's trainer saving before it stops, or one started by hand): training over
    them would write the same checkpoints twice. Otherwise, when ``previous_holder`` (the text a
    dead holder left in the run's lock) is set, what became of that run and how this one goes on."""
    run_dir = Path(run_dir)
    name = run_dir.name
    live = trainer_processes(run_dir)
    if live:
        pids = " ".join(str(p.pid) for p in live)
        by = (f"left by {previous_holder}, which ended while it was training" if previous_holder
              else "not started by this ComfyUI")
        raise LaunchError(
            f"the run {name!r} is still being trained by earlier trainer processes (pids {pids}; {by}). "
            "Training it again now would write the same checkpoints twice. A trainer whose ComfyUI is gone saves a "
            "checkpoint and exits by itself at the end of its current step: wait until those processes have "
            f"exited (or end them: kill {pids}), then queue again with resume on to continue from the last "
            "checkpoint.")
    if not previous_holder:
        return None
    from .checkpoint import latest_checkpoint, step_of

    # the run's own checkpoints, or its phases' (expert: both): the one written last
    folders = ([run_dir] + sorted(d for d in run_dir.iterdir() if d.is_dir())) if run_dir.is_dir() else []
    found = max(filter(None, map(latest_checkpoint, folders)), key=lambda p: p.stat().st_mtime, default=None)
    head = f"an earlier run of {name!r} was interrupted ({previous_holder} ended while it was training)"
    if found is None:
        return f"{head}; it left no checkpoint, so this run starts from step 0."
    step = step_of(found)
    if resume:
        return f"{head}; its last checkpoint is step {step} ({found}): resume is on, so training continues from it."
    return (f"{head}; its last checkpoint is step {step} ({found}). resume is off, so those checkpoints are moved "
            f"aside and training starts over: to continue from step {step} instead, cancel and queue again with "
            "resume on.")


