"""web/lora_pairing.js proposes the same partner files as training/lora_pairing.py."""

import json
import shutil
import subprocess

import pytest

from tests.helpers import PACK_ROOT
from training.lora_pairing import expert_of, partner_name

NAMES = [
    "Wan2.2-Fun-A14B-InP-high-noise-HPS2.1.safetensors", "Wan2.2-Fun-A14B-InP-low-noise-HPS2.1.safetensors",
    "Wan2.2-Fun-A14B-InP-low-noise-MPS.safetensors", "wan/x_High_Noise.safetensors", "wan/x_Low_Noise.safetensors",
    "lightx2v_HIGH.safetensors", "lightx2v_LOW.safetensors", "HIGH/a_HIGH.safetensors", "LOW/a_LOW.safetensors",
    "highres.safetensors", "lowres.safetensors", "slow_high_low.safetensors", "None",
    # words that are not expert markers
    "mps_low_light.safetensors", "high_detail.safetensors", "low-res.safetensors", "high/a_high.safetensors",
    "High-Contrast.safetensors", "yellow_noise.safetensors", "HIGHRES_LOW2.safetensors",
    # markers: camel case, no separator, upper case
    "wan22_HighNoise_v1.safetensors", "wan22_LowNoise_v1.safetensors", "highnoise.safetensors",
    "lownoise.safetensors", "x-HIGH-NOISE-y.safetensors", "x-LOW-NOISE-y.safetensors",
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
    got = dict(zip(NAMES, py))
    assert got[NAMES[0]] == ("high", NAMES[1]) and got["wan/x_High_Noise.safetensors"] == ("high", NAMES[4])
    assert got["HIGH/a_HIGH.safetensors"] == ("high", "LOW/a_LOW.safetensors")
    assert got["wan22_HighNoise_v1.safetensors"] == ("high", "wan22_LowNoise_v1.safetensors")
    assert got["lownoise.safetensors"] == ("low", "highnoise.safetensors")
    assert got["x-LOW-NOISE-y.safetensors"] == ("low", "x-HIGH-NOISE-y.safetensors")
    for name in ("highres.safetensors", "mps_low_light.safetensors", "high_detail.safetensors", "low-res.safetensors",
                 "high/a_high.safetensors", "High-Contrast.safetensors", "yellow_noise.safetensors",
                 "HIGHRES_LOW2.safetensors", "None"):
        assert got[name] == (None, None), name
