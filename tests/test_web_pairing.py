"""web/lora_pairing.js proposes the same partner files as training/lora_pairing.py."""

import json
import shutil
import subprocess

import pytest

from training.lora_pairing import expert_of, partner_name

PACK_ROOT = __import__("conftest").PACK_ROOT
NAMES = [
    "Wan2.2-Fun-A14B-InP-high-noise-HPS2.1.safetensors", "Wan2.2-Fun-A14B-InP-low-noise-HPS2.1.safetensors",
    "Wan2.2-Fun-A14B-InP-low-noise-MPS.safetensors", "wan/x_High_Noise.safetensors", "wan/x_Low_Noise.safetensors",
    "lightx2v_HIGH.safetensors", "lightx2v_LOW.safetensors", "high/a_high.safetensors", "low/a_low.safetensors",
    "highres.safetensors", "lowres.safetensors", "slow_high_low.safetensors", "None",
]


@pytest.mark.skipif(shutil.which("node") is None, reason="node (Node.js) is not installed")
def test_js_and_python_pairing_agree(tmp_path):
    module = tmp_path / "lora_pairing.mjs"
    shutil.copy(PACK_ROOT / "web" / "lora_pairing.js", module)
    script = tmp_path / "run.mjs"
    script.write_text(
        f"import {{ expertOf, partnerName }} from {json.dumps(module.as_uri())};\n"
        f"const names = {json.dumps(NAMES)};\n"
        "console.log(JSON.stringify(names.map((n) => [expertOf(n), partnerName(n, names)])));\n")
    out = subprocess.run(["node", str(script)], capture_output=True, text=True, check=True).stdout
    js = [tuple(x) for x in json.loads(out)]
    py = [(expert_of(n), partner_name(n, NAMES)) for n in NAMES]
    assert js == py
    assert py[0] == ("high", NAMES[1]) and py[3] == ("high", NAMES[4]) and py[9] == (None, None)
