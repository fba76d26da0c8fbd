"""Run control: a trainer whose launching ComfyUI vanished stops (and saves) by itself."""

import os
import subprocess
import sys

from training.trainer.progress import PARENT_PID_ENV, Control


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stop_when_the_parent_is_gone(tmp_path, monkeypatch):
    control = Control(tmp_path)
    monkeypatch.setenv(PARENT_PID_ENV, str(os.getpid()))
    assert control.poll()["stop"] is False
    monkeypatch.setenv(PARENT_PID_ENV, str(_dead_pid()))
    assert control.poll()["stop"] is True


def test_no_parent_watch_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    assert Control(tmp_path).poll() == {"stop": False, "save_now": False, "sample_now": False}


def test_the_launcher_and_agent_sigterms_of_one_stop_count_once(tmp_path):
    import signal

    control = Control(tmp_path)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        control.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the agent's copy, a moment later: still a clean stop
        assert control.poll()["stop"] is True
        control.signalled_at -= 10  # a separate signal much later aborts at once
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("a second, separate SIGTERM must abort")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
