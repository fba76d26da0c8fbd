"""training/trainer/failures.py: the messages and hints of a failed run."""

from __future__ import annotations

import os

from training.trainer.failures import failure_message
from training.trainer.process import LOG_FILE, RunResult


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
