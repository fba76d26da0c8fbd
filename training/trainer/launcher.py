"""Run the trainer as a subprocess: command, environment, GPU lock, progress stream, graceful stop.

Used by the ComfyUI "Reward LoRA Train" node and usable from any Python program; never
imports ComfyUI. The trainer is its own program (``accelerate launch ... train_reward_lora.py``),
started from an argument list in its own session; nothing of the caller is relaunched per rank.

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
import fcntl
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ..safe_io import atomic_write, write_json
from .progress import EXIT_CONFIG, EXIT_PREFLIGHT, PARENT_PID_ENV, STOP_FILE, TRAINER_TAG, parse_event

TRAINING_DIR = Path(__file__).resolve().parents[1]
ENTRY_SCRIPT = TRAINING_DIR / "train_reward_lora.py"
CONFIGS_DIR = TRAINING_DIR / "configs"
PACK_ROOT = TRAINING_DIR.parent  # the presets name their DeepSpeed JSON relative to it: launch from here
# DeepSpeed presets -> accelerate config files in training/configs/ for (GPU runs, CPU runs);
# --num_processes overrides the files' count. None: no DeepSpeed (plain DDP / one process).
PRESETS = {
    "zero3_offload": ("accelerate_zero3_offload.yaml", "accelerate_cpu_zero3_offload_2proc.yaml"),
    "zero3": ("accelerate_zero3_multi_gpu.yaml", None),
    "zero2": ("accelerate_zero2_multi_gpu.yaml", None),
    "none": (None, None),
}
LOG_FILE = "train.log"


class LaunchError(RuntimeError):
    """The run cannot start (bad GPU choice, preset file missing, GPUs busy); the message says why."""


# ---- device choice --------------------------------------------------------------------

def physical_gpu_ids(gpu_ids, env: dict | None = None) -> tuple[str, ...]:
    """The caller's GPU numbers (as its torch counts them) as entries of its own
    ``CUDA_VISIBLE_DEVICES`` (ids or UUIDs), so a child sees the same physical GPUs."""
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return tuple(str(g) for g in gpu_ids)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    missing = [str(g) for g in gpu_ids if int(g) >= len(entries)]
    if missing:
        raise LaunchError(f"GPU id(s) {', '.join(missing)} not visible: CUDA_VISIBLE_DEVICES={visible!r} "
                          f"lists {len(entries)} GPU(s)")
    return tuple(entries[int(g)] for g in gpu_ids)


@dataclass(frozen=True)
class DeviceChoice:
    """Processes to start and the devices they see: ``gpu_ids`` (the caller's CUDA numbers) or CPU
    processes."""

    num_processes: int
    gpu_ids: tuple[str, ...] = ()

    @property
    def cpu(self) -> bool:
        return not self.gpu_ids

    def physical_ids(self, env: dict | None = None) -> tuple[str, ...]:
        return physical_gpu_ids(self.gpu_ids, env)

    @property
    def lock_keys(self) -> list[str]:
        """One lock per physical GPU (through the caller's CUDA_VISIBLE_DEVICES); CPU runs (tests,
        demos) share the cores and take no device lock."""
        return [f"gpu{re.sub(r'[^A-Za-z0-9-]', '_', g)}" for g in self.physical_ids()]

    def lock_names(self) -> dict[str, str]:
        """Lock key -> the GPU as the refusal names it."""
        return {key: f"GPU {phys}" + (f" (ComfyUI's GPU {rel})" if phys != rel else "")
                for key, phys, rel in zip(self.lock_keys, self.physical_ids(), self.gpu_ids)}

    def cpu_threads(self) -> int | None:
        """Threads per CPU process (the cores shared out), None for GPU runs."""
        return max(1, (os.cpu_count() or 1) // self.num_processes) if self.cpu else None


def parse_devices(text: str, visible_gpus: int) -> DeviceChoice:
    """``"auto"``/``""`` (every visible GPU, else 1 CPU process), ``"2"`` (the first 2 GPUs),
    ``"0,1"`` / ``"1"``-with-comma ids, ``"cpu"`` / ``"cpu:2"`` (CPU processes, tests and demos)."""
    text = (text or "").strip().lower().replace(" ", "")
    if text in ("", "auto", "all"):
        if visible_gpus == 0:
            return DeviceChoice(1)
        return DeviceChoice(visible_gpus, tuple(str(i) for i in range(visible_gpus)))
    if text.startswith("cpu"):
        count = text[3:].lstrip(":") or "1"
        if not count.isdigit() or int(count) < 1:
            raise LaunchError(f"gpus '{text}': write cpu or cpu:N with N >= 1 CPU processes")
        return DeviceChoice(int(count))
    if "," in text or text.endswith(","):
        ids = [i for i in text.split(",") if i]
        if not ids or not all(i.isdigit() for i in ids) or len(set(ids)) != len(ids):
            raise LaunchError(f"gpus '{text}': write GPU ids like 0,1 (distinct numbers)")
        missing = [i for i in ids if int(i) >= visible_gpus]
        if missing:
            raise LaunchError(f"gpus '{text}': GPU id(s) {', '.join(missing)} not visible; "
                              f"{_visible_text(visible_gpus)}")
        return DeviceChoice(len(ids), tuple(ids))
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise LaunchError(f"gpus '{text}': give at least 1 GPU, 'auto' or 'cpu'")
        if count > visible_gpus:
            raise LaunchError(f"gpus '{text}': {count} GPU(s) requested but {_visible_text(visible_gpus)}; "
                              "lower the count or expose more GPUs")
        return DeviceChoice(count, tuple(str(i) for i in range(count)))
    raise LaunchError(f"gpus '{text}': write auto, a GPU count (2), GPU ids (0,1) or cpu[:N]")


def _visible_text(visible: int) -> str:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={env!r})" if env is not None else ""
    return f"only {visible} GPU(s) are visible{where}"


# ---- command and environment -----------------------------------------------------------

def preset_config_file(preset: str, cpu: bool = False) -> Path | None:
    if preset not in PRESETS:
        raise LaunchError(f"deepspeed preset '{preset}' is unknown; choose one of {', '.join(PRESETS)}")
    gpu_file, cpu_file = PRESETS[preset]
    if preset == "none":
        return None
    name = cpu_file if cpu else gpu_file
    if name is None:
        raise LaunchError(f"deepspeed preset '{preset}' needs GPUs; on CPU use zero3_offload or none")
    path = CONFIGS_DIR / name
    if not path.is_file():
        raise LaunchError(f"deepspeed preset '{preset}': its accelerate config {path} is missing; "
                          "reinstall the pack or choose the preset 'none'")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_command(config_path: str | os.PathLike, devices: DeviceChoice, preset: str = "none",
                  python: str | None = None, port: int | None = None) -> list[str]:
    """``python -m accelerate.commands.launch [...] training/train_reward_lora.py --config run.yaml``."""
    cmd = [python or sys.executable, "-m", "accelerate.commands.launch"]
    preset_file = preset_config_file(preset, cpu=devices.cpu)
    if preset_file is not None:
        cmd += ["--config_file", str(preset_file)]
    elif devices.num_processes > 1:
        cmd += ["--multi_gpu"]  # torchrun-style workers; on CPU the trainer uses the gloo backend
    cmd += ["--num_processes", str(devices.num_processes), "--num_machines", "1",
            "--dynamo_backend", "no"]
    if preset_file is None:
        cmd += ["--mixed_precision", "no"]  # the trainer casts itself (config mixed_precision)
    if devices.num_processes > 1:
        cmd += ["--main_process_port", str(port or free_port())]
    cmd += [str(ENTRY_SCRIPT), "--config", str(config_path)]
    return cmd


def build_env(devices: DeviceChoice, base: dict | None = None, threads: int | None = None) -> dict[str, str]:
    """Environment of the trainer: ``CUDA_VISIBLE_DEVICES`` from the choice, mapped through the
    caller's own ``CUDA_VISIBLE_DEVICES`` ("" for CPU runs)."""
    env = dict(os.environ if base is None else base)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(devices.physical_ids(env))
    env["PYTHONUNBUFFERED"] = "1"
    env[PARENT_PID_ENV] = str(os.getpid())
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # never inherit a parent's distributed role
    return env


# ---- one run per device set -------------------------------------------------------------

def lock_dir() -> Path:
    """The folder of the GPU locks (shared by every ComfyUI of the machine); created on acquire."""
    return Path(os.environ.get("WAN_REWARD_LOCK_DIR") or Path(tempfile.gettempdir()) / "wan_reward_lora_locks")


RUN_LOCKS_FOLDER = ".locks"  # in the runs folder: output names start with a letter or digit, so no run is named so


def run_lock(runs_folder: str | os.PathLike, name: str, owner: str = "") -> DeviceLock:
    """The lock of the run folder ``runs_folder/name``: ``runs_folder/.locks/<name>.lock`` (a folder of
    its own, so no output name, ``x.lock`` included, can collide with a lock file)."""
    return DeviceLock([name], owner=owner, folder=Path(runs_folder) / RUN_LOCKS_FOLDER,
                      names={name: f"the run {name!r}"})


class DeviceLock:
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

    def acquire(self) -> "DeviceLock":
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


# ---- a run interrupted by the death of its caller ---------------------------------------------

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
            if any(run_dir in p.resolve().parents for p in paths) and _alive(proc):  # a phase's subfolder too
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


# ---- the running trainer ------------------------------------------------------------------

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
        assert self.process is not None and self.process.stdout is not None
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
        alive = [proc for proc in self._tree.values() if _alive(proc)]
        self._tree = {proc.pid: proc for proc in alive}
        return alive

    def group_alive(self) -> bool:
        """Whether any process of the run's tree still exists (zombies excluded)."""
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
            while self.group_alive():
                if sig is not None:  # each process once; collected again each round: late ranks too
                    self._signal_tree(sig, skip=signalled)
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
            else:
                break
        return self.wait(timeout=5.0)

    def wait(self, timeout: float | None = None) -> int:
        assert self.process is not None
        code = self.process.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout=5.0)
        if not self.group_alive():
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
    while time.monotonic() < deadline and any(run.group_alive() for run in _RUNNING):
        time.sleep(0.1)
    for run in list(_RUNNING):
        deadline = time.monotonic() + 5.0
        while run.group_alive() and time.monotonic() < deadline:
            run._signal_tree(signal.SIGKILL)
            time.sleep(0.1)


def _close_quietly(handle) -> None:
    try:
        handle.close()
    except OSError:  # flushing into a full disk
        pass


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---- publishing the LoRA ---------------------------------------------------------------------

PUBLISHED_FILE = "published.json"  # in the run folder: config hashes of the LoRAs it published


def lora_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The safetensors header metadata of ``path``, or None when it is not a readable safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (OSError, SafetensorError):  # not safetensors / truncated: certainly not one of ours
        return None


def published_hashes(run_dir: str | os.PathLike) -> set[str]:
    try:
        data = json.loads((Path(run_dir) / PUBLISHED_FILE).read_text(encoding="utf-8"))
        return {str(h) for h in data.get("config_hashes", [])}
    except (OSError, ValueError, AttributeError):
        return set()


def check_publish_target(target: str | os.PathLike, run_dir: str | os.PathLike, config_hash: str | None) -> None:
    """Refuse to overwrite ``target`` unless it is absent or a LoRA this run folder wrote (trainer tag
    and a config hash of this run: the current one or one it published before, e.g. before a resume)."""
    target = Path(target)
    if not target.exists():
        return
    meta = lora_metadata(target) or {}
    ours = meta.get("trainer") == TRAINER_TAG and meta.get("config_hash") in (
        published_hashes(run_dir) | ({config_hash} if config_hash else set()))
    if not ours:
        who = ("another reward LoRA run" if meta.get("trainer") == TRAINER_TAG
               else "a file this run did not write")
        raise LaunchError(f"{target} already exists and is {who}; choose another output_name, "
                          "or delete or rename that file to replace it")


def publish_lora(source: str | os.PathLike, target: str | os.PathLike, run_dir: str | os.PathLike,
                 config_hash: str | None = None) -> Path:
    """Copy the run's LoRA to ``target`` atomically, after ``check_publish_target``; records the
    LoRA's config hash in the run folder so a resumed run may replace it."""
    source, target = Path(source), Path(target)
    written = (lora_metadata(source) or {}).get("config_hash")
    check_publish_target(target, run_dir, written or config_hash)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    if written:
        write_json(Path(run_dir) / PUBLISHED_FILE, {"config_hashes": sorted(published_hashes(run_dir) | {written})})
    return target


# ---- failures -> what to tell the user -------------------------------------------------------

_OOM_MARKERS = ("out of memory", "outofmemoryerror", "cuda error: out of memory", "cannot allocate memory",
                "memoryerror")


def failure_message(result: RunResult, visible_gpus: int | None = None) -> str:
    """One message for a failed run: what failed, a hint, and the last lines of the log."""
    error = result.error or {}
    message = error.get("message") or f"the trainer exited with code {result.returncode}"
    text = (message + "\n" + result.log_tail).lower()
    hints = []
    if any(marker in text for marker in _OOM_MARKERS):
        hints.append("out of memory: use the zero3_offload preset (CPU offload), fewer frames, a lower "
                     "resolution, a smaller backprop window, or more GPUs")
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
