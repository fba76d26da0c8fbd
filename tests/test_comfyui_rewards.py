"""Reward nodes inside a real ComfyUI: LoadImage -> Score Frames with a tiny HPS checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.rewards import load_reward_model, motion_score
from training.rewards.tiny import write_tiny_hps_checkpoint

pytestmark = pytest.mark.comfyui
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def setup(comfyui):
    checkpoint = comfyui.model_path("reward_models", "tiny/HPS_v2.1_tiny.pt")
    write_tiny_hps_checkpoint(checkpoint, seed=4)
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(2):
        array = rng.integers(0, 256, (96, 160, 3), dtype=np.uint8)
        Image.fromarray(array).save(comfyui.input / f"reward_frame_{i}.png")
        arrays.append(array)
    frames = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    expected = load_reward_model(checkpoint).score(frames, [PROMPT] * 2)
    return frames, expected.tolist()


def _score_prompt(selection="all", model_name="tiny/HPS_v2.1_tiny.pt", mps_variant="official"):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "reward_frame_0.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "reward_frame_1.png"}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}},
        "4": {"class_type": "WanRewardLoadRewardModel",
              "inputs": {"model_name": model_name, "dtype": "float32", "device": "cpu", "mps_variant": mps_variant}},
        "5": {"class_type": "WanRewardScoreFrames",
              "inputs": {"reward_model": ["4", 0], "images": ["3", 0], "prompt": PROMPT, "frames": selection,
                         "n": 2, "preprocess": "reference", "batch_size": 8}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
    }


DISPLAY_NAMES = {  # ids never change (saved workflows name them); display names say what each is for
    "WanRewardDualLoraLoader": "Wan2.2 Dual LoRA Loader (High + Low Noise)",
    "WanRewardDualLoraStepSchedule": "Wan2.2 Dual LoRA Step Schedule (Hook Keyframes)",
    "WanRewardLoadRewardModel": "Load Reward Model (HPS, MPS, PickScore, Aesthetic)",
    "WanRewardScoreFrames": "Score Frames (Reward)",
    "WanRewardPickBest": "Pick Best Video by Reward (Best-of-N)",
}


def test_nodes_are_registered(comfyui, setup):
    info = comfyui.object_info()
    for node, display_name in DISPLAY_NAMES.items():
        assert info[node]["display_name"] == display_name, node
    options = info["WanRewardLoadRewardModel"]["input"]["required"]["model_name"]
    assert "tiny/HPS_v2.1_tiny.pt" in json.dumps(options)
    assert info["WanRewardScoreFrames"]["output"] == ["FLOAT", "STRING", "IMAGE"]


def test_reward_models_folder_lists_only_model_files(comfyui, setup):
    folder = comfyui.model_path("reward_models", "listing/x.safetensors").parent
    for name in ("a.safetensors", "B.SFT", "c.pth", "readme.txt", "d.pkl"):
        (folder / name).write_bytes(b"x")
    listed = {name for name in comfyui.get("/models/reward_models").json() if name.startswith("listing/")}
    assert listed == {"listing/a.safetensors", "listing/B.SFT", "listing/c.pth"}


_REGISTER_SCRIPT = textwrap.dedent("""
    import json, os, sys, types
    comfy, pack, extra, models = sys.argv[1:5]
    sys.path.insert(0, comfy)
    import folder_paths
    folder_paths.models_dir = models
    # what extra_model_paths.yaml's "reward_models: <extra>" does before custom nodes load
    folder_paths.add_model_folder_path("reward_models", extra)
    for name, path in (("pack", pack), ("pack.nodes", os.path.join(pack, "nodes"))):
        module = types.ModuleType(name)  # import nodes/folders.py without loading every node
        module.__path__ = [path]
        sys.modules[name] = module
    from pack.nodes.folders import register_model_folders
    register_model_folders()
    register_model_folders()  # idempotent
    paths, extensions = folder_paths.folder_names_and_paths["reward_models"]
    print(json.dumps({"paths": paths, "extensions": sorted(extensions),
                      "files": folder_paths.get_filename_list("reward_models")}))
""")


def test_register_model_folders_merges_extra_paths_and_restricts_extensions(tmp_path):
    """Against ComfyUI's own folder_paths, in ComfyUI's Python."""
    from tests.helpers.comfyui_server import comfyui_python

    comfy = Path(os.environ["COMFYUI_PATH"]).expanduser()
    extra, models = tmp_path / "extra", tmp_path / "models"
    (models / "reward_models").mkdir(parents=True)
    extra.mkdir()
    for name in ("HPS_v2.1_compressed.pt", "mps.Safetensors", "notes.txt", "graph.pt2"):
        (extra / name).write_bytes(b"x")
    (models / "reward_models" / "own.sft").write_bytes(b"x")
    pack = Path(__file__).resolve().parents[1]
    run = subprocess.run([comfyui_python(comfy), "-c", _REGISTER_SCRIPT, str(comfy), str(pack), str(extra), str(models)],
                         cwd=comfy, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["paths"] == [str(extra), str(models / "reward_models")]
    assert result["extensions"] == [".bin", ".ckpt", ".pt", ".pth", ".safetensors", ".sft"]
    assert result["files"] == ["HPS_v2.1_compressed.pt", "mps.Safetensors", "own.sft"]


def test_score_frames_returns_per_frame_scores_and_plot(comfyui, setup):
    frames, expected = setup
    outputs = comfyui.run(_score_prompt())
    report = json.loads(outputs["6"]["text"][0])
    assert report["model"] == "hps_v2.1" and report["frames"] == [0, 1]
    assert np.allclose(report["scores"], expected, atol=1e-5)
    assert abs(float(outputs["7"]["text"][0]) - np.mean(expected)) < 1e-5
    assert abs(report["motion"] - motion_score(frames)) < 1e-4 and report["motion"] > 1
    assert len(report["motion_per_step"]) == 1 and abs(report["motion_per_step"][0] - report["motion"]) < 1e-4
    node_text = outputs["5"]["text"][0]
    assert "hps_v2.1" in node_text and "motion" in node_text
    plot = outputs["5"]["images"][0]
    from pathlib import Path

    path = Path(comfyui.base) / plot["type"] / plot.get("subfolder", "") / plot["filename"]
    with Image.open(path) as image:
        assert image.size == (512, 288)


def test_first_frame_only(comfyui, setup):
    _, expected = setup
    report = json.loads(comfyui.run(_score_prompt("first"))["6"]["text"][0])
    assert report["frames"] == [0] and np.allclose(report["scores"], expected[:1], atol=1e-5)


def test_mps_variant_is_ignored_for_hps_files(comfyui, setup):
    """The node always passes its MPS variant; an HPS file scores as HPS whatever it says."""
    _, expected = setup
    report = json.loads(comfyui.run(_score_prompt(mps_variant="videox_fun"))["6"]["text"][0])
    assert report["model"] == "hps_v2.1" and report["variant"] is None
    assert np.allclose(report["scores"], expected, atol=1e-5)


def test_pick_best(comfyui, setup):
    _, expected = setup
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "reward_frame_0.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "reward_frame_1.png"}},
        "4": {"class_type": "WanRewardLoadRewardModel",
              "inputs": {"model_name": "tiny/HPS_v2.1_tiny.pt", "dtype": "float32", "device": "cpu",
                         "mps_variant": "official"}},
        "5": {"class_type": "WanRewardPickBest",
              "inputs": {"reward_model": ["4", 0], "prompt": PROMPT, "candidate_1": ["1", 0], "candidate_2": ["2", 0],
                         "frames": "all", "n": 1, "preprocess": "reference", "batch_size": 4, "top_k": 1,
                         "threshold": -1000.0}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
    }
    outputs = comfyui.run(prompt)
    assert int(outputs["6"]["text"][0]) == int(np.argmax(expected))  # 0-based
    assert outputs["5"]["text"][0].startswith(f"best: index {int(np.argmax(expected))} ")


def test_pick_best_resizes_other_sizes_and_never_returns_an_empty_top_k(comfyui, setup):
    frames, expected = setup
    small = np.random.default_rng(5).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(small).save(comfyui.input / "reward_frame_small.png")
    small_score = float(load_reward_model(comfyui.model_path("reward_models", "tiny/HPS_v2.1_tiny.pt")).score(
        torch.from_numpy(small).permute(2, 0, 1).float().unsqueeze(0) / 255, [PROMPT])[0])
    scores = {0: expected[0], 1: expected[1], 3: small_score}  # candidate_3 left unconnected
    ranking = sorted(scores, key=scores.get, reverse=True)

    def run(top_k, threshold):
        prompt = {
            "1": {"class_type": "LoadImage", "inputs": {"image": "reward_frame_0.png"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "reward_frame_1.png"}},
            "3": {"class_type": "LoadImage", "inputs": {"image": "reward_frame_small.png"}},
            "4": {"class_type": "WanRewardLoadRewardModel",
                  "inputs": {"model_name": "tiny/HPS_v2.1_tiny.pt", "dtype": "float32", "device": "cpu",
                             "mps_variant": "official"}},
            "5": {"class_type": "WanRewardPickBest",
                  "inputs": {"reward_model": ["4", 0], "prompt": PROMPT, "candidate_1": ["1", 0],
                             "candidate_2": ["2", 0], "candidate_4": ["3", 0], "frames": "all", "n": 1,
                             "preprocess": "reference", "batch_size": 4, "top_k": top_k, "threshold": threshold}},
            "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
            "7": {"class_type": "PreviewAny", "inputs": {"source": ["5", 5]}},
            "8": {"class_type": "GetImageSize", "inputs": {"image": ["5", 3]}},
            "9": {"class_type": "PreviewAny", "inputs": {"source": ["8", 2]}},
            "10": {"class_type": "GetImageSize", "inputs": {"image": ["5", 0]}},
            "11": {"class_type": "PreviewAny", "inputs": {"source": ["10", 0]}},
        }
        outputs = comfyui.run(prompt)
        return (int(outputs["6"]["text"][0]), json.loads(outputs["7"]["text"][0]), int(outputs["9"]["text"][0]),
                int(outputs["11"]["text"][0]))

    best_index, report, top_k_frames, best_width = run(3, -1000.0)
    assert best_index == ranking[0] and report["pick"]["ranking"] == ranking and report["pick"]["top_k"] == ranking
    assert [c["index"] for c in report["candidates"]] == [0, 1, 3]
    assert [c["input"] for c in report["candidates"]] == ["candidate_1", "candidate_2", "candidate_4"]
    assert np.allclose([c["mean"] for c in report["candidates"]], [scores[i] for i in (0, 1, 3)], atol=1e-5)
    assert top_k_frames == 3  # the other-size candidate is resized in, not dropped
    assert report["resized"] == ([3] if ranking[0] != 3 else [0, 1])
    assert best_width == (80 if ranking[0] == 3 else 160)
    best_index, report, top_k_frames, _ = run(2, 1000.0)  # nothing reaches the threshold
    assert top_k_frames == 1 and report["pick"]["top_k"] == [ranking[0]] and not report["pick"]["threshold_met"]
    assert report["pick"]["rejected"] == ranking[1:]


def test_two_models_weighted(comfyui, setup):
    from training.rewards.tiny import write_tiny_mps_checkpoint

    frames, expected = setup
    mps_path = write_tiny_mps_checkpoint(comfyui.model_path("reward_models", "mps_tiny.safetensors"), seed=1)
    mps_scores = load_reward_model(mps_path).score(frames, [PROMPT] * 2)
    prompt = _score_prompt()
    prompt["8"] = {"class_type": "WanRewardLoadRewardModel",
                   "inputs": {"model_name": "mps_tiny.safetensors", "dtype": "float32", "device": "cpu",
                              "mps_variant": "official"}}
    prompt["5"]["inputs"].update(weight=2.0, reward_model_2=["8", 0], weight_2=0.5)
    outputs = comfyui.run(prompt)
    report = json.loads(outputs["6"]["text"][0])
    want = 2.0 * np.mean(expected) + 0.5 * float(mps_scores.mean())
    assert abs(float(outputs["7"]["text"][0]) - want) < 1e-4 and abs(report["mean"] - want) < 1e-4
    assert [m["model"] for m in report["models"]] == ["hps_v2.1", "mps"]


def test_wrong_file_error_reaches_the_ui(comfyui):
    from safetensors.torch import save_file

    save_file({"blocks.0.weight": torch.zeros(2)}, comfyui.model_path("reward_models", "not_a_reward.safetensors"))
    message = comfyui.run_expecting_error(_score_prompt(model_name="not_a_reward.safetensors"))
    assert "not_a_reward.safetensors: not an HPS v2.1" in message and "blocks.0.weight" in message


def _four_frames():
    """[frame 0, frame 0, frame 1, frame 1]: two 2-frame videos, as VAE Decode of a batch of 2 gives them."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "reward_frame_0.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "reward_frame_1.png"}},
        "20": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["1", 0]}},
        "21": {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["2", 0]}},
        "3": {"class_type": "ImageBatch", "inputs": {"image1": ["20", 0], "image2": ["21", 0]}},
        "4": {"class_type": "WanRewardLoadRewardModel",
              "inputs": {"model_name": "tiny/HPS_v2.1_tiny.pt", "dtype": "float32", "device": "cpu",
                         "mps_variant": "official"}},
    }


def test_score_frames_scores_each_video_of_a_batch(comfyui, setup):
    _, expected = setup
    prompt = _four_frames()
    prompt["5"] = {"class_type": "WanRewardScoreFrames",
                   "inputs": {"reward_model": ["4", 0], "images": ["3", 0], "prompt": PROMPT, "frames": "all", "n": 1,
                              "preprocess": "reference", "batch_size": 8, "frames_per_video": 2}}
    prompt["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}}
    prompt["7"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}
    outputs = comfyui.run(prompt)
    report = json.loads(outputs["6"]["text"][0])
    assert [v["index"] for v in report["videos"]] == [0, 1] and report["frames_per_video"] == 2
    assert np.allclose(report["video_means"], expected, atol=1e-5)
    assert report["best_video"] == int(np.argmax(expected))
    assert abs(float(outputs["7"]["text"][0]) - np.mean(expected)) < 1e-5
    assert outputs["5"]["text"][0].startswith("2 videos of 2 frames")


def test_pick_best_from_a_batch_outputs_the_chosen_latents_and_saves_the_pick_in_png_metadata(comfyui, setup):
    _, expected = setup
    best = int(np.argmax(expected))
    prompt = _four_frames()
    prompt["8"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}}
    prompt["5"] = {"class_type": "WanRewardPickBest",
                   "inputs": {"reward_model": ["4", 0], "prompt": PROMPT, "candidate_1": ["3", 0], "latent": ["8", 0],
                              "frames": "all", "n": 1, "preprocess": "reference", "batch_size": 4, "top_k": 1,
                              "threshold": -1000.0, "frames_per_video": 0}}  # 0: counted from the latent batch
    prompt["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 5]}}
    prompt["9"] = {"class_type": "ProbeSaveLatent", "inputs": {"samples": ["5", 6], "filename": "picked_latent"}}
    prompt["10"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 3], "filename_prefix": "picked"}}
    outputs = comfyui.run(prompt, extra_data={"extra_pnginfo": {"workflow": {"nodes": []}}})
    report = json.loads(outputs["6"]["text"][0])
    assert report["pick"]["best"] == best and [c["input"] for c in report["candidates"]] == [
        "candidate_1[video 0]", "candidate_1[video 1]"]
    assert np.allclose([c["mean"] for c in report["candidates"]], expected, atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(comfyui.output / "picked_latent.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["batch_index"]) == [best]
        assert tuple(handle.get_tensor("samples").shape) == (1, 4, 8, 8)
    saved = outputs["10"]["images"][0]
    with Image.open(comfyui.output / saved["subfolder"] / saved["filename"]) as image:
        selection = json.loads(image.info["wan_reward_selection"])["5"]
        assert "workflow" in image.info
    assert selection["best_index"] == best and selection["top_k"] == [best]
    assert abs(selection["scores"][str(best)] - expected[best]) < 1e-5


def test_batch_errors_name_the_input(comfyui, setup):
    prompt = _four_frames()
    prompt["11"] = {"class_type": "ProbeMakeImage", "inputs": {"frames": 2, "channels": 2, "nan_frame": -1}}
    prompt["5"] = {"class_type": "WanRewardPickBest",
                   "inputs": {"reward_model": ["4", 0], "prompt": PROMPT, "candidate_1": ["1", 0],
                              "candidate_2": ["11", 0], "frames": "all", "n": 1, "preprocess": "reference",
                              "batch_size": 4, "top_k": 1, "threshold": -1000.0}}
    message = comfyui.run_expecting_error(prompt)
    assert "candidate_2 has 2 channels" in message and "[B, H, W, C]" in message and "permute" not in message
    prompt["11"]["inputs"].update(channels=3, nan_frame=1)
    prompt["12"] = {"class_type": "WanRewardScoreFrames",
                    "inputs": {"reward_model": ["4", 0], "images": ["11", 0], "prompt": PROMPT, "frames": "all",
                               "n": 1, "preprocess": "reference", "batch_size": 8}}
    del prompt["5"]
    assert "images has NaN values (in frames [1])" in comfyui.run_expecting_error(prompt)
    prompt["12"]["inputs"].update(images=["3", 0], frames_per_video=3)
    assert "images has 4 frames, not a whole number of videos of frames_per_video = 3" in \
        comfyui.run_expecting_error(prompt)


@pytest.mark.parametrize("kind", ["pickscore", "aesthetic"])
def test_new_reward_kinds_score_in_comfyui(comfyui, setup, kind):
    from training.rewards.tiny import write_tiny_aesthetic_checkpoint, write_tiny_pickscore_checkpoint

    frames, _ = setup
    writer = write_tiny_pickscore_checkpoint if kind == "pickscore" else write_tiny_aesthetic_checkpoint
    path = writer(comfyui.model_path("reward_models", f"{kind}_tiny.safetensors"), seed=2)
    expected = load_reward_model(path).score(frames, [PROMPT] * 2).tolist()
    prompt = _score_prompt(model_name=f"{kind}_tiny.safetensors")
    if kind == "aesthetic":
        prompt["5"]["inputs"]["prompt"] = ""  # the aesthetic predictor ignores the prompt
    outputs = comfyui.run(prompt)
    report = json.loads(outputs["6"]["text"][0])
    assert report["model"] == kind and np.allclose(report["scores"], expected, atol=1e-5)


_MEMORY_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    comfy, pack, checkpoint = sys.argv[1:4]
    sys.path[:0] = [comfy, pack]
    import torch
    import comfy.options
    comfy.options.enable_args_parsing()
    sys.argv = sys.argv[:1] + ["--cpu"]  # as the test server runs
    import comfy.model_management as mm
    spec = importlib.util.spec_from_file_location("reward_memory", pack + "/nodes/reward_memory.py")
    reward_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward_memory)
    from training.rewards import load_reward_model
    model = load_reward_model(checkpoint)
    frames = torch.rand(2, 3, 64, 64)
    expected = model.score(frames, "a fox").tolist()
    device = torch.device("cpu")  # what ComfyUI's --cpu gives; a GPU takes the same calls
    patcher = reward_memory.patcher_of(model, device)
    counts = []
    for _ in range(3):
        mm.load_models_gpu([patcher], memory_required=reward_memory.ACTIVATION_BYTES, force_full_load=True)
        counts.append(sum(1 for m in mm.current_loaded_models if m.model is patcher))
    same = reward_memory.patcher_of(model, device) is patcher
    scores = model.score(frames, "a fox").tolist()
    mm.unload_all_models()
    print(json.dumps({"counts": counts, "same": same, "size": patcher.model_size(), "device": str(patcher.model.device),
                      "params": sum(p.numel() * p.element_size() for p in model.parameters()),
                      "equal": max(abs(a - b) for a, b in zip(scores, expected)), "left": len(mm.current_loaded_models)}))
""")


def test_reward_model_patcher_under_comfyuis_model_management(tmp_path):
    """In ComfyUI's Python: the reward model's ModelPatcher is registered once with load_models_gpu and
    kept (three loads, one entry, nothing moved), its size is the model's, and unloading works."""
    from tests.helpers.comfyui_server import comfyui_python

    comfy = Path(os.environ["COMFYUI_PATH"]).expanduser()
    checkpoint = write_tiny_hps_checkpoint(tmp_path / "hps.safetensors", seed=3)
    pack = Path(__file__).resolve().parents[1]
    run = subprocess.run([comfyui_python(comfy), "-c", _MEMORY_SCRIPT, str(comfy), str(pack), checkpoint],
                         cwd=comfy, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["counts"] == [1, 1, 1] and result["same"] and result["device"] == "cpu"
    assert result["size"] >= result["params"] > 0 and result["equal"] < 1e-6 and result["left"] == 0
