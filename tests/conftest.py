"""Shared fixtures: the pack on sys.path, temporary folders, the ComfyUI tier."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
for path in (str(PACK_ROOT), str(TESTS)):
    if path not in sys.path:
        sys.path.insert(0, path)

COMFYUI_SKIP_REASON = (
    "ComfyUI tier skipped: COMFYUI_PATH is not set to a ComfyUI checkout "
    "(set COMFYUI_PATH=~/ComfyUI to run it; .ci/run does so when ~/ComfyUI exists)"
)


def comfyui_path() -> Path | None:
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        return None
    path = Path(value).expanduser()
    return path if (path / "main.py").is_file() else None


def pytest_report_header(config):
    path = comfyui_path()
    return f"ComfyUI tier: {'ON, ' + str(path) if path else 'OFF (COMFYUI_PATH not set or not a ComfyUI checkout)'}"


def pytest_collection_modifyitems(config, items):
    if comfyui_path() is None:
        skip = pytest.mark.skip(reason=COMFYUI_SKIP_REASON)
        for item in items:
            if item.get_closest_marker("comfyui") is not None:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if comfyui_path() is None:
        terminalreporter.write_line(COMFYUI_SKIP_REASON, yellow=True)


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    """A running ComfyUI with this pack loaded (session-wide: it takes a minute to start)."""
    from comfyui_server import start_server

    path = comfyui_path()
    if path is None:
        pytest.skip(COMFYUI_SKIP_REASON)
    server = start_server(path, tmp_path_factory.mktemp("comfyui"))
    yield server
    server.stop()
