"""Shared fixtures and hooks: the ComfyUI tier (skipped without COMFYUI_PATH), a running ComfyUI.

Helpers that are not fixtures live in tests/helpers/ (``from tests.helpers.tiny_wan import ...``);
pytest finds the pack root through pyproject's ``pythonpath``.
"""

from __future__ import annotations

import pytest

from tests.helpers.comfyui_server import COMFYUI_SKIP_REASON, comfyui_path


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
    from tests.helpers.comfyui_server import start_server

    path = comfyui_path()
    if path is None:
        pytest.skip(COMFYUI_SKIP_REASON)
    server = start_server(path, tmp_path_factory.mktemp("comfyui"))
    yield server
    server.stop()


@pytest.fixture
def no_prompt_left_running(comfyui):
    """After the test, nothing runs in the ComfyUI queue: a failed test must not leave a training
    running into the next one (modules that train through ComfyUI use it for every test)."""
    from tests.helpers.comfyui_train import stop_all_prompts

    yield
    stop_all_prompts(comfyui)
