"""Start a real ComfyUI with this pack loaded, and talk to it over HTTP.

Used by the ComfyUI tier of the tests (``COMFYUI_PATH`` must point to a ComfyUI
checkout). The server gets its own base directory (models, input, output, temp,
user), a free port on 127.0.0.1, and loads the pack through an
``extra_model_paths.yaml`` ``custom_nodes:`` entry whose folder holds a link named
like a cloned pack (not a Python identifier, as users' clones are).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

from tests.helpers import PACK_ROOT

PACK_FOLDER_NAME = "ComfyUI-wan-reward-lora"
# Test-only packs loaded beside ours (never shipped): (folder name, path).
TEST_PACKS = (("comfy_probe_pack", Path(__file__).resolve().parent / "comfy_probe_pack"),)
MODEL_FOLDERS = ("diffusion_models", "loras", "vae", "text_encoders", "reward_models", "checkpoints")
COMFYUI_SKIP_REASON = (
    "ComfyUI tier skipped: COMFYUI_PATH is not set to a ComfyUI checkout "
    "(set COMFYUI_PATH=~/ComfyUI to run it; .ci/run does so when ~/ComfyUI exists)"
)


def comfyui_path() -> Path | None:
    """The ComfyUI checkout of the ComfyUI tier (COMFYUI_PATH), or None when the tier is off."""
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        return None
    path = Path(value).expanduser()
    return path if (path / "main.py").is_file() else None


def comfyui_python(comfy_path: Path) -> str:
    """ComfyUI's own venv if it has one (~/ComfyUI/.venv), else this interpreter."""
    for candidate in (comfy_path / ".venv" / "bin" / "python", comfy_path / "venv" / "bin" / "python"):
        if candidate.exists():
            return str(candidate)
    return sys.executable


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyUIServer:
    def __init__(self, comfy_path: Path, base_dir: Path):
        self.comfy_path = comfy_path
        self.base = base_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base_dir / "comfyui.log"
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    # ----- folders ---------------------------------------------------------
    @property
    def models(self) -> Path:
        return self.base / "models"

    def model_path(self, folder: str, name: str) -> Path:
        path = self.models / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def output(self) -> Path:
        return self.base / "output"

    @property
    def input(self) -> Path:
        return self.base / "input"

    # ----- lifecycle -------------------------------------------------------
    def start(self, timeout: float = 300) -> None:
        for folder in MODEL_FOLDERS:
            (self.models / folder).mkdir(parents=True, exist_ok=True)
        for folder in ("input", "output", "temp", "user", "custom_nodes"):
            (self.base / folder).mkdir(parents=True, exist_ok=True)
        packs = self.base / "packs"
        packs.mkdir(exist_ok=True)
        for name, target in ((PACK_FOLDER_NAME, PACK_ROOT), *TEST_PACKS):
            link = packs / name
            if not link.exists() and target.is_dir():
                link.symlink_to(target, target_is_directory=True)
        extra = self.base / "extra_model_paths.yaml"
        extra.write_text(f"wan_reward_tests:\n  custom_nodes: {packs}\n")
        cmd = [
            comfyui_python(self.comfy_path), "main.py", "--cpu",
            "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base),
            "--extra-model-paths-config", str(extra),
            "--database-url", "sqlite:///:memory:",
            "--disable-auto-launch", "--disable-api-nodes",
        ]
        # Training locks are per machine; give each test server its own, so parallel
        # test runs on one machine do not see each other's trainings.
        env = dict(os.environ, PYTHONUNBUFFERED="1", WAN_REWARD_LOCK_DIR=str(self.base / "locks"))
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            cmd, cwd=self.comfy_path, stdout=self._log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/system_stats", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(15)
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ----- API -------------------------------------------------------------
    def get(self, route: str, **kwargs):
        response = requests.get(f"{self.url}{route}", timeout=kwargs.pop("timeout", 60), **kwargs)
        response.raise_for_status()
        return response

    def listen(self, event_type: str) -> "EventListener":
        """Collect this client's websocket messages of ``event_type`` (start before queueing)."""
        return EventListener(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", event_type)

    def object_info(self) -> dict:
        return self.get("/object_info").json()

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        """POST an API-format prompt (and the frontend's ``extra_data``, e.g. ``extra_pnginfo``); returns its
        prompt id (raises with node errors)."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data is not None:
            body["extra_data"] = extra_data
        response = requests.post(f"{self.url}/prompt", json=body, timeout=60)
        if response.status_code != 200:
            raise AssertionError(f"prompt rejected ({response.status_code}): {response.text}")
        return response.json()["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Wait for a prompt to finish; returns its /history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}").json()
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600, extra_data: dict | None = None) -> dict:
        """Queue a prompt, wait, and return the outputs; raise with the error if it failed."""
        entry = self.wait(self.queue(prompt, extra_data), timeout)
        if entry["status"]["status_str"] != "success":
            raise PromptFailed(entry)
        return entry["outputs"]

    def run_expecting_error(self, prompt: dict, timeout: float = 600) -> str:
        """Queue a prompt that must fail; returns the executor's error message."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"]["status_str"] == "success":
            raise AssertionError(f"prompt succeeded but an error was expected: {entry['outputs']}")
        return PromptFailed(entry).message


class EventListener:
    """A websocket client in a thread, keeping the ``data`` of every JSON message of one type."""

    def __init__(self, url: str, event_type: str):
        import threading

        import websocket

        self.event_type = event_type
        self.messages: list[dict] = []
        self._ws = websocket.create_connection(url, timeout=5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import websocket

        while not self._stop.is_set():
            try:
                raw = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError):
                return
            if not isinstance(raw, str) or not raw:
                continue  # binary previews; an empty frame when the socket closes
            message = json.loads(raw)
            if message.get("type") == self.event_type:
                self.messages.append(message["data"])

    def close(self) -> None:
        self._stop.set()
        self._ws.close()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PromptFailed(AssertionError):
    def __init__(self, entry: dict):
        self.entry = entry
        self.message = ""
        for kind, data in entry.get("status", {}).get("messages", []):
            if kind == "execution_error":
                self.message = f"{data.get('exception_type')}: {data.get('exception_message')}"
        super().__init__(self.message or json.dumps(entry.get("status"))[:2000])


def start_server(comfy_path: Path, base_dir: Path) -> ComfyUIServer:
    shutil.rmtree(base_dir, ignore_errors=True)
    base_dir.mkdir(parents=True)
    server = ComfyUIServer(comfy_path, base_dir)
    server.start()
    return server
