"""training/trainer/process.py: the trainer process started the way the launcher starts it, its event
stream, its graceful stop and the escalation to signals, the tree cleanup when the caller exits or dies."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time

import pytest

from training.trainer import launcher
from training.trainer.devices import DeviceChoice
from training.trainer.launcher import build_env
from training.trainer.process import TrainerProcess, strip_launcher_traceback
from training.trainer.progress import parse_event


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


def test_parse_event_skips_other_lines():
    assert parse_event('{"event": "step", "step": 3}') == {"event": "step", "step": 3}
    for line in ("[INFO] loading", "{not json", '{"no_event": 1}', "[1, 2]", ""):
        assert parse_event(line) is None


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
