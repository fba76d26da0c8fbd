"""Faults that lose nothing: the disk fills while a checkpoint is written, the process publishing
the LoRA is killed mid-copy, ComfyUI dies while a run holds its lock."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from training.demo import write_tiny_run
from training.trainer import cli
from training.trainer.checkpoint import checkpoints_dir, latest_checkpoint
from training.trainer.progress import EXIT_ERROR, EXIT_OK, parse_events

ROOT = Path(__file__).resolve().parents[1]


# ---- the disk fills while a checkpoint is written -------------------------------------------------

def _run(config: Path, steps: int) -> tuple[int, list[dict]]:
    """The trainer's command line, in this process: (exit code, events)."""
    data = yaml.safe_load(config.read_text())
    data["max_steps"] = steps
    config.write_text(yaml.safe_dump(data))
    out = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out):
            code = cli.main(["--config", str(config)])
    finally:
        torch.set_num_threads(threads)
    return code, parse_events(out.getvalue())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(output: Path) -> list[str]:
    """Temporary files or folders a failed save could leave where a resume would look."""
    return [str(p) for p in output.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


def _enospc_in(marker: str, real):
    """``real`` (a writer taking (..., path)) that, for paths containing ``marker``, writes half of its
    output and then fails as a full disk does."""
    def write(*args, **kwargs):
        path = str(args[1] if len(args) > 1 else kwargs.get("filename", kwargs.get("f")))
        real(*args, **kwargs)
        if marker in path:
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return write


@pytest.mark.parametrize("failing", ["trainer state", "lora"])
def test_disk_full_during_a_checkpoint_keeps_the_last_one_and_resumes(tmp_path, monkeypatch, failing):
    config = write_tiny_run(tmp_path, validation_every=0, checkpoint_every=1, checkpoints_keep=3,
                            inference_steps=4, backprop_steps=1, output_dir=str(tmp_path / "run"))
    output = tmp_path / "run"
    assert _run(config, 1)[0] == EXIT_OK
    step_one = checkpoints_dir(output) / "step-000001"
    before = _snapshot(step_one)
    lora = output / "tiny_reward_lora.safetensors"
    lora_before = lora.read_bytes()

    from training import safe_io
    if failing == "lora":  # safetensors' writer, as save_safetensors calls it
        monkeypatch.setattr(safe_io, "save_file", _enospc_in(".tmp-step-000002", safe_io.save_file))
    else:
        monkeypatch.setattr(torch, "save", _enospc_in(".tmp-step-000002", torch.save))
    code, events = _run(config, 2)
    monkeypatch.undo()

    assert code == EXIT_ERROR
    error = next(e for e in events if e["event"] == "error")
    message = error["message"]
    assert message.startswith("DiskFullError: disk full: checkpoint step 2 could not be saved (no space left in "
                              f"{checkpoints_dir(output)};"), message
    assert f"The last complete checkpoint, step 1 ({step_one})" in message
    assert "with resume on and training continues from step 1" in message
    assert latest_checkpoint(output) == step_one
    assert _snapshot(step_one) == before and lora.read_bytes() == lora_before  # nothing lost, nothing half-written
    assert _leftovers(output) == []

    code, events = _run(config, 2)  # space freed: the resume continues from the last checkpoint
    assert code == EXIT_OK
    assert events[0]["step"] == 1 and events[0]["resumed_from"] == str(step_one)
    assert events[-1]["event"] == "finished" and events[-1]["step"] == 2
    assert latest_checkpoint(output).name == "step-000002"


# A real full disk: a small tmpfs in a user and mount namespace (no root needed where the kernel
# allows unprivileged namespaces), so the real writers fail as they do (torch.save's "unexpected
# pos" names no cause; safetensors says "No space left on device (os error 28)").
FULL_DISK_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, os, sys
    sys.path.insert(0, sys.argv[3])
    import torch, yaml
    from pathlib import Path
    from training.demo import write_tiny_run
    from training.trainer import cli
    from training.trainer.checkpoint import latest_checkpoint
    from training.trainer.progress import parse_events

    disk, models = Path(sys.argv[1]), Path(sys.argv[2])
    output = disk / "run"
    config = write_tiny_run(models, validation_every=0, checkpoint_every=1, inference_steps=4, backprop_steps=1,
                            output_dir=str(output))
    torch.set_num_threads(1)

    def run(steps):
        data = yaml.safe_load(config.read_text())
        data["max_steps"] = steps
        config.write_text(yaml.safe_dump(data))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["--config", str(config)])
        return code, parse_events(out.getvalue())

    def leave_free(nbytes):  # fill the disk, then give back nbytes
        filler = disk / "filler"
        with open(filler, "ab", buffering=0) as handle:  # unbuffered: nothing is left to flush at close
            try:
                while True:
                    handle.write(b"x" * 65536)
                    handle.flush()
            except OSError:
                pass
        with open(filler, "ab") as handle:
            handle.truncate(max(0, filler.stat().st_size - nbytes))

    def state():
        latest = latest_checkpoint(output)
        files = sorted(str(p.relative_to(output)) for p in output.rglob("*"))
        lora = output / "tiny_reward_lora.safetensors"
        return {"latest": latest.name if latest else None, "files": files,
                "lora": lora.read_bytes().hex() if lora.exists() else None}

    report = {}
    report["first"] = run(1)[0]
    step_one = output / "checkpoints" / "step-000001"
    sizes = {p.name: p.stat().st_size for p in step_one.iterdir()}
    report["sizes"] = sizes
    report["before"] = state()
    for name, free in (("trainer state", (sizes["lora.safetensors"] + sizes["trainer-rank0.pt"]) // 2 + 8192),
                       ("lora", sizes["lora.safetensors"] // 2)):
        leave_free(free)
        code, events = run(2)
        report[name] = {"code": code, "errors": [e["message"] for e in events if e["event"] == "error"],
                        "after": state()}
        (disk / "filler").unlink()
    code, events = run(2)
    report["resumed"] = {"code": code, "started": events[0], "last": events[-1]}
    print("REPORT " + json.dumps(report))
""")


def _namespaces_work(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {folder}"],
                           capture_output=True, check=False)
    return probe.returncode == 0


def test_a_real_full_disk_during_checkpoints_loses_nothing(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _namespaces_work(disk):
        pytest.skip("unprivileged user and mount namespaces (unshare -rm) are not available for a tmpfs")
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_SCRIPT)
    command = (f"mount -t tmpfs -o size=3m tmpfs {disk} && exec {sys.executable} {script} {disk} "
               f"{tmp_path / 'models'} {ROOT}")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=240,
                            check=False)
    assert result.returncode == 0 and "REPORT " in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    assert report["first"] == EXIT_OK
    for name in ("trainer state", "lora"):
        case = report[name]
        assert case["code"] == EXIT_ERROR, (name, case)
        assert len(case["errors"]) == 1, (name, case)
        message = case["errors"][0]
        assert message.startswith("DiskFullError: disk full: checkpoint step 2 could not be saved (no space left in "
                                  f"{disk / 'run' / 'checkpoints'};"), (name, message)
        assert "The last complete checkpoint, step 1" in message and "continues from step 1" in message, message
        assert case["after"] == report["before"], name  # the same files, the same LoRA bytes, no leftovers
    resumed = report["resumed"]
    assert resumed["code"] == EXIT_OK and resumed["started"]["step"] == 1
    assert resumed["last"]["event"] == "finished" and resumed["last"]["step"] == 2


# ---- killed while publishing the LoRA into the loras folder --------------------------------------

PUBLISH_SCRIPT = textwrap.dedent("""
    import shutil, sys, time
    sys.path.insert(0, sys.argv[5])
    from training.trainer import publish as launcher

    source, target, run_dir, mode = sys.argv[1:5]
    if mode == "slow":  # copy in 64 KiB chunks, announcing each, so the kill lands mid-copy
        def copyfile(src, dst):
            with open(src, "rb") as fin, open(dst, "wb") as fout:
                while chunk := fin.read(1 << 16):
                    fout.write(chunk)
                    fout.flush()
                    print("copying", flush=True)
                    time.sleep(0.05)
        shutil.copyfile = copyfile
    print("ready", flush=True)
    launcher.publish_lora(source, target, run_dir)
    print("published", flush=True)
""")


def _lora_file(path: Path, value: float, config_hash: str) -> bytes:
    from safetensors.torch import save_file

    from training.trainer.progress import TRAINER_TAG

    save_file({"w": torch.full((1 << 19,), value)}, str(path), metadata={"trainer": TRAINER_TAG,
                                                                        "config_hash": config_hash})
    return path.read_bytes()


def _publisher(tmp_path: Path, source: Path, target: Path, run: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "publish.py"
    script.write_text(PUBLISH_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), str(source), str(target), str(run), mode, str(ROOT)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_killed_while_publishing_leaves_the_old_or_the_new_lora_whole(tmp_path):
    import random
    import signal
    import time

    from training.trainer.publish import publish_lora

    run, loras = tmp_path / "run", tmp_path / "loras"
    run.mkdir()
    loras.mkdir()
    target = loras / "x.safetensors"
    old = _lora_file(run / "x.safetensors", 1.0, "aaaa")
    publish_lora(run / "x.safetensors", target, run)
    new = _lora_file(run / "x.safetensors", 2.0, "bbbb")  # the resumed run's LoRA, 2 MiB

    slow = _publisher(tmp_path, run / "x.safetensors", target, run, "slow")
    assert slow.stdout.readline().strip() == "copying"  # the first chunk is written
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    assert target.read_bytes() == old
    partial = [p for p in loras.iterdir() if p != target]
    assert len(partial) == 1 and partial[0].name.startswith(".x.safetensors.") and partial[0].suffix == ".tmp"
    assert 0 < partial[0].stat().st_size < len(new)  # hidden and no LoRA suffix: no loader lists it

    for _ in range(3):  # a real copy, killed at a random moment: either file, whole
        process = _publisher(tmp_path, run / "x.safetensors", target, run, "fast")
        time.sleep(random.uniform(0.0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert target.read_bytes() in (old, new)

    stale = time.time() - 120  # a killed writer's temporary file, a while later
    for leftover in loras.glob(".*.tmp"):
        os.utime(leftover, (stale, stale))
    publish_lora(run / "x.safetensors", target, run)  # the next publish completes and removes it
    assert target.read_bytes() == new
    assert sorted(p.name for p in loras.iterdir()) == ["x.safetensors"]


# ---- ComfyUI dies while a run holds its lock -----------------------------------------------------

COMFYUI_STANDIN = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from training.trainer.launcher import ENTRY_SCRIPT
    from training.trainer.locks import run_lock

    runs, name = Path(sys.argv[1]), sys.argv[2]
    lock = run_lock(runs, name, owner=f"ComfyUI node 7, output {name!r}").acquire()
    # its trainer: the command line of a real one, in a session of its own (as the launcher starts it)
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(ENTRY_SCRIPT),
                                "--config", str(runs / name / "run.yaml")], start_new_session=True)
    print(trainer.pid, flush=True)
    time.sleep(600)
""")


def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    folder = run_dir / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "trainer-rank0.pt").write_bytes(b"")
    (folder / "run.json").write_text("{}")
    (run_dir / "checkpoints" / "latest.json").write_text(json.dumps({"step": step, "dir": folder.name}))
    return folder


def _kill(pid: int) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_a_dead_callers_run_lock_is_stale_its_trainer_is_not_trained_over(tmp_path):
    import signal
    import time

    from training.trainer.failures import LaunchError
    from training.trainer.locks import interrupted_run_notice, run_lock, trainer_processes

    runs = tmp_path / "wan_reward_lora"
    run_dir = runs / "x"
    step_three = _fake_checkpoint(run_dir, 3)
    script = tmp_path / "comfyui.py"
    script.write_text(COMFYUI_STANDIN)
    comfyui = subprocess.Popen([sys.executable, str(script), str(runs), "x", str(ROOT)], stdout=subprocess.PIPE,
                               text=True)
    trainer_pid = int(comfyui.stdout.readline())
    try:
        with pytest.raises(LaunchError, match="the run 'x' is already training"):
            run_lock(runs, "x").acquire()
        comfyui.send_signal(signal.SIGKILL)  # ComfyUI dies; its trainer lives on
        comfyui.wait()
        lock = run_lock(runs, "x", owner="ComfyUI node 9, output 'x'").acquire()  # flock ended with the holder
        holder = f"ComfyUI node 7, output 'x' pid {comfyui.pid}"
        assert lock.previous == {"x": holder}
        assert [p.pid for p in trainer_processes(run_dir)] == [trainer_pid]
        with pytest.raises(LaunchError) as refused:
            interrupted_run_notice(run_dir, lock.previous["x"], resume=True)
        assert str(refused.value).startswith(
            f"the run 'x' is still being trained by earlier trainer processes (pids {trainer_pid}; left by {holder}, "
            "which ended while it was training). Training it again now would write the same checkpoints twice.")
        assert f"kill {trainer_pid}" in str(refused.value) and "queue again with resume on" in str(refused.value)
    finally:
        _kill(trainer_pid)
        _kill(comfyui.pid)
    deadline = time.monotonic() + 10
    while trainer_processes(run_dir):  # the old trainer has exited: the user is told how the run goes on
        assert time.monotonic() < deadline
        time.sleep(0.05)
    notice = interrupted_run_notice(run_dir, lock.previous["x"], resume=True)
    assert notice == (f"an earlier run of 'x' was interrupted ({holder} ended while it was training); its last "
                      f"checkpoint is step 3 ({step_three}): resume is on, so training continues from it.")
    notice = interrupted_run_notice(run_dir, lock.previous["x"], resume=False)
    assert "resume is off, so those checkpoints are moved aside" in notice and "continue from step 3" in notice
    lock.release()
    again = run_lock(runs, "x").acquire()  # a run that ended normally leaves nothing to report
    assert again.previous == {} and interrupted_run_notice(run_dir, None, resume=True) is None
    again.release()


def test_a_trainer_started_by_hand_in_the_run_folder_is_not_trained_over(tmp_path):
    """Also for a phase of ``expert: both`` (its own subfolder of the run)."""
    from training.trainer.failures import LaunchError
    from training.trainer.launcher import ENTRY_SCRIPT
    from training.trainer.locks import interrupted_run_notice

    run_dir = tmp_path / "wan_reward_lora" / "y"
    phase = run_dir / "low_noise"
    phase.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(ENTRY_SCRIPT), "--config",
                              "run.yaml"], cwd=phase)  # a relative --config: resolved in its working folder
    try:  # Popen returns after the exec: the command line is the trainer's
        with pytest.raises(LaunchError, match=rf"pids {other.pid}; not started by this ComfyUI"):
            interrupted_run_notice(run_dir, None, resume=True)
        (tmp_path / "wan_reward_lora" / "y2").mkdir()  # a run whose name starts alike is another run
        assert interrupted_run_notice(tmp_path / "wan_reward_lora" / "y2", None, resume=True) is None
    finally:
        other.kill()
        other.wait()
    _fake_checkpoint(run_dir / "high_noise", 4)
    five = _fake_checkpoint(phase, 5)  # written last: the phase that was running
    later = five.stat().st_mtime + 10
    os.utime(five, (later, later))
    notice = interrupted_run_notice(run_dir, "ComfyUI node 3, output 'y' pid 1", resume=True)
    assert f"its last checkpoint is step 5 ({five})" in notice

