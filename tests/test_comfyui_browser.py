"""The frontend extension in headless Chromium against the real frontend served by the ComfyUI tier.

Chromium (Debian package ``chromium``) is driven over the Chrome DevTools Protocol with
websocket-client; nothing is downloaded. Screenshots go to the test's tmp folder.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.helpers.comfyui_train import train_prompt, write_tiny_models
from tests.helpers.workflow_layout import overlapping
from training.rewards.tiny import write_tiny_hps_checkpoint

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("no_prompt_left_running")]
WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
# Thumbnails: rendered from the frontend's canvas and compared with the committed .jpg beside each
# workflow; set this to 1 to write them instead (after a workflow changed).
WRITE_THUMBNAILS = os.environ.get("WAN_REWARD_WRITE_THUMBNAILS") == "1"
THUMBNAIL_SIZE = (800, 500)
THUMBNAIL_TOLERANCE = 8.0  # mean absolute difference per channel (0-255) of the committed and rendered ones
OUR_SCRIPTS = ("train_progress.js", "dual_lora_loader.js", "lora_pairing.js", "text_view.js", "ComfyUI-wan-reward-lora",
               "wan-reward-lora", "wan_reward")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--remote-allow-origins=*", "--remote-debugging-port=0", "--window-size=1600,1000"]


def chromium_binary() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Browser:
    """One page over CDP: evaluate JS, collect console errors and exceptions, screenshot."""

    def __init__(self, binary: str, profile: Path):
        import websocket

        self.process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                 if t["type"] == "page"]
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.console: list[str] = []
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def _record(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            frames = params.get("stackTrace", {}).get("callFrames", [])
            self.console.append(f"console.error: {args} @ {frames[0]['url'] if frames else ''}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.console.append(f"exception: {text} @ {details.get('url', '')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.console.append(f"log: {entry.get('text')} @ {entry.get('url', '')}")

    def call(self, method: str, **params):
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._record(message)

    def js(self, expression: str, timeout: float = 60):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True,
                           timeout=int(timeout * 1000))
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS failed: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str = ""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what or expression}; console: {self.console[-10:]}")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture(scope="module")
def page(comfyui, tmp_path_factory):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    # first-run dialogs off, so screenshots show the graph
    for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Workflow.ShowMissingModelsWarning", False)):
        requests.post(f"{comfyui.url}/settings/{key}", json=value, timeout=10).raise_for_status()
    browser = Browser(binary, tmp_path_factory.mktemp("chromium-profile"))
    browser.shots = tmp_path_factory.mktemp("screenshots")
    try:
        browser.call("Page.navigate", url=comfyui.url)
        browser.wait_for("!!(window.app && window.app.graph && window.LiteGraph && "
                         "window.app.extensions?.some(e => e.name === 'wan-reward-lora.TrainProgress'))",
                         timeout=90, what="the frontend with our extension")
        yield browser
    finally:
        browser.close()


def _our_errors(console: list[str]) -> list[str]:
    return [line for line in console if any(s in line for s in OUR_SCRIPTS)]


def test_extension_loads_without_console_errors(page):
    scripts = page.js("fetch('/extensions').then(r => r.json())")
    assert any(s.endswith("/train_progress.js") for s in scripts), scripts
    names = page.js("window.app.extensions.map(e => e.name)")
    assert "wan-reward-lora.TrainProgress" in names and "wan-reward-lora.DualLoraLoader" in names
    assert not _our_errors(page.console), page.console
    # any exception thrown in extension code (served under /extensions/) fails; the frontend's own
    # start-up noise (e.g. a settings migration in 1.27.10) is not ours to judge
    exceptions = [line for line in page.console if line.startswith("exception") and "/extensions/" in line]
    assert not exceptions, "\n".join(exceptions)


@pytest.mark.parametrize("name", sorted(p.name for p in WORKFLOWS.glob("*.json")))
def test_workflow_loads_without_missing_nodes(page, name):
    workflow = json.loads((WORKFLOWS / name).read_text(encoding="utf-8"))
    missing = page.js(f"""(async () => {{
        const wf = {json.dumps(workflow)};
        const missing = wf.nodes.map(n => n.type).filter(t => !(t in window.LiteGraph.registered_node_types));
        await window.app.loadGraphData(wf, true, true, {json.dumps(name)});
        await new Promise(r => setTimeout(r, 500));
        return missing;
    }})()""")
    assert missing == [], f"{name}: node types not registered in the frontend: {missing}"
    dialog = page.js("document.body.innerText.includes('Some Nodes Are Missing')")
    page.screenshot(page.shots / f"{name}.png")
    assert not dialog, f"{name}: the missing-node dialog appeared"
    count = page.js("window.app.graph._nodes.length")
    assert count == len(workflow["nodes"])
    # the frontend's widgets hold the file's values in the file's order (a shifted list shows here)
    loaded = dict(page.js("window.app.graph.serialize().nodes.map(n => [n.id, n.widgets_values ?? []])"))
    for node in workflow["nodes"]:
        got = loaded[node["id"]]
        if node["type"] == "PreviewAny":  # its preview widgets are frontend-only
            continue
        assert len(got) == len(node["widgets_values"]), (name, node["type"], got, node["widgets_values"])
        for a, b in zip(got, node["widgets_values"]):
            assert a == b or (isinstance(b, float) and abs(a - b) < 1e-9), (name, node["type"], got, node["widgets_values"])
    page.js("document.querySelectorAll('.p-dialog-mask').forEach(d => d.remove())")
    # no two node boxes (title bar included) overlap as the frontend lays them out
    boxes = {i: (x, y, x + w, y + h) for i, (x, y, w, h) in page.js(
        "window.app.graph._nodes.map(n => [n.id, Array.from(n.getBounding())])")}
    assert not overlapping(boxes), f"{name}: overlapping nodes {overlapping(boxes)}"
    _check_thumbnail(page, name)
    assert not _our_errors(page.console), page.console


# Fit the whole graph into the canvas, draw it at full detail, and return the canvas as a PNG data URL
# (the LiteGraph canvas only: no menus or DOM overlays) with the graph's box on it.
RENDER_GRAPH = """(async () => {
    const c = window.app.canvas, nodes = window.app.graph._nodes;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of nodes) { const [x, y, w, h] = n.getBounding(); x0 = Math.min(x0, x); y0 = Math.min(y0, y);
                             x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h); }
    x0 -= 40; y0 -= 70; x1 += 40; y1 += 40;
    const W = c.canvas.width, H = c.canvas.height;
    const scale = Math.min(W / (x1 - x0), H / (y1 - y0));
    c.show_info = false;
    c._min_font_size_for_lod = 0;  // draw text and widgets at any zoom
    c.updateLowQualityThreshold();
    c.ds.scale = scale;
    c.ds.offset[0] = -x0;
    c.ds.offset[1] = -y0;
    c.setDirty(true, true);
    c.draw(true, true);
    await new Promise(r => setTimeout(r, 300));
    c.draw(true, true);
    return [c.canvas.toDataURL("image/png"), Math.round((x1 - x0) * scale), Math.round((y1 - y0) * scale)];
})()"""


def _check_thumbnail(page, name: str) -> None:
    """The workflow's same-name .jpg, rendered from the real frontend: equal to the committed one, or
    written when WAN_REWARD_WRITE_THUMBNAILS=1."""
    import io

    page.call("Emulation.setDeviceMetricsOverride", width=3200, height=2000, deviceScaleFactor=1, mobile=False)
    try:
        time.sleep(0.8)  # the frontend resizes its canvas to the window
        data, width, height = page.js(RENDER_GRAPH)
    finally:
        page.call("Emulation.clearDeviceMetricsOverride")
    drawn = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGB").crop((0, 0, width, height))
    drawn.thumbnail(THUMBNAIL_SIZE, Image.LANCZOS)
    image = Image.new("RGB", THUMBNAIL_SIZE, (34, 34, 34))
    image.paste(drawn, ((THUMBNAIL_SIZE[0] - drawn.width) // 2, (THUMBNAIL_SIZE[1] - drawn.height) // 2))
    path = WORKFLOWS / name.replace(".json", ".jpg")
    if WRITE_THUMBNAILS:
        image.save(path, "JPEG", quality=85)
        return
    assert path.is_file(), f"{path.name} is missing: run the browser test with WAN_REWARD_WRITE_THUMBNAILS=1"
    rendered = np.asarray(Image.open(io.BytesIO(_jpeg(image))), dtype=np.float32)
    with Image.open(path) as committed:
        assert committed.size == THUMBNAIL_SIZE, (path.name, committed.size)
        difference = float(np.abs(np.asarray(committed.convert("RGB"), dtype=np.float32) - rendered).mean())
    assert difference <= THUMBNAIL_TOLERANCE, (
        f"{path.name} differs from the workflow as the frontend draws it (mean difference {difference:.1f}): the "
        "workflow changed; run the browser test with WAN_REWARD_WRITE_THUMBNAILS=1 and commit the thumbnail")


def _jpeg(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def test_thumbnail_check_can_fail(page):
    """The comparison above tells another workflow's thumbnail apart from this one's."""
    names = sorted(p.name for p in WORKFLOWS.glob("*.json"))
    a, b = (WORKFLOWS / names[0].replace(".json", ".jpg")), (WORKFLOWS / names[1].replace(".json", ".jpg"))
    if WRITE_THUMBNAILS or not (a.is_file() and b.is_file()):
        pytest.skip("thumbnails are being written")
    with Image.open(a) as first, Image.open(b) as second:
        difference = float(np.abs(np.asarray(first.convert("RGB"), dtype=np.float32)
                                  - np.asarray(second.convert("RGB"), dtype=np.float32)).mean())
    assert difference > THUMBNAIL_TOLERANCE, difference


def test_chart_appears_when_training_events_arrive(page, comfyui):
    write_tiny_models(comfyui)
    workflow = json.loads((WORKFLOWS / "reward_lora_train_and_preview.json").read_text(encoding="utf-8"))
    node_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "WanRewardLoraTrain")
    page.js(f"window.app.loadGraphData({json.dumps(workflow)}, true, true, 'train.json')")
    page.js("document.querySelectorAll('.p-dialog-mask').forEach(d => d.remove())")
    prompt = train_prompt("tiny_browser", steps=4)
    prompt[str(node_id)] = prompt.pop("1")  # the same node id as in the page's graph: events land on it
    client_id = page.js("window.comfyAPI?.api?.api?.clientId ?? sessionStorage.getItem('clientId')")
    response = requests.post(f"{comfyui.url}/prompt", json={"prompt": prompt, "client_id": client_id}, timeout=30)
    assert response.status_code == 200, response.text
    try:
        points = page.wait_for("Number(document.querySelector('canvas.wan-reward-train-chart')?.dataset.points || 0)"
                               " >= 4 && document.querySelector('canvas.wan-reward-train-chart').dataset.points",
                               timeout=240, what="the reward chart with 4 steps")
    except AssertionError as exc:
        history = comfyui.get(f"/history/{response.json()['prompt_id']}").json()
        raise AssertionError(f"{exc}\nhistory: {json.dumps(history)[:3000]}\nComfyUI log:\n{comfyui.log_tail(40)}") from exc
    assert int(points) == 4
    comfyui.wait(response.json()["prompt_id"], timeout=120)
    page.js(f"(() => {{ const n = window.app.graph.getNodeById({node_id}); "
            "window.app.canvas.centerOnNode?.(n); window.app.canvas.setDirty(true, true); })()")
    time.sleep(1.0)
    shot = page.screenshot(page.shots / "train_chart.png")
    assert shot.stat().st_size > 10_000
    _write_readme_picture(page, node_id)
    # the reward curve is drawn inside the plot area (the labels above it do not count)
    assert page.js(CURVE_PIXELS + "(document.querySelector('canvas.wan-reward-train-chart'))") > 20, \
        "no reward curve drawn"
    assert not _our_errors(page.console), page.console


README_PICTURE = WORKFLOWS.parent / "docs" / "images" / "reward_lora_train.png"


def _write_readme_picture(page, node_id: int) -> None:
    """The README's picture: the training workflow with the Train node's reward curve, as a user sees it.
    Written when WAN_REWARD_WRITE_THUMBNAILS=1 (the curve differs run by run, so it is not compared)."""
    if not WRITE_THUMBNAILS:
        assert README_PICTURE.is_file(), f"{README_PICTURE} is missing: run this test with WAN_REWARD_WRITE_THUMBNAILS=1"
        return
    page.call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)
    try:
        time.sleep(0.8)  # the frontend resizes its canvas to the window
        page.js("window.app.extensionManager?.setting?.set('Comfy.Minimap.Visible', false)")
        # The Train node's lower part (its curve and report) with the nodes around it, text readable.
        page.js(f"(() => {{ const c = window.app.canvas, n = window.app.graph.getNodeById({node_id}); "
                "const s = 0.8; c._min_font_size_for_lod = 0; c.updateLowQualityThreshold?.(); c.ds.scale = s; "
                "c.ds.offset[0] = 520 / s - n.pos[0]; "
                "c.ds.offset[1] = 990 / s - n.pos[1] - n.size[1]; c.setDirty(true, true); })()")
        time.sleep(1.0)
        README_PICTURE.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(README_PICTURE)
    finally:
        page.call("Emulation.clearDeviceMetricsOverride")


# Blue (#5b9bff) pixels inside the chart's plot area (canvas.dataset.plotBox, CSS px, border excluded).
CURVE_PIXELS = """((canvas) => {
    const box = JSON.parse(canvas.dataset.plotBox), r = canvas.width / canvas.clientWidth;
    const x = Math.ceil((box.x + 2) * r), y = Math.ceil((box.y + 2) * r);
    const w = Math.floor((box.w - 4) * r), h = Math.floor((box.h - 4) * r);
    const data = canvas.getContext("2d").getImageData(x, y, w, h).data;
    let n = 0;
    for (let i = 0; i < data.length; i += 4) if (data[i + 2] > 200 && data[i] < 140) n++;
    return n;
})"""


def test_curve_pixel_check_can_fail(page):
    """The measure above on drawChart's own output: 0 with no points (labels alone), many with points."""
    script = page.js("fetch('/extensions').then(r => r.json())")
    url = next(s for s in script if s.endswith("/train_progress.js"))
    counts = page.js(f"""(async () => {{
        const {{ drawChart }} = await import({json.dumps(url)});
        const count = {CURVE_PIXELS};
        const out = [];
        for (const points of [[], [{{step: 1, reward: 0.1, loss: 1}}, {{step: 2, reward: 0.3, loss: 0.5}},
                                   {{step: 3, reward: 0.2, loss: 0.4}}]]) {{
            const canvas = document.createElement("canvas");
            canvas.style.width = "300px"; canvas.style.height = "180px";
            document.body.appendChild(canvas);
            drawChart(canvas, {{points, status: "training", maxSteps: 3, eta: "1s"}});
            out.push(count(canvas));
            canvas.remove();
        }}
        return out;
    }})()""")
    assert counts[0] == 0 and counts[1] > 20, counts


def test_scores_shown_on_score_frames_node(page, comfyui):
    write_tiny_hps_checkpoint(comfyui.model_path("reward_models", "HPS_browser_tiny.safetensors"), seed=1)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(comfyui.input / "browser_frame.png")
    workflow = json.loads((WORKFLOWS / "reward_lora_score_and_compare.json").read_text(encoding="utf-8"))
    page.js(f"window.app.loadGraphData({json.dumps(workflow)}, true, true, 'compare.json')")
    page.js("document.querySelectorAll('.p-dialog-mask').forEach(d => d.remove())")
    score_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "WanRewardScoreFrames")
    prompt = {
        "9001": {"class_type": "LoadImage", "inputs": {"image": "browser_frame.png"}},
        "9002": {"class_type": "WanRewardLoadRewardModel", "inputs": {
            "model_name": "HPS_browser_tiny.safetensors", "dtype": "float32", "device": "cpu",
            "mps_variant": "official"}},
        str(score_id): {"class_type": "WanRewardScoreFrames", "inputs": {
            "reward_model": ["9002", 0], "images": ["9001", 0], "prompt": "a red fox", "frames": "all", "n": 1,
            "preprocess": "reference", "batch_size": 8}},
    }
    client_id = page.js("window.comfyAPI?.api?.api?.clientId ?? sessionStorage.getItem('clientId')")
    response = requests.post(f"{comfyui.url}/prompt", json={"prompt": prompt, "client_id": client_id}, timeout=30)
    assert response.status_code == 200, response.text
    comfyui.wait(response.json()["prompt_id"], timeout=120)
    text = page.wait_for("document.querySelector('pre.wan-reward-scores')?.textContent", timeout=30,
                         what="the scores on the Score Frames node")
    assert "hps" in text.lower() or "score" in text.lower()
    page.screenshot(page.shots / "score_frames.png")
    assert not _our_errors(page.console), page.console
