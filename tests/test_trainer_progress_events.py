"""The progress events are declared once: the trainer refuses an undeclared event or field, and the
docs and the web extension's list are generated from the declaration."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from training.trainer.progress import EVENTS, Progress, javascript_module, markdown_reference

PACK = Path(__file__).resolve().parents[1]


def test_an_undeclared_event_or_field_is_refused():
    progress = Progress(None, stream=io.StringIO())
    progress.emit("warning", step=1, message="fine")
    with pytest.raises(ValueError, match="undeclared progress event 'progres'"):
        progress.emit("progres", step=1)
    with pytest.raises(ValueError, match=r"undeclared field\(s\) \['rewardz'\]"):
        progress.emit("step", step=1, rewardz={})


def test_checkpoint_and_finish_reasons_are_declared():
    assert "gaming_guard" in EVENTS["checkpoint"]["reason"] and "fault" in EVENTS["checkpoint"]["reason"]
    assert "gaming_guard" in EVENTS["finished"]["reason"]


@pytest.mark.parametrize("path,generate", [("docs/progress-protocol.md", markdown_reference),
                                           ("web/progress_events.js", javascript_module)])
def test_generated_files_match_the_declaration(path, generate):
    assert (PACK / path).read_text(encoding="utf-8") == generate(), (
        f"{path} is stale: run python -m training.trainer.progress {'--markdown' if path.endswith('.md') else '--js'}"
        f" > {path}")
