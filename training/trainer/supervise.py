"""Follow a started trainer to its end: hand each progress event to the caller, stop the run when
the caller asks (Cancel), and leave no process of it behind. The ComfyUI node and the phase
runner both use this instead of pumping events themselves."""

from __future__ import annotations

from collections.abc import Callable

from .launcher import RunResult, TrainerProcess

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
    if process.group_alive():  # the launcher exited but left processes: end them
        process.stop(grace_s=0.0, kill_s=kill_s)
    return process.result()
