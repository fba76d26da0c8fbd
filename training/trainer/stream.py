"""Linear weights kept where they are stored and brought to the compute device and dtype only for
the matmul that uses them: the forward, and again the backward (never kept in between).

Used for the experts' Linear layers (they hold almost every weight of a Wan expert):
- memory mode ``low``: the weights stay in host memory (pinned on CUDA) and each layer's weight
  is copied to the GPU when the layer runs, the next layer's copy already under way on a side
  stream while this one computes;
- fp8 files: the weights stay fp8 (``scale_weight`` of ComfyUI's fp8 "scaled" files applied at
  use), cast layer by layer, never expanded to a whole bf16 copy.

Written by hand because diffusers' group offloading and layerwise casting are made for
inference: they move or re-cast every parameter of a group in place (the trainable LoRA adapters
too, and a weight moved back after the forward breaks the backward that needs it), and they do not
know ComfyUI's fp8 scales. The LoRA adapters (peft) wrap these layers and stay on the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _StreamedMatmul(torch.autograd.Function):
    """y = x W^T (+ b) where W is fetched for the forward and fetched again for the backward."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        weight = layer.fetch(x.device, x.dtype)
        return F.linear(x, weight, layer.bias_for(x.device, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.layer.fetch(grad.device, grad.dtype, backward=True)
        return grad @ weight, None  # the weights are frozen: only the input gets a gradient


class StreamedLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose frozen weight stays on its own device and dtype (and ``scale``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None = None,
                 prefetcher: "Prefetcher | None" = None):
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.register_buffer("scale", scale, persistent=False)
        self.prefetcher = prefetcher

    def fetch(self, device: torch.device, dtype: torch.dtype, backward: bool = False) -> torch.Tensor:
        """The weight on ``device`` in ``dtype`` (scaled), a temporary the caller drops after use."""
        if self.prefetcher is not None and self.weight.device != device:
            weight = self.prefetcher.fetch(self, device, backward)
        else:
            weight = self.weight.to(device, non_blocking=True)
        weight = weight.to(dtype)
        if self.scale is not None:
            weight = weight * self.scale.to(device, dtype)
        return weight

    def bias_for(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StreamedMatmul.apply(x, self)


class Prefetcher:
    """One-ahead copies of host weights to a CUDA device on a side stream: while a layer computes,
    the weight of the layer that ran after it last time (forward and backward orders learnt apart)
    is already on its way."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.next_of: dict[tuple[bool, int], "StreamedLinear"] = {}
        self.last: dict[bool, StreamedLinear] = {}
        self.pending: dict[int, tuple[torch.cuda.Event, torch.Tensor]] = {}

    def fetch(self, layer: StreamedLinear, device: torch.device, backward: bool = False) -> torch.Tensor:
        current = torch.cuda.current_stream(device)
        ready = self.pending.pop(id(layer), None)
        if ready is not None:
            event, weight = ready
            current.wait_event(event)
            weight.record_stream(current)
        else:
            weight = layer.weight.to(device, non_blocking=True)
        previous = self.last.get(backward)
        if previous is not None:
            self.next_of[(backward, id(previous))] = layer
        self.last[backward] = layer
        following = self.next_of.get((backward, id(layer)))
        if following is not None and id(following) not in self.pending and len(self.pending) < 2:
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                copy = following.weight.to(device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.pending[id(following)] = (event, copy)
        return weight


def _streamed(linear: torch.nn.Linear, scale, prefetcher) -> StreamedLinear:
    return StreamedLinear(linear.weight.data, None if linear.bias is None else linear.bias.data, scale, prefetcher)


_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def stream_linears(model: torch.nn.Module, scales: dict[str, torch.Tensor] | None = None,
                   prefetcher: Prefetcher | None = None, fp8_only: bool = False) -> int:
    """Replace every frozen Linear of ``model`` (also those peft wraps as ``base_layer``; with
    ``fp8_only`` only those holding fp8 weights) by a StreamedLinear over the same weight tensor;
    ``scales``: module path -> fp8 scale. Returns the number replaced. The weights stay where they
    are: move them (host, pinned) or not, as the placement decides."""
    scales = scales or {}
    count = 0
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or child.weight.requires_grad:
                continue
            if fp8_only and child.weight.dtype not in _FP8:
                continue
            full = f"{path}.{name}" if path else name
            key = full.replace(".base_layer", "")
            setattr(module, name, _streamed(child, scales.get(key), prefetcher))
            count += 1
    return count


def pin_weights(model: torch.nn.Module) -> None:
    """Page-locked host copies of the StreamedLinear weights, so their copies to the GPU run
    asynchronously (on CUDA only; the file-backed pages are then no longer referenced)."""
    for module in model.modules():
        if isinstance(module, StreamedLinear) and module.weight.device.type == "cpu":
            module.weight.data = module.weight.data.pin_memory()


def move_except_streamed(model: torch.nn.Module, device: torch.device) -> None:
    """Every parameter and buffer of ``model`` to ``device`` except the StreamedLinear weights (their
    biases and scales go, they are small)."""
    streamed = {id(m.weight) for m in model.modules() if isinstance(m, StreamedLinear)}
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if id(param) not in streamed:
                    param.data = param.data.to(device)
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None:
                    setattr(module, name, buffer.to(device))
