"""Wan Dual LoRA Loader vs two core LoraLoaderModelOnly: time to patched weights, same result.

Two Wan-shaped experts (40 blocks, dim 512 by default, native key layout), one
VideoX-Fun-format LoRA per expert (the reference's layout: attention + embeddings, no FFN),
loaded by each method and then applied the way a sampler does (``load_models_gpu``).
Both methods run once as a warm-up (which also checks that every patched weight is
bit-identical), then ``--repeat`` times each, alternating which goes first. Prints the
medians of the loader nodes alone and with the patches applied, and their ratio
ours/core against the goal (<= 1.05). Exits 1 if the weights differ. Runs with ComfyUI
as a library, on CPU:

    ~/ComfyUI/.venv/bin/python bench/dual_lora_load.py --comfyui ~/ComfyUI
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]
GOAL_RATIO = 1.05  # ours / core, time to patched weights


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=str(Path.home() / "ComfyUI"), help="ComfyUI checkout")
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7, help="timed runs of each method")
    return parser.parse_args()


def import_comfy(path: str):
    sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI reads its own flags at import
    sys.path.insert(0, path)
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.model_management  # noqa: F401  (sets up the CPU device)


def import_loader():
    """Our node module, with the pack as a package but without its nodes/__init__."""
    for name, folder in (("wan_reward_lora", PACK), ("wan_reward_lora.nodes", PACK / "nodes")):
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        sys.modules[name] = module
    import importlib
    return importlib.import_module("wan_reward_lora.nodes.lora_loader")


def main():
    args = parse_args()
    import_comfy(args.comfyui)
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths
    import nodes as core_nodes
    import torch
    from safetensors.torch import save_file

    sys.path.append(str(PACK))  # after ComfyUI: its "nodes" (and "tests") must win
    loader = import_loader()
    from wan_reward_lora.tests.helpers.tiny_wan import linear_module_names, random_lora, tiny_wan_state_dict

    torch.set_grad_enabled(False)

    shape = dict(dim=args.dim, ffn_dim=2 * args.dim, num_layers=args.blocks, head_dim=128)
    experts = {e: comfy.sd.load_diffusion_model_state_dict(tiny_wan_state_dict(seed=s, **shape))
               for e, s in (("high", 0), ("low", 1))}
    modules = linear_module_names(args.blocks, include_ffn=False)
    folder = Path(tempfile.mkdtemp(prefix="wan_lora_bench_"))
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    names = {}
    for expert, seed in (("high", 2), ("low", 3)):
        sd = experts[expert].model.state_dict()
        lora = random_lora({k[len("diffusion_model."):]: v for k, v in sd.items()}, modules,
                           rank=args.rank, alpha=args.rank / 2, seed=seed)
        tensors = {}
        for m, (up, down, alpha) in lora.items():
            base = "lora_unet__" + m.replace(".", "_")
            tensors[base + ".lora_up.weight"] = up.bfloat16()
            tensors[base + ".lora_down.weight"] = down.bfloat16()
            tensors[base + ".alpha"] = torch.tensor(alpha).bfloat16()
        names[expert] = f"bench-{expert}-noise.safetensors"
        save_file(tensors, str(folder / names[expert]))
    size_mb = sum((folder / n).stat().st_size for n in names.values()) / 2**20
    strengths = {"high": 0.6, "low": 0.7}

    def apply(patchers):
        for patcher in patchers:
            mm.load_models_gpu([patcher], force_full_load=True)

    def snapshot(patcher):
        return {k: v.clone() for k, v in patcher.model.state_dict().items()}

    def run_core(nodes=None):
        """Two core nodes, one per expert, as in a workflow (each caches its last file)."""
        nodes = nodes or {e: core_nodes.LoraLoaderModelOnly() for e in ("high", "low")}
        start = time.perf_counter()
        out = [nodes[e].load_lora_model_only(experts[e], names[e], strengths[e])[0] for e in ("high", "low")]
        middle = time.perf_counter()
        apply(out)
        return (middle - start, time.perf_counter() - middle), out

    def run_ours(clear=True):
        if clear:
            loader._CACHE.clear()
        start = time.perf_counter()
        high, low, _ = loader.WanRewardDualLoraLoader.execute(
            experts["high"], experts["low"], names["high"], strengths["high"], names["low"], strengths["low"]).args
        middle = time.perf_counter()
        apply([high, low])
        return (middle - start, time.perf_counter() - middle), [high, low]

    # warm-up, once per method: also the equal-weights check
    _, core_out = run_core()
    core_weights = [snapshot(p) for p in core_out]
    mm.unload_all_models()
    _, our_out = run_ours()
    our_weights = [snapshot(p) for p in our_out]
    mm.unload_all_models()
    changed = sum(not torch.equal(core_weights[i][k], experts[e].model.state_dict()[k])
                  for i, e in enumerate(("high", "low")) for k in core_weights[i])
    equal = all(torch.equal(core_weights[i][k], our_weights[i][k]) for i in range(2) for k in core_weights[i])
    del core_out, our_out, core_weights, our_weights

    def measure(runs):
        """{method: ([node seconds], [apply seconds])}; the order alternates (core first on even
        repeats, ours first on odd ones) so that neither always pays for the other's leftovers."""
        result = {name: ([], []) for name in runs}
        names = list(runs)
        for i in range(args.repeat):
            strengths["high"] = strengths["low"] = 0.5 + 0.01 * (i + 1)
            for name in (names if i % 2 == 0 else names[::-1]):
                (node_s, apply_s), _ = runs[name]()
                result[name][0].append(node_s)
                result[name][1].append(apply_s)
                mm.unload_all_models()
        return result

    cold = measure({"core": run_core, "ours": run_ours})
    core_pair = {e: core_nodes.LoraLoaderModelOnly() for e in ("high", "low")}
    run_core(core_pair)  # warm-up: both methods now hold the files
    run_ours(clear=False)
    mm.unload_all_models()
    warm = measure({"core": lambda: run_core(core_pair), "ours": lambda: run_ours(clear=False)})

    print(f"model: 2 experts x {args.blocks} blocks, dim {args.dim}; LoRA rank {args.rank}, "
          f"{len(modules)} modules per expert, {size_mb:.1f} MiB on disk (bf16, VideoX-Fun keys)")
    print(f"weights changed by the LoRAs: {changed} tensors; ours == core bit for bit: {equal}")
    for title, result in (("new file (read + rename + patch)", cold),
                          ("strength change (file cached by both)", warm)):
        print(f"{title}: medians of {args.repeat} runs each, order alternated")
        for label, pick in (("loader nodes", lambda v: v[0]),
                            ("nodes + applying patches", lambda v: [a + b for a, b in zip(*v)])):
            med = {k: statistics.median(pick(v)) for k, v in result.items()}
            ratio = med["ours"] / med["core"]
            verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
            print(f"  {label:25s} core {med['core'] * 1000:8.1f} ms  ours {med['ours'] * 1000:8.1f} ms  "
                  f"ratio {ratio:.3f} (goal <= {GOAL_RATIO}: {verdict})")
    if not equal:
        print("FAIL: the patched weights differ from core's", file=sys.stderr)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
