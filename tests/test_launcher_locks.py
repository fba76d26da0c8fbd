"""training/trainer/locks.py: device and run locks, released when their holder dies."""

from __future__ import annotations

import sys

import pytest

from training.trainer import launcher
from training.trainer.failures import LaunchError
from training.trainer.locks import FileLock


def test_lock_refuses_second_run_on_same_devices(tmp_path):
    first = FileLock(["gpu0", "gpu1"], owner="run A", folder=tmp_path).acquire()
    with pytest.raises(LaunchError, match="GPU 1 is already training \\(run A pid"):
        FileLock(["gpu1", "gpu2"], owner="run B", folder=tmp_path).acquire()
    other = FileLock(["gpu2", "run-x"], owner="run C", folder=tmp_path).acquire()  # disjoint: fine
    with pytest.raises(LaunchError, match="the run 'x' is already training"):
        FileLock(["gpu3", "run-x"], folder=tmp_path, names={"run-x": "the run 'x'"}).acquire()
    FileLock(["gpu3"], folder=tmp_path).acquire().release()  # the failed attempt released gpu3
    other.release()
    first.release()
    with FileLock(["gpu1"], owner="run B", folder=tmp_path):
        with pytest.raises(LaunchError, match="already training"):
            FileLock(["gpu1"], folder=tmp_path).acquire()


def test_lock_released_when_holder_dies(tmp_path):
    import subprocess

    code = (f"import sys; sys.path.insert(0, {str(launcher.TRAINING_DIR.parent)!r})\n"
            "from training.trainer.locks import FileLock\n"
            f"lock = FileLock(['gpu0'], folder=__import__('pathlib').Path({str(tmp_path)!r})).acquire()\n"
            "print('held', flush=True); import time; time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LaunchError, match="GPU 0 is already training"):
        FileLock(["gpu0"], folder=tmp_path).acquire()
    holder.kill()
    holder.wait()
    FileLock(["gpu0"], folder=tmp_path).acquire().release()


def test_run_locks_cannot_collide_with_run_folders(tmp_path):
    from training.trainer.locks import run_lock

    runs = tmp_path / "wan_reward_lora"
    (runs / "x.lock").mkdir(parents=True)  # the run folder of output "x.lock"
    with run_lock(runs, "x", owner="run x"), run_lock(runs, "x.lock", owner="run x.lock"):
        with pytest.raises(LaunchError, match="the run 'x' is already training \\(run x pid"):
            run_lock(runs, "x").acquire()
    assert (runs / "x.lock").is_dir() and sorted(p.name for p in (runs / ".locks").iterdir()) == ["x.lock", "x.lock.lock"]
    # a lock folder that cannot be made: a clear error, not a raw OSError
    (tmp_path / "file").write_text("")
    with pytest.raises(LaunchError, match="cannot open the lock file .*file/gpu0.lock.*WAN_REWARD_LOCK_DIR"):
        FileLock(["gpu0"], folder=tmp_path / "file").acquire()
