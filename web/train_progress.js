// Reward LoRA Train: a live reward/loss curve on the node from the "wan_reward.train" websocket
// events; Score Frames: the per-frame scores (the node's ui text) shown on the node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { EVENT_FIELDS } from "./progress_events.js";

const TRAIN_NODE = "WanRewardLoraTrain";
const SCORE_NODE = "WanRewardScoreFrames";
const EVENT = "wan_reward.train";
const CHART_HEIGHT = 180;
const PANEL_HEIGHT = 150; // the plan text and the latest sample frames under the chart
const runs = new Map(); // node id (string) -> {points: [{step, reward, loss}], status, maxSteps, plan, samples}

function fmt(value, digits = 4) {
  return typeof value === "number" && Number.isFinite(value) ? value.toPrecision(digits) : "-";
}

function fmtEta(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}

// Draw one series scaled to its own range; returns nothing.
function drawSeries(ctx, points, key, color, box) {
  const values = points.map((p) => p[key]).filter((v) => typeof v === "number" && Number.isFinite(v));
  if (!values.length) return;
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-12) { lo -= 0.5 * Math.max(Math.abs(lo), 1e-3); hi += 0.5 * Math.max(Math.abs(hi), 1e-3); }
  const first = points[0].step, span = Math.max(points[points.length - 1].step - first, 1);
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  let started = false;
  for (const p of points) {
    const v = p[key];
    if (typeof v !== "number" || !Number.isFinite(v)) continue;
    const x = box.x + (points.length > 1 ? ((p.step - first) / span) * box.w : box.w / 2);
    const y = box.y + box.h - ((v - lo) / (hi - lo)) * box.h;
    if (started) ctx.lineTo(x, y); else { ctx.moveTo(x, y); started = true; }
  }
  ctx.stroke();
  return { lo, hi };
}

export function drawChart(canvas, run) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(canvas.clientWidth, 120), height = Math.max(canvas.clientHeight, 80);
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "#1e1e1e";
  ctx.fillRect(0, 0, width, height);
  const box = { x: 8, y: 22, w: width - 16, h: height - 44 };
  ctx.strokeStyle = "#555";
  ctx.strokeRect(box.x, box.y, box.w, box.h);
  ctx.font = "11px sans-serif";
  const pts = run.points;
  const last = pts[pts.length - 1];
  ctx.fillStyle = "#5b9bff";
  ctx.fillText(`reward ${fmt(last?.reward)}`, 8, 14);
  ctx.fillStyle = "#ff9a4d";
  ctx.fillText(`loss ${fmt(last?.loss)}`, 110, 14);
  ctx.fillStyle = "#ccc";
  const stepText = last ? `step ${last.step}/${run.maxSteps ? run.maxSteps + run.offset : "?"}` : "waiting for the first step";
  ctx.fillText(`${stepText} ${run.eta ? "ETA " + run.eta : ""}`, 8, height - 8);
  if (run.status) ctx.fillText(run.status, Math.max(8, width - 8 - ctx.measureText(run.status).width), height - 8);
  if (pts.length) {
    drawSeries(ctx, pts, "reward", "#5b9bff", box);
    drawSeries(ctx, pts, "loss", "#ff9a4d", box);
  }
  canvas.dataset.points = String(pts.length);
  canvas.dataset.plotBox = JSON.stringify(box); // CSS px: where the curves are drawn (tests measure there)
  canvas.dataset.lastStep = last ? String(last.step) : "";
}

function chartWidget(node) {
  let widget = node.widgets?.find((w) => w.name === "reward_chart");
  if (widget) return widget;
  const box = document.createElement("div");
  box.className = "wan-reward-train-panel";
  const canvas = document.createElement("canvas");
  canvas.className = "wan-reward-train-chart";
  canvas.style.width = "100%";
  canvas.style.height = `${CHART_HEIGHT}px`;
  const plan = document.createElement("pre");
  plan.className = "wan-reward-train-plan";
  Object.assign(plan.style, { margin: "2px 0", fontSize: "10px", whiteSpace: "pre-wrap", maxHeight: "60px",
    overflow: "auto", color: "var(--input-text, #ddd)" });
  const samples = document.createElement("div");
  samples.className = "wan-reward-train-samples";
  Object.assign(samples.style, { display: "flex", gap: "2px", height: "84px", overflowX: "auto" });
  box.append(canvas, plan, samples);
  widget = node.addDOMWidget("reward_chart", "wan_reward_chart", box, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => CHART_HEIGHT + PANEL_HEIGHT,
    getHeight: () => CHART_HEIGHT + PANEL_HEIGHT,
  });
  widget.serialize = false;
  Object.assign(widget, { canvas, plan, samples });
  const size = node.computeSize?.();
  if (size) node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  return widget;
}

// The decoded training frames of the last "sample" event, fetched from ComfyUI's /view.
function showSamples(widget, images) {
  widget.samples.replaceChildren(...(images ?? []).map((ref) => {
    const img = document.createElement("img");
    const query = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type });
    img.src = api.apiURL(`/view?${query}`);
    img.className = "wan-reward-train-sample";
    Object.assign(img.style, { height: "80px", imageRendering: "pixelated" });
    return img;
  }));
}

function onTrainEvent(detail) {
  if (!detail || detail.node == null || !(detail.event in EVENT_FIELDS)) return;
  const id = String(detail.node);
  let run = runs.get(id);
  if (!run || ((detail.event === "started" || detail.event === "plan") && run.finished)) {
    run = { points: [], status: "", maxSteps: null, eta: "", finished: false, plan: "", samples: null,
      phase: null, offset: 0 };
    runs.set(id, run);
  }
  if (detail.phase && detail.phase !== run.phase) { // expert both: the low-noise phase follows the high one
    if (run.phase && run.maxSteps) run.offset += run.maxSteps;
    run.phase = detail.phase;
  }
  if (detail.max_steps) run.maxSteps = detail.max_steps;
  const step = (detail.step ?? 0) + run.offset;
  switch (detail.event) {
    case "plan":
      run.plan = detail.text ?? "";
      break;
    case "sample":
      run.samples = detail.images ?? [];
      break;
    case "started":
      run.status = detail.step > 0 ? `resumed at ${detail.step}` : "started";
      run.points = run.points.filter((p) => p.step <= step);
      break;
    case "step":
      run.points = run.points.filter((p) => p.step < step);
      run.points.push({ step, reward: detail.reward, loss: detail.loss });
      run.eta = fmtEta(detail.eta_seconds);
      run.status = "training";
      break;
    case "validation":
      run.status = `validation ${Object.entries(detail.rewards ?? {}).map(([k, v]) => `${k} ${fmt(v, 3)}`).join(" ")}`;
      break;
    case "checkpoint":
      run.status = `checkpoint at ${detail.step}`;
      break;
    case "warning":
      run.status = `warning: ${detail.message ?? ""}`;
      break;
    case "finished":
      run.status = detail.reason === "completed" ? "done" : `${detail.reason}`;
      run.eta = "";
      run.finished = true;
      break;
    case "error":
    case "cancelled":
      run.status = detail.event === "error" ? "failed" : "cancelled";
      run.eta = "";
      run.finished = true;
      break;
  }
  const node = app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
  if (!node || node.comfyClass !== TRAIN_NODE) return;
  const widget = chartWidget(node);
  drawChart(widget.canvas, run);
  widget.plan.textContent = run.plan;
  if (detail.event === "sample") showSamples(widget, run.samples);
  node.setDirtyCanvas?.(true, true);
}

function showScores(node, text) {
  let widget = node.widgets?.find((w) => w.name === "scores_view");
  if (!widget) {
    const pre = document.createElement("pre");
    pre.className = "wan-reward-scores";
    Object.assign(pre.style, { margin: "0", padding: "4px", fontSize: "11px", overflow: "auto", whiteSpace: "pre-wrap",
      background: "var(--comfy-input-bg, #222)", color: "var(--input-text, #ddd)", maxHeight: "160px" });
    widget = node.addDOMWidget("scores_view", "wan_reward_scores", pre, {
      serialize: false, hideOnZoom: false, getMinHeight: () => 60, getValue: () => pre.textContent,
      setValue: (v) => { pre.textContent = v; },
    });
    widget.serialize = false;
    widget.pre = pre;
  }
  widget.pre.textContent = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "wan-reward-lora.TrainProgress",
  setup() {
    api.addEventListener(EVENT, (e) => onTrainEvent(e.detail));
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === SCORE_NODE) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        onExecuted?.apply(this, arguments);
        const text = output?.text;
        if (text?.length) showScores(this, Array.isArray(text) ? text.join("\n") : String(text));
      };
    }
    if (nodeData.name === TRAIN_NODE) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        onExecuted?.apply(this, arguments);
        const run = runs.get(String(this.id));
        if (run) { run.status = "done"; drawChart(chartWidget(this).canvas, run); }
      };
    }
  },
});
