"""A launched trainer process ends its process group itself once every rank is past the last
collective. Left to interpreter exit, gloo's worker threads can free tensors after Python is gone and
abort a finished rank with SIGABRT (seen in CI: the second of two machines exited 1 after a complete
run)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from training.demo import write_tiny_run
from training.trainer import cli, distributed
from training.trainer.progress import EXIT_ERROR, EXIT_OK, parse_events

ROOT = Path(__file__).resolve().parents[1]

GROUP_AFTER_END = textwrap.dedent("""
    import os, sys, torch.distributed as dist
    from training.trainer.distributed import end_process_group
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if sys.argv[1] != "-":
        os.environ["WORLD_SIZE"] = sys.argv[1]
    else:
        os.environ.pop("WORLD_SIZE", None)
    end_process_group()
    print(dist.is_initialized())
""")


@pytest.mark.parametrize("world_size, still_initialized", [("2", "False"), ("-", "True"), ("1", "True")])
def test_only_a_launched_run_destroys_its_group(world_size, still_initialized):
    """A run launched with several processes destroys its group; a run inside another process (the
    tests', a notebook's) keeps what its host set up."""
    done = subprocess.run([sys.executable, "-c", GROUP_AFTER_END, world_size], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == still_initialized


def _main_with(tmp_path, monkeypatch, train) -> tuple[int, list[str], list[dict]]:
    """cli.main on the tiny run with ``train`` in place of the recipe's: (exit code, calls, events)."""
    import training.trainer.recipe as recipe

    config = write_tiny_run(tmp_path)
    calls: list[str] = []
    monkeypatch.setattr(recipe, "train", lambda cfg, progress, decision=None: calls.append("train") or train())
    monkeypatch.setattr(distributed, "end_process_group", lambda: calls.append("end"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["--config", str(config)])
    return code, calls, parse_events(out.getvalue())


@pytest.mark.parametrize("code", [EXIT_OK, EXIT_ERROR])
def test_a_run_that_returns_ends_its_group_after_training(tmp_path, monkeypatch, code):
    """Finished, or stopped on every rank together (a fault all ranks agreed on): the group ends."""
    exit_code, calls, _ = _main_with(tmp_path, monkeypatch, lambda: code)
    assert exit_code == code and calls == ["train", "end"]


def test_a_rank_that_raises_does_not_wait_on_the_others(tmp_path, monkeypatch):
    """An exception leaves the ranks out of step: the process reports and exits, no group teardown."""
    def crash():
        raise RuntimeError("boom")

    exit_code, calls, events = _main_with(tmp_path, monkeypatch, crash)
    assert exit_code == EXIT_ERROR and calls == ["train"]
    assert events[-1]["event"] == "error" and "RuntimeError: boom" in events[-1]["message"]
