"""Running the trainer from another program, without ComfyUI: devices, command and environment, the
process and its graceful stop, locks, publishing, failure messages (the launcher's parts)."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from training.trainer import launcher, publish
from training.trainer.devices import DeviceChoice, parse_devices
from training.trainer.failures import LaunchError, failure_message
from training.trainer.launcher import build_command, build_env
from training.trainer.locks import FileLock
from training.trainer.process import LOG_FILE, RunResult, TrainerProcess, strip_launcher_traceback
from training.trainer.progress import TRAINER_TAG, parse_event

# A fake trainer: prints progress events and starts a child "rank" in a session of its OWN that
# ignores SIGTERM (as torch's elastic agent starts ranks), and reacts to STOP / SIGTERM according
# to MODE: obey (STOP: finish, kill the rank), ignore_stop (SIGTERM kills the leader alone),
# ignore_all (the leader ignores SIGTERM too), agent (SIGTERM: kill the rank, exit, as torch's
# agent does), late (also starts a second rank after 1 s).
FAKE_TRAINER = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    out, mode = sys.argv[1], sys.argv[2]
    def rank(name):
        child = subprocess.Popen([sys.executable, "-c", "import signal, time\\n"
                                  "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\ntime.sleep(600)"],
                                 start_new_session=True)
        with open(os.path.join(out, name), "w") as f:
            f.write(str(child.pid))
        return child
    child = rank("child.pid")
    if mode == "ignore_all":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "agent":
        def shutdown(signum, frame):
            child.kill(); child.wait(); sys.exit(1)
        signal.signal(signal.SIGTERM, shutdown)
    print("some library noise", flush=True)
    print(json.dumps({"event": "started", "step": 0, "max_steps": 1000}), flush=True)
    step = 0
    start = time.monotonic()
    while True:
        step += 1
        print(json.dumps({"event": "step", "step": step, "max_steps": 1000, "loss": 1.0 / step,
                          "reward": 0.1 * step, "rewards": {"hps": 0.1 * step}, "eta_seconds": 5}), flush=True)
        if mode == "late" and time.monotonic() - start > 1 and not os.path.exists(os.path.join(out, "late.pid")):
            rank("late.pid")
        stop = os.path.join(out, "STOP")
        if mode == "obey" and os.path.exists(stop):
            os.unlink(stop)
            print(json.dumps({"event": "finished", "step": step, "reason": "stopped", "lora_path": "x"}), flush=True)
            child.kill(); child.wait()
            sys.exit(0)
        time.sleep(0.05)
""")


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)

    def start(mode: str) -> TrainerProcess:
        out = tmp_path / f"out_{mode}"
        out.mkdir()
        proc = TrainerProcess([sys.executable, str(script), str(out), mode], build_env(DeviceChoice(1)), out)
        proc.start()
        deadline = time.monotonic() + 20
        while not (out / "child.pid").exists() or not any(e["event"] == "step" for e in proc.events):
            assert time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.05)
        started.append(proc)
        return proc

    started = []
    yield start
    for proc in started:  # a failed test must not leave its SIGTERM-proof ranks behind
        for name in ("child.pid", "late.pid"):
            pid_file = proc.output_dir / name
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            proc.process.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


# ---- devices -------------------------------------------------------------------------

def test_parse_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert parse_devices("auto", 0) == DeviceChoice(1)
    assert parse_devices("", 4) == DeviceChoice(4, ("0", "1", "2", "3"))
    assert parse_devices("2", 4) == DeviceChoice(2, ("0", "1"))
    assert parse_devices("1,3", 4) == DeviceChoice(2, ("1", "3"))
    assert parse_devices("cpu:2", 8) == DeviceChoice(2) and DeviceChoice(2).lock_keys == []
    assert parse_devices("1,3", 4).lock_keys == ["gpu1", "gpu3"]
    assert parse_devices("cpu", 8) == DeviceChoice(1)
    with pytest.raises(LaunchError, match="4 GPU\\(s\\) requested but only 2 GPU\\(s\\) are visible"):
        parse_devices("4", 2)
    with pytest.raises(LaunchError, match="GPU id\\(s\\) 5 not visible"):
        parse_devices("0,5", 2)
    for bad in ("two", "0,0", "cpu:x", "0"):
        with pytest.raises(LaunchError):
            parse_devices(bad, 2)


def test_gpu_ids_mapped_through_the_callers_visible_devices(monkeypatch):
    """ComfyUI started with CUDA_VISIBLE_DEVICES=2,3 counts them as 0,1: the trainer must get 2,3."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    choice = parse_devices("1,", 2)  # GPU id 1 (a bare "1" is a count)
    assert build_env(choice)["CUDA_VISIBLE_DEVICES"] == "3"
    assert build_env(parse_devices("1", 2))["CUDA_VISIBLE_DEVICES"] == "2"
    assert build_env(parse_devices("auto", 2))["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert choice.lock_keys == ["gpu3"] and choice.lock_names() == {"gpu3": "GPU 3 (ComfyUI's GPU 1)"}
    assert build_env(DeviceChoice(1), base={"CUDA_VISIBLE_DEVICES": "2,3"})["CUDA_VISIBLE_DEVICES"] == ""
    uuids = "GPU-aaaa-1111,GPU-bbbb-2222"
    assert build_env(parse_devices("1,", 2), base={"CUDA_VISIBLE_DEVICES": uuids})["CUDA_VISIBLE_DEVICES"] \
        == "GPU-bbbb-2222"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuids)
    assert parse_devices("0,", 2).lock_keys == ["gpuGPU-aaaa-1111"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    with pytest.raises(LaunchError, match="CUDA_VISIBLE_DEVICES='2' lists 1 GPU"):
        build_env(DeviceChoice(1, ("1",)))
    # the lock is per physical GPU: ComfyUI's 0 under "3" and ComfyUI's 1 under "2,3" collide
    folder = Path(tempfile.mkdtemp())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    first = FileLock(parse_devices("0,", 1).lock_keys, folder=folder).acquire()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    second = parse_devices("1,", 2)
    with pytest.raises(LaunchError, match="GPU 3 \\(ComfyUI's GPU 1\\) is already training"):
        FileLock(second.lock_keys, folder=folder, names=second.lock_names()).acquire()
    first.release()


def test_command_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = tmp_path / "run.yaml"
    cmd = build_command(cfg, DeviceChoice(2), preset="none", python="/py", port=29123)
    assert cmd[:3] == ["/py", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert "--multi_gpu" in cmd and cmd[cmd.index("--main_process_port") + 1] == "29123"
    assert cmd[-3:] == [str(launcher.ENTRY_SCRIPT), "--config", str(cfg)]
    assert launcher.ENTRY_SCRIPT.is_file()
    single = build_command(cfg, DeviceChoice(1, ("3",)), preset="none", python="/py")
    assert "--multi_gpu" not in single and "--main_process_port" not in single
    with pytest.raises(LaunchError, match="unknown"):
        build_command(cfg, DeviceChoice(1), preset="zero9")
    for preset, (gpu_file, cpu_file) in launcher.PRESETS.items():
        for devices, name in ((DeviceChoice(2, ("0", "1")), gpu_file), (DeviceChoice(2), cpu_file)):
            if preset == "none":
                continue
            if name is None:
                with pytest.raises(LaunchError, match="needs GPUs"):
                    build_command(cfg, devices, preset=preset)
                continue
            ds = build_command(cfg, devices, preset=preset, python="/py")
            preset_file = launcher.CONFIGS_DIR / name
            assert preset_file.is_file(), preset_file
            assert ds[ds.index("--config_file") + 1] == str(preset_file) and "--multi_gpu" not in ds
            assert ds[ds.index("--num_processes") + 1] == "2"
            # the preset names its DeepSpeed JSON relative to the pack root, where the run starts
            ds_json = yaml.safe_load(preset_file.read_text())["deepspeed_config"]["deepspeed_config_file"]
            assert (launcher.PACK_ROOT / ds_json).is_file()
    env = build_env(DeviceChoice(2, ("1", "3")), base={"RANK": "3", "PATH": "/bin"}, threads=1)
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3" and "RANK" not in env and env["OMP_NUM_THREADS"] == "1"
    assert build_env(DeviceChoice(2), base={})["CUDA_VISIBLE_DEVICES"] == ""


def test_parse_event_skips_other_lines():
    assert parse_event('{"event": "step", "step": 3}') == {"event": "step", "step": 3}
    for line in ("[INFO] loading", "{not json", '{"no_event": 1}', "[1, 2]", ""):
        assert parse_event(line) is None


# ---- the process --------------------------------------------------------------------------

def test_stream_and_graceful_stop(fake):
    proc = fake("obey")
    child = int((proc.output_dir / "child.pid").read_text())
    first = proc.next_event(5)
    assert first["event"] == "started"
    t0 = time.monotonic()
    code = proc.stop(grace_s=10, kill_s=5)
    assert code == 0 and time.monotonic() - t0 < 8  # obeyed the STOP file, no signal needed
    result = proc.result()
    assert result.finished["reason"] == "stopped" and result.stopped
    steps = [e["step"] for e in result.events if e["event"] == "step"]
    assert steps == list(range(1, len(steps) + 1))
    assert "some library noise" in result.log_tail
    assert "some library noise" in proc.log_path.read_text()
    assert not _alive(child) and not proc.tree_alive()


@pytest.mark.parametrize("mode, grace_s, kill_s, expected, limit_s", [
    ("ignore_stop", 0.5, 1, -signal.SIGTERM, 5),  # STOP file ignored: SIGTERM ends it
    ("ignore_all", 0.3, 0.5, -signal.SIGKILL, 8),  # SIGTERM ignored too: SIGKILL ends it
])
def test_stop_escalates_until_the_whole_tree_is_gone(fake, mode, grace_s, kill_s, expected, limit_s):
    proc = fake(mode)
    child = int((proc.output_dir / "child.pid").read_text())
    t0 = time.monotonic()
    code = proc.stop(grace_s=grace_s, kill_s=kill_s)
    assert code == expected and time.monotonic() - t0 < limit_s
    assert not _alive(child) and not proc.tree_alive()


# ---- lock and failure messages --------------------------------------------------------------

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


def test_failure_hints():
    oom = RunResult(1, [{"event": "error", "kind": "runtime", "message": "OutOfMemoryError: CUDA out of memory"}],
                    log_tail="Traceback ...")
    text = failure_message(oom)
    assert "CUDA out of memory" in text and "memory mode that ran" in text and "fewer frames" in text
    assert "Traceback" in text
    gpus = RunResult(3, [{"event": "error", "kind": "preflight",
                          "message": "2 processes per node but only 1 GPU(s) visible"}])
    assert "too few GPUs: 1 GPU(s) are visible to ComfyUI" in failure_message(gpus, visible_gpus=1)
    config = RunResult(2, [{"event": "error", "kind": "config", "message": "config field 'frames': must be 4k+1"}])
    assert "'frames'" in failure_message(config) and "fix the field" in failure_message(config)
    crash = RunResult(-9, [], log_tail="Killed")
    assert "exited with code -9" in failure_message(crash)
    assert os.path.basename(LOG_FILE) == "train.log"


def test_curve_and_scores_from_events():
    from training.trainer.curves import final_scores, plot_training_curve, step_series

    events = [{"event": "started", "step": 0}]
    events += [{"event": "step", "step": i, "reward": 0.1 * i, "loss": 1 - 0.1 * i, "rewards": {"hps": 0.1 * i}}
               for i in range(1, 6)]
    events += [{"event": "step", "step": 5, "reward": 0.55, "loss": 0.45, "rewards": {"hps": 0.55}},  # resumed
               {"event": "step", "step": 6, "reward": 0.6, "loss": 0.4, "rewards": {"hps": 0.6}},
               {"event": "warning", "step": 6, "message": "reward gaming suspected"},
               {"event": "finished", "step": 6, "reason": "completed", "lora_path": "/x.safetensors"}]
    steps, rewards, losses = step_series(events)
    assert steps == [1, 2, 3, 4, 5, 6] and rewards[4] == 0.55 and losses[-1] == 0.4
    summary = final_scores(events)
    assert summary["steps"] == 6 and summary["reason"] == "completed" and summary["reward_first"] == 0.1
    assert summary["reward_last"] == 0.6 and summary["rewards_last"] == {"hps": 0.6}
    assert summary["warnings"] == ["reward gaming suspected"]
    image = plot_training_curve(events, width=320, height=160)
    assert image.shape == (1, 160, 320, 3) and 0 <= float(image.min()) and float(image.max()) <= 1
    px = (image[0] * 255).round()
    blue = ((px[..., 2] > 150) & (px[..., 0] < 80)).sum()
    orange = ((px[..., 0] > 150) & (px[..., 2] < 80)).sum()
    assert blue > 50 and orange > 50  # both curves drawn
    empty = plot_training_curve([], width=320, height=160)
    assert ((empty[0] * 255).round()[..., 2] > 150).logical_and((empty[0] * 255).round()[..., 0] < 80).sum() < 50


def test_trainers_stopped_when_the_caller_exits(tmp_path):
    """ComfyUI shutting down (normal exit) takes its trainer runs with it."""
    import subprocess

    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    out = tmp_path / "out"
    out.mkdir()
    code = (f"import sys, time; sys.path.insert(0, {str(launcher.PACK_ROOT)!r})\n"
            "from training.trainer.devices import DeviceChoice\nfrom training.trainer.launcher import build_env\nfrom training.trainer.process import TrainerProcess\n"
            f"p = TrainerProcess([sys.executable, {str(script)!r}, {str(out)!r}, 'ignore_stop'], "
            f"build_env(DeviceChoice(1)), {str(out)!r}).start()\n"
            "while p.next_event(10)['event'] != 'step': pass\n"
            "print(p.process.pid, flush=True)\n")
    caller = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert caller.returncode == 0, caller.stderr
    leader = int(caller.stdout.split()[0])
    child = int((out / "child.pid").read_text())
    deadline = time.monotonic() + 10
    while (_alive(leader) or _alive(child)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(leader) and not _alive(child)


def test_stop_reaches_ranks_started_late(fake):
    proc = fake("late")
    out = proc.output_dir
    deadline = time.monotonic() + 10
    while not (out / "late.pid").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ranks = [int((out / name).read_text()) for name in ("child.pid", "late.pid")]
    proc.stop(grace_s=0.2, kill_s=0.5)
    assert not any(map(_alive, ranks)) and not proc.tree_alive()


def test_the_trainer_of_a_killed_caller_saves_and_exits(tmp_path):
    """ComfyUI SIGKILLed mid-run: the real trainer (launched as the node launches it) notices its
    caller's pid is gone, saves a checkpoint at the end of its step, and its whole tree exits."""
    import json
    import subprocess

    from training.demo import write_tiny_run

    config = write_tiny_run(tmp_path, validation_every=0, max_steps=10000, checkpoint_every=1, inference_steps=4,
                            backprop_steps=1, output_dir=str(tmp_path / "run"))
    run = tmp_path / "run"
    code = (f"import sys, time; sys.path.insert(0, {str(launcher.PACK_ROOT)!r})\n"
            "from training.trainer.devices import DeviceChoice\nfrom training.trainer.launcher import build_command, build_env\nfrom training.trainer.process import TrainerProcess\n"
            f"p = TrainerProcess(build_command({str(config)!r}, DeviceChoice(1)), build_env(DeviceChoice(1), "
            f"threads=1), {str(run)!r}).start()\n"
            "while (p.next_event(60) or {}).get('event') != 'checkpoint': pass\n"
            "print(p.process.pid, flush=True)\n"
            "time.sleep(600)\n")
    caller = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        launcher_pid = int(caller.stdout.readline())
        tree = __import__('psutil').Process(launcher_pid)
        pids = [launcher_pid] + [c.pid for c in tree.children(recursive=True)]
        caller.kill()
        caller.wait()
        deadline = time.monotonic() + 120
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in pids), "trainer processes outlived their caller"
    finally:
        caller.kill()
        caller.wait()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finished = [e for e in events if e["event"] == "finished"]
    assert finished and finished[-1]["reason"] == "stopped", events[-3:]
    saved = [e for e in events if e["event"] == "checkpoint"]
    assert saved[-1]["reason"] == "stop" and saved[-1]["step"] == finished[-1]["step"]


def test_an_orphaned_trainer_that_does_not_stop_ends_itself(tmp_path):
    """The watch on the caller's pid: a trainer hung in a step still exits after the grace time."""
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that is gone
    code = (f"import sys, time; sys.path.insert(0, {str(launcher.PACK_ROOT)!r})\n"
            "from training.trainer.progress import Control\n"
            f"Control({str(tmp_path)!r}).install_signal_handlers()\n"
            "time.sleep(60)\n")
    env = dict(os.environ, WAN_REWARD_PARENT_PID=str(dead.pid), WAN_REWARD_ORPHAN_GRACE_S="0.5")
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 1 and time.monotonic() - t0 < 30
    assert "the ComfyUI that started this trainer is gone and the run did not stop within 0.5 s" in result.stderr


def test_log_tail_drops_the_launchers_traceback():
    trainer = ["Traceback (most recent call last):", '  File "/pack/training/trainer/loop.py", line 3, in train',
               "ValueError: frames contain NaN values"]
    launcher_tb = ["Traceback (most recent call last):",
                   '  File "/venv/lib/python3.11/site-packages/accelerate/commands/launch.py", line 9, in main',
                   '  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1129, in run',
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:"]
    assert strip_launcher_traceback(["noise"] + trainer + launcher_tb) == ["noise"] + trainer
    assert strip_launcher_traceback(trainer) == trainer
    assert strip_launcher_traceback(launcher_tb) == launcher_tb  # nothing else to show: keep it


def test_publish_refuses_a_lora_this_run_did_not_write(tmp_path):
    from safetensors.torch import load_file, save_file
    import torch

    from training.trainer.publish import publish_lora

    run = tmp_path / "run"
    run.mkdir()
    loras = tmp_path / "loras"
    loras.mkdir()
    ours = {"trainer": TRAINER_TAG, "config_hash": "aaaa"}
    save_file({"w": torch.ones(2)}, run / "x.safetensors", metadata=ours)
    target = loras / "x.safetensors"
    publish_lora(run / "x.safetensors", target, run)  # new file: fine
    assert load_file(target)["w"].tolist() == [1.0, 1.0]
    # the resumed run (config hash changed by a harmless field) replaces its own earlier LoRA
    save_file({"w": torch.full((2,), 2.0)}, run / "x.safetensors", metadata={**ours, "config_hash": "bbbb"})
    publish_lora(run / "x.safetensors", target, run)
    assert load_file(target)["w"].tolist() == [2.0, 2.0]
    # someone's own LoRA of that name, another run's, a non-safetensors file: refused, kept
    for meta, who in (({"ss_network_module": "networks.lora"}, "a file this run did not write"),
                      ({"trainer": TRAINER_TAG, "config_hash": "cccc"}, "another reward LoRA run"),
                      (None, "a file this run did not write")):
        other = loras / "other.safetensors"
        if meta is None:
            other.write_bytes(b"not a safetensors file")
        else:
            save_file({"w": torch.zeros(2)}, other, metadata=meta)
        before = other.read_bytes()
        with pytest.raises(LaunchError, match=f"other.safetensors already exists and is {who}; choose another "
                                              "output_name, or delete or rename that file"):
            publish_lora(run / "x.safetensors", other, run)
        with pytest.raises(LaunchError, match="already exists"):
            publish.check_publish_target(other, run, "bbbb")  # the node's check before training
        assert other.read_bytes() == before
    publish.check_publish_target(loras / "absent.safetensors", run, None)


def test_last_events_are_all_drained(tmp_path):
    """A trainer that prints its last events and exits at once: nothing is lost after the exit."""
    script = tmp_path / "burst.py"
    script.write_text("import json\nfor i in range(1, 201):\n"
                      "    print(json.dumps({'event': 'step', 'step': i}))\n"
                      "print(json.dumps({'event': 'finished', 'step': 200, 'reason': 'completed'}))\n")
    proc = TrainerProcess([sys.executable, str(script)], build_env(DeviceChoice(1)), tmp_path / "out").start()
    taken = [proc.next_event(5)]
    while proc.poll() is None:
        time.sleep(0.05)
    proc.wait(timeout=10)
    taken += proc.drain()
    assert [e["step"] for e in taken] == list(range(1, 201)) + [200] and taken[-1]["event"] == "finished"
    assert proc.drain() == []


def test_curve_of_a_resumed_run_reads_every_launch(tmp_path):
    import json as _json

    from training.trainer.curves import run_events, step_series

    lines = [{"event": "started", "step": 0}, {"event": "step", "step": 1, "reward": 9.0}]  # an older run
    lines += [{"event": "started", "step": 0}] + [{"event": "step", "step": i, "reward": 0.1 * i} for i in (1, 2, 3)]
    lines += [{"event": "started", "step": 2}] + [{"event": "step", "step": i, "reward": 0.2 * i} for i in (3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(_json.dumps, lines)) + "\nnoise\n")
    launch = lines[-3:]
    steps, rewards, _ = step_series(run_events(tmp_path, launch))
    assert steps == [1, 2, 3, 4] and rewards == [0.1, 0.2, 0.6000000000000001, 0.8]
    assert run_events(tmp_path / "missing", launch) == launch
