"""Frame selection, best-of-N picking and the score plot behind the reward nodes (no ComfyUI)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from training.rewards import load_reward_model
from training.rewards.report import (pick_best, pick_text, plot_scores, report_json, report_text, score_report,
                                     select_frames)
from training.rewards.tiny import write_tiny_hps_checkpoint


@pytest.mark.parametrize("selection,n,expected", [
    ("all", 1, list(range(10))), ("first", 5, [0]), ("every_nth", 3, [0, 3, 6, 9]),
    ("evenly_spaced", 4, [0, 3, 6, 9]), ("evenly_spaced", 2, [0, 9]), ("evenly_spaced", 50, list(range(10))),
])
def test_select_frames(selection, n, expected):
    assert select_frames(10, selection, n) == expected


def test_select_frames_errors():
    with pytest.raises(ValueError, match="IMAGE batch is empty"):
        select_frames(0, "all")
    with pytest.raises(ValueError, match="frame selection must be one of"):
        select_frames(3, "last")
    with pytest.raises(ValueError, match="n must be >= 1"):
        select_frames(3, "every_nth", 0)


def test_score_report_plot_and_pick(tmp_path):
    model = load_reward_model(write_tiny_hps_checkpoint(tmp_path / "hps.pt"))
    frames = torch.rand(6, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    report = score_report(model, frames, "a cat", "every_nth", 2, batch_size=2)
    assert report["frames"] == [0, 2, 4]
    direct = model.score(frames[[0, 2, 4]], ["a cat"] * 3)
    assert torch.allclose(torch.tensor(report["scores"]), direct, atol=1e-6)
    assert math.isclose(report["mean"], float(direct.mean()), abs_tol=1e-6) and report["motion"] > 1
    assert json.loads(report_json(report))["scores"] == report["scores"]
    steps = report["motion_per_step"]  # frame i -> i+1 over the whole clip, as motion_score
    assert len(steps) == 5 and math.isclose(sum(steps) / 5, report["motion"], rel_tol=1e-5)
    assert math.isclose(steps[2], float((frames[3] - frames[2]).abs().mean()) * 100, rel_tol=1e-5)
    assert "motion" in report_text(report) and "#2:" in report_text(report)
    plot = plot_scores(report)
    assert plot.shape == (1, 288, 512, 3) and 0 <= float(plot.min()) and float(plot.max()) <= 1
    assert float((plot < 0.5).float().mean()) > 0.005  # something is drawn

    reports = [dict(report, mean=m) for m in (0.1, 0.3, 0.2)]
    pick = pick_best(reports, top_k=2, threshold=0.25)
    assert pick["best"] == 1 and pick["ranking"] == [1, 2, 0] and pick["kept"] == [1] and pick["rejected"] == [2, 0]
    assert pick["top_k"] == [1] and pick["threshold_met"]


def test_pick_best_indices_and_empty_threshold():
    reports = [{"mean": m, "model": "hps_v2.1", "motion": 1.0} for m in (0.1, 0.3, 0.2)]
    # candidate inputs 1, 4 and 6 connected: indices are 0-based input slots
    pick = pick_best(reports, top_k=2, threshold=0.15, indices=[0, 3, 5])
    assert pick["best"] == 3 and pick["ranking"] == [3, 5, 0] and pick["top_k"] == [3, 5] and pick["rejected"] == [0]
    none = pick_best(reports, top_k=2, threshold=0.5)
    assert none["kept"] == [] and none["top_k"] == [1] and not none["threshold_met"] and none["rejected"] == [2, 0]
    text = pick_text(none, reports)
    assert text.startswith("best: index 1 (0.3000); top_k [1] (no candidate reaches the threshold")
    assert "1. index 1:" in text and "3. index 0:" in text


def test_combined_reports_and_panels(tmp_path):
    from training.rewards.report import combine_reports
    from training.rewards.tiny import write_tiny_mps_checkpoint

    hps = load_reward_model(write_tiny_hps_checkpoint(tmp_path / "hps.pt"))
    mps = load_reward_model(write_tiny_mps_checkpoint(tmp_path / "mps.safetensors"))
    frames = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    first, second = (score_report(m, frames, "a cat") for m in (hps, mps))
    combined = combine_reports([first, second], [1.0, 0.5])
    assert combined["scores"] == pytest.approx([a + 0.5 * b for a, b in zip(first["scores"], second["scores"])])
    assert combined["mean"] == pytest.approx(first["mean"] + 0.5 * second["mean"])
    assert combined["model"] == "1*hps_v2.1+0.5*mps" and combined["motion"] == first["motion"]
    assert plot_scores([combined, first, second]).shape == (1, 3 * 288, 512, 3)


def test_split_videos_in_batch_order_and_a_clear_error():
    from training.rewards.report import split_videos, video_summary

    frames = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 2, 2)
    videos = split_videos(frames, 3)
    assert [v[:, 0, 0, 0].tolist() for v in videos] == [[0, 1, 2], [3, 4, 5]]
    assert len(split_videos(frames, 0)) == 1
    with pytest.raises(ValueError, match=r"^candidate_1 has 6 frames, not a whole number of videos of "
                                         r"frames_per_video = 4"):
        split_videos(frames, 4, "candidate_1")
    summary = video_summary([{"mean": 0.2}, {"mean": 0.5}, {"mean": 0.1}])
    assert summary["best_video"] == 1 and summary["video_means"] == [0.2, 0.5, 0.1]
    assert summary["mean"] == pytest.approx(0.8 / 3)
