// A read-only text panel on a node (the frontend's DOM widget API, LGraphNode.addDOMWidget): the
// load report of the LoRA nodes, the scores of Score Frames. Not saved with the workflow.
export function showText(node, name, className, text, maxHeight = 160) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (!widget) {
    const pre = document.createElement("pre");
    pre.className = className;
    Object.assign(pre.style, { margin: "0", padding: "4px", fontSize: "11px", overflow: "auto", whiteSpace: "pre-wrap",
      background: "var(--comfy-input-bg, #222)", color: "var(--input-text, #ddd)", maxHeight: `${maxHeight}px` });
    widget = node.addDOMWidget(name, className, pre, {
      serialize: false, hideOnZoom: false, getMinHeight: () => 60, getValue: () => pre.textContent,
      setValue: (v) => { pre.textContent = v; },
    });
    widget.serialize = false;
    widget.pre = pre;
  }
  widget.pre.textContent = text;
  node.setDirtyCanvas?.(true, true);
  return widget;
}

// Show the node's ui text (``{"text": [...]}`` of its execution output) with ``showText``.
export function showTextOnExecuted(nodeType, name, className, maxHeight) {
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (output) {
    onExecuted?.apply(this, arguments);
    const text = output?.text;
    if (text?.length) showText(this, name, className, Array.isArray(text) ? text.join("\n") : String(text), maxHeight);
  };
}
