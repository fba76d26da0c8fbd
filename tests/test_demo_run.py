"""The README's main job: `python -m training.demo` trains, the reward rises, the LoRA loads."""

import os
import subprocess
import sys

from tests.helpers import PACK_ROOT


def test_demo_with_a_relative_output_folder(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(PACK_ROOT))
    result = subprocess.run([sys.executable, "-m", "training.demo", "--steps", "10", "--out", "demo"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "(22 modules, 0 unmatched keys)" in result.stdout
    assert (tmp_path / "demo" / "output" / "tiny_reward_lora.safetensors").is_file()
