"""training/trainer/curves.py: the training curve and final scores from a run's events, across launches."""

from __future__ import annotations


def test_curve_and_scores_from_events():
    from training.trainer.curves import final_scores, plot_training_curve, step_series

    events = [{"event": "started", "step": 0}]
    events += [{"event": "step", "step": i, "reward": 0.1 * i, "loss": 1 - 0.1 * i, "rewards": {"hps": 0.1 * i}}
               for i in range(1, 6)]
    events += [{"event": "step", "step": 5, "reward": 0.55, "loss": 0.45, "rewards": {"hps": 0.55}},  # resumed
               {"event": "step", "step": 6, "reward": 0.6, "loss": 0.4, "rewards": {"hps": 0.6}},
               {"event": "warning", "step": 6, "message": "reward gaming suspected"},
               {"event": "finished", "step": 6, "reason": "completed", "lora_path": "/x.safetensors"}]
    steps, rewards, losses = step_series(events)
    assert steps == [1, 2, 3, 4, 5, 6] and rewards[4] == 0.55 and losses[-1] == 0.4
    summary = final_scores(events)
    assert summary["steps"] == 6 and summary["reason"] == "completed" and summary["reward_first"] == 0.1
    assert summary["reward_last"] == 0.6 and summary["rewards_last"] == {"hps": 0.6}
    assert summary["warnings"] == ["reward gaming suspected"]
    image = plot_training_curve(events, width=320, height=160)
    assert image.shape == (1, 160, 320, 3) and 0 <= float(image.min()) and float(image.max()) <= 1
    px = (image[0] * 255).round()
    blue = ((px[..., 2] > 150) & (px[..., 0] < 80)).sum()
    orange = ((px[..., 0] > 150) & (px[..., 2] < 80)).sum()
    assert blue > 50 and orange > 50  # both curves drawn
    empty = plot_training_curve([], width=320, height=160)
    assert ((empty[0] * 255).round()[..., 2] > 150).logical_and((empty[0] * 255).round()[..., 0] < 80).sum() < 50


def test_curve_of_a_resumed_run_reads_every_launch(tmp_path):
    import json as _json

    from training.trainer.curves import run_events, step_series

    lines = [{"event": "started", "step": 0}, {"event": "step", "step": 1, "reward": 9.0}]  # an older run
    lines += [{"event": "started", "step": 0}] + [{"event": "step", "step": i, "reward": 0.1 * i} for i in (1, 2, 3)]
    lines += [{"event": "started", "step": 2}] + [{"event": "step", "step": i, "reward": 0.2 * i} for i in (3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(_json.dumps, lines)) + "\nnoise\n")
    launch = lines[-3:]
    steps, rewards, _ = step_series(run_events(tmp_path, launch))
    assert steps == [1, 2, 3, 4] and rewards == [0.1, 0.2, 0.6000000000000001, 0.8]
    assert run_events(tmp_path / "missing", launch) == launch
