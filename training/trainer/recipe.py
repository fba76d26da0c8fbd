"""The training run as a recipe: ``setup`` builds everything in named parts, ``train`` runs the
steps, ``save_checkpoint`` and ``finish`` close it. The run's state (step, best validation score,
gaming guard, last saved step) lives on the object.

One optimizer step: for each micro-step, sample, decode and score (step.RewardStep), agree on
faults across ranks, backward; then clip (DeepSpeed's gradient_clipping from max_grad_norm, or
torch clipping without DeepSpeed) and step; log; validate when due; act on stop / save requests
and periodic checkpoints.

Why it stays one module of about 400 lines: as in a torchtune recipe, set-up, step and outputs
share the run's state on one object and read top to bottom; the work itself is in step.py,
validation.py, distributed.py, components.py, checkpoint.py and outputs.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..safe_io import write_text
from .checkpoint import (check_resumable, checkpoints_dir, latest_checkpoint, load_checkpoint, move_aside,
                         read_run_info, recent_loras, save_checkpoint)
from .components import DTYPES, adapt, file_field, load_embeddings, load_rewards, resolve_prompts
from .config import ConfigError, TrainConfig, dump_config
from .distributed import (StepFault, agree_on_fault, agreed_requests, broadcast_flags, guarded, make_accelerator,
                          no_zero_init, reduce_sum)
from .lora import lora_parameters, lora_state, native_modules
from .outputs import average_loras, current_memory_mb, deepspeed_layout, peak_memory_mb, save_pngs
from .placement import Decision, Placement, agree, local_fraction
from .progress import EXIT_ERROR, EXIT_OK, TRAINER_TAG, Control, Progress
from .step import RewardStep
from .validation import GamingGuard, selection_criterion, validate


class RewardLoRARecipe:
    """One reward-LoRA run. ``decision``: the memory mode the preflight chose (None: ``cfg.memory``
    unchecked, or fast for auto)."""

    def __init__(self, cfg: TrainConfig, progress: Progress, reward_loader=load_rewards,
                 decision: Decision | None = None):
        self.cfg, self.progress, self.reward_loader = cfg, progress, reward_loader
        self.decision = decision
        mode = decision.mode if decision else (cfg.memory if cfg.memory != "auto" else "fast")
        self.mode_reason = decision.reason if decision else f"{mode} (no preflight check)"
        self.mode = mode
        self.start = self.step = 0
        # the best validation score so far; the base model's (step 0) is a candidate, so a LoRA worse
        # than the base never becomes "best" (path None: the base is the best)
        self.best = {"score": None, "step": None, "path": None}
        self.guard = GamingGuard(cfg.gaming_patience)
        self.saved_step = None
        self.reason = "completed"
        self.sample_next = False
        self.resumed_from = self.replaced = None

    # ---- set-up ------------------------------------------------------------------------------
    def setup(self) -> "RewardLoRARecipe":
        self._setup_processes()
        self._setup_prompts()
        self._setup_models()
        self._setup_optimizer()
        self._setup_step()
        self._resume()
        self._announce()
        return self

    def _setup_processes(self) -> None:
        cfg = self.cfg
        self.accelerator, self.use_ds, self.accumulation = make_accelerator(cfg, deepspeed=self.mode != "low")
        accelerator = self.accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.mode = agree(self.mode, accelerator)
        self.progress.main = accelerator.is_main_process
        self.output = Path(cfg.output_dir)
        self.control = Control(self.output, read_files=accelerator.is_main_process)
        if accelerator.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            self.control.clear_stale()
            if not cfg.resume:
                self.replaced = move_aside(self.output)  # starting over: never mix two runs' checkpoints
            write_text(self.output / "run_config.yaml", dump_config(cfg))
        accelerator.wait_for_everyone()
        self.control.install_signal_handlers()
        self.device, self.dtype = accelerator.device, DTYPES[cfg.mixed_precision]
        self.placement = Placement(self.mode, self.mode_reason, self.device, self.dtype, self.world)

    def _setup_prompts(self) -> None:
        self.train_prompts, self.val_prompts = resolve_prompts(self.cfg)
        prompts = self.train_prompts + self.val_prompts + [self.cfg.negative_prompt]
        self.embeddings = load_embeddings(self.cfg, prompts, self.device)

    def _setup_models(self) -> None:
        """The experts where the placement puts them, the LoRA on the trained one, the VAE and rewards.
        Models are built whole, not under zero.Init (transformers would build the reward CLIP with empty
        parameters)."""
        from .models import load_wan_expert, load_wan_vae

        cfg, placement = self.cfg, self.placement
        self.other = "low" if cfg.expert == "high" else "high"
        with no_zero_init(self.accelerator, self.use_ds):
            experts = {}
            for name in ("high", "low"):
                frozen = name == self.other
                merge = (cfg.frozen_expert_lora, cfg.frozen_expert_lora_strength) \
                    if frozen and cfg.frozen_expert_lora else None
                with file_field(f"{name}_noise_model" if merge is None else "frozen_expert_lora"):
                    experts[name] = load_wan_expert(getattr(cfg, f"{name}_noise_model"), self.dtype, merge_lora=merge,
                                                    keep_fp8=placement.keeps_fp8["frozen" if frozen else "trained"])
            trained = experts[cfg.expert]
            torch.manual_seed(cfg.seed)  # the LoRA's initial weights: the same on every rank
            self.adapted, self.lora_alpha = adapt(cfg, trained)
            if cfg.gradient_checkpointing:
                trained.enable_gradient_checkpointing()
            placement.place_trained(trained, trained.fp8_scales)
            experts[self.other] = placement.place_frozen(experts[self.other], experts[self.other].fp8_scales)
            with file_field("vae"):
                self.vae = load_wan_vae(cfg.vae, self.dtype)
            load_to = "cpu" if self.mode == "low" else self.device
            self.rewards = self.reward_loader(cfg.rewards, load_to, self.dtype, "rewards")
            self.held_out = self.reward_loader(cfg.held_out_rewards, load_to, self.dtype, "held_out_rewards")
        placement.park(self.vae, *(model for _, model in self.rewards + self.held_out))
        self.experts, self.trained = experts, trained

    def _setup_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        cfg, accelerator = self.cfg, self.accelerator
        self.params = list(lora_parameters(self.trained).values())
        if cfg.optimizer == "sgd":  # plain gradient descent: for checks and ablations
            self.optimizer = torch.optim.SGD(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                               eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        # not passed to accelerate: stepped once per optimizer step, whatever the process count
        self.scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                       num_training_steps=max(cfg.max_steps, 1))
        if self.mode == "low":  # the streamed weights stay in host memory: no device placement
            self.model = accelerator.prepare_model(self.trained, device_placement=False)
            self.optimizer = accelerator.prepare_optimizer(self.optimizer)
        else:
            if not self.use_ds:
                self.trained = self.trained.to(self.device)
            self.model, self.optimizer = accelerator.prepare(self.trained, self.optimizer)
        self.experts[self.cfg.expert] = self.model

    def _setup_step(self) -> None:
        from .conditioning import StartImages, read_start_images

        cfg = self.cfg
        self.start_images, self.validation_images = (
            StartImages(read_start_images(path), cfg.height, cfg.width, cfg.frames) if path else None
            for path in (cfg.start_images, cfg.validation_start_images))
        self.stepper = RewardStep(cfg, self.experts, self.vae, self.rewards, self.embeddings, self.train_prompts,
                                  self.device, self.rank, self.world, self.accumulation, self.start_images,
                                  self.validation_images, self.placement)
        self.metadata = {"base_model": cfg.base_model_name or Path(cfg.high_noise_model if cfg.expert == "high"
                                                                   else cfg.low_noise_model).name,
                         "expert": cfg.expert, "rewards": json.dumps({s.name: s.weight for s in cfg.rewards}),
                         "rank": str(cfg.lora_rank), "alpha": str(self.lora_alpha),
                         "config_hash": cfg.config_hash(), "trainer": TRAINER_TAG}

    def _resume(self) -> None:
        cfg = self.cfg
        if not cfg.resume:
            return
        found = latest_checkpoint(self.output)
        stray = sorted(checkpoints_dir(self.output).glob("step-*"))
        if found is None and stray:
            raise ConfigError("resume", f"{stray[-1]} is not a checkpoint this trainer can resume (no run.json: "
                              "written by an older version, or damaged); set resume: false to start over (the "
                              "old checkpoints are moved aside)")
        if found is None:
            return
        info = read_run_info(found)
        check_resumable(cfg, info, self.world, found, self.use_ds)
        self.start = self.step = load_checkpoint(self.accelerator, self.model, self.optimizer, self.scheduler, found,
                                                 self.use_ds)
        self.best.update(info.get("best") or {})
        self.guard.load_state(info.get("guard") or {})
        self.resumed_from = str(found)

    def _announce(self) -> None:
        cfg, start = self.cfg, self.start
        fields = dict(
            step=start, max_steps=cfg.max_steps, expert=cfg.expert, world_size=self.world, output_dir=str(self.output),
            lora_path=str(cfg.lora_path), config_hash=cfg.config_hash(), resumed_from=self.resumed_from,
            replaced_checkpoints=str(self.replaced) if self.replaced else None, adapted_modules=len(self.adapted),
            deepspeed=self.use_ds, memory_mode=self.mode, memory_reason=self.mode_reason,
            gradient_clipping=float(self.model.gradient_clipping()) if self.use_ds else cfg.max_grad_norm,
            memory_at_start_mb=round(current_memory_mb(self.device), 1), recipe=cfg.recipe,
            batch_size=cfg.batch_size, gradient_accumulation_steps=self.accumulation,
            effective_batch=cfg.batch_size * self.accumulation * self.world, lora_rank=cfg.lora_rank,
            lora_alpha=self.lora_alpha, init_lora=cfg.init_lora, start_images=len(self.start_images or ()),
            frozen_local_fraction=round(local_fraction(getattr(self.experts[self.other], "module",
                                                               self.experts[self.other])), 4))
        if self.use_ds:
            fields.update(deepspeed_layout(self.model, self.params))
        self.progress.emit("started", **fields)
        if cfg.init_lora and self.lora_alpha != cfg.lora_alpha:
            self.progress.emit("warning", step=start, message=f"lora_alpha {cfg.lora_alpha:g} replaced by init_lora's "
                               f"alpha {self.lora_alpha:g} ({cfg.init_lora}): a continued LoRA keeps its scale")
        if self.replaced:
            self.progress.emit("warning", step=start, message=f"resume: false: the earlier run's checkpoints were "
                               f"moved to {self.replaced}; this run starts over")

    # ---- the run -----------------------------------------------------------------------------
    def train(self) -> int:
        cfg = self.cfg
        try:
            if cfg.validation_every and self.val_prompts and self.start == 0:
                self.run_validation(0)  # the base model's scores: the guard's reference and the first best candidate
            self.started_at = time.time()
            while self.step < cfg.max_steps:
                stats = self._optimizer_step()
                self._log_step(stats)
                if cfg.validation_every and self.step % cfg.validation_every == 0 and self.val_prompts:
                    if self.run_validation(self.step) and cfg.gaming_guard == "stop":
                        self.reason = "gaming_guard"
                if self._handle_requests():
                    break
            else:
                self.save_checkpoint("final")
        except StepFault as fault:
            return self._stop_on_fault(str(fault))
        self.finish()
        return EXIT_OK

    def _optimizer_step(self) -> dict:
        """The micro-steps of one optimizer step (sample, decode, score, agree on faults, backward),
        the clipped optimizer step and the schedule; returns what the step event reports."""
        cfg, accelerator = self.cfg, self.accelerator
        t0 = time.time()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        losses, weighted, parts, grad_norm = [], [], {}, None
        for micro in range(self.accumulation):
            with accelerator.accumulate(self.model):
                result, fault = guarded(lambda: self.stepper.loss(self.step, micro))  # noqa: B023 (called at once)
                fault = agree_on_fault(fault, accelerator)  # before the backward's collectives
                if fault:
                    raise StepFault(f"step {self.step + 1}: {fault}")
                loss, reward, scores, self.frames = result
                accelerator.backward(loss)
                self.placement.park_all()  # low memory: the VAE and rewards leave the GPU after the backward
                if accelerator.sync_gradients:
                    if not self.use_ds and cfg.max_grad_norm > 0:
                        grad_norm = float(accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm))
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            weighted.append(reward)
            for key, value in scores.items():
                parts.setdefault(key, []).append(value)
            del loss
        if self.use_ds:
            norm = self.model.get_global_grad_norm()
            grad_norm = None if norm is None else float(norm)
        self.scheduler.step()
        self.step += 1
        return {"loss": losses, "reward": weighted, "parts": parts, "grad_norm": grad_norm, "t0": t0}

    def _log_step(self, stats: dict) -> None:
        cfg, step = self.cfg, self.step
        if self.sample_next or (cfg.sample_every and step % cfg.sample_every == 0):
            if self.accelerator.is_main_process:
                self.progress.emit("sample", step=step, paths=save_pngs(self.frames, self.output / "samples", step))
            self.sample_next = False
        self.frames = None
        parts = stats["parts"]
        means = [sum(stats["loss"]) / len(stats["loss"]), sum(stats["reward"]) / len(stats["reward"])]
        metrics = torch.tensor(means + [sum(v) / len(v) for v in parts.values()], device=self.device)
        if self.world > 1:
            metrics = self.accelerator.reduce(metrics, reduction="mean")
        metrics = metrics.cpu()
        rewards = {k: float(metrics[2 + i]) for i, k in enumerate(parts)}
        motion = {"motion_term": rewards.pop("motion_term")} if "motion_term" in rewards else {}
        done = step - self.start
        self.progress.emit("step", step=step, max_steps=cfg.max_steps, loss=float(metrics[0]),
                           reward=float(metrics[1]), rewards=rewards, **motion, lr=self.scheduler.get_last_lr()[0],
                           grad_norm=stats["grad_norm"], seconds=round(time.time() - stats["t0"], 4),
                           peak_memory_mb=round(peak_memory_mb(self.device), 1),
                           eta_seconds=round((time.time() - self.started_at) / done * (cfg.max_steps - step), 1))

    def _handle_requests(self) -> bool:
        """Stop / save / sample requests (agreed by every rank) and periodic checkpoints; True to stop."""
        requests = agreed_requests(self.accelerator, self.control.poll())
        if requests["sample_now"]:
            self.sample_next = True
        if requests["stop"] or self.reason == "gaming_guard":
            self.save_checkpoint("gaming_guard" if self.reason == "gaming_guard" else "stop")
            if self.reason != "gaming_guard":
                self.reason = "stopped"
            return True
        if requests["save_now"]:
            self.save_checkpoint("save_now")
        elif self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
            self.save_checkpoint("periodic")
        return False

    def run_validation(self, step: int) -> bool:
        """Validate, keep the best LoRA by the criterion; True if the guard tripped. The decisions
        are rank 0's, broadcast, so every rank gathers the LoRA together."""
        cfg = self.cfg
        result = validate(self.stepper, self.held_out, self.val_prompts, cfg.validation_seed, self.rank, self.world,
                          lambda t: reduce_sum(self.accelerator, t),
                          lambda fault: agree_on_fault(fault, self.accelerator))
        self.placement.park_all()
        train_value = sum(result["rewards"].values()) / len(result["rewards"])
        held = sum(result["held_out"].values()) / len(result["held_out"]) if result["held_out"] else None
        criterion = held if held is not None else train_value
        warning = self.guard.update(train_value, held, result["motion"])
        improved, tripped = broadcast_flags(self.accelerator, self.best["score"] is None or criterion > self.best["score"],
                                            self.guard.tripped)
        if improved:
            self.best.update(score=criterion, step=step, path=cfg.best_lora_path if step > 0 else None)
            if step > 0:
                self.write_lora(cfg.best_lora_path, step)
        self.progress.emit("validation", step=step, rewards=result["rewards"], held_out=result["held_out"],
                           motion=result["motion"], best=improved and step > 0,
                           best_lora_path=str(self.best["path"]) if self.best["path"] else None,
                           criterion=selection_criterion(cfg), criterion_value=criterion,
                           best_score=self.best["score"], best_step=self.best["step"])
        if warning:
            self.progress.emit("warning", step=step, message=warning)
        return tripped

    # ---- outputs -----------------------------------------------------------------------------
    def write_lora(self, path: Path, step: int) -> Path:
        """The LoRA now (a collective under ZeRO-3: every rank calls it), written by the main process."""
        from ..lora_format import save_canonical_lora

        state = lora_state(self.model)
        if self.accelerator.is_main_process:
            save_canonical_lora(path, native_modules(state, self.lora_alpha), {**self.metadata, "steps": str(step)})
        return path

    def save_checkpoint(self, reason: str) -> None:
        """Checkpoint and LoRA of the current step (once per step; collective)."""
        step = self.step
        if self.saved_step == step:  # already saved at this step (e.g. periodic, then final)
            return
        self.saved_step = step
        cfg = self.cfg
        run_info = {"config": cfg.to_dict(), "config_hash": cfg.config_hash(), "world_size": self.world,
                    "deepspeed": self.use_ds, "memory_mode": self.mode,
                    "best": {**self.best, "path": str(self.best["path"]) if self.best["path"] else None},
                    "guard": self.guard.state()}
        path = save_checkpoint(self.accelerator, self.model, self.optimizer, self.scheduler, step, self.output,
                               lambda p: self.write_lora(p, step), cfg.checkpoints_keep, self.use_ds, run_info)
        self.write_lora(cfg.lora_path, step)
        self.progress.emit("checkpoint", step=step, path=str(path), lora_path=str(cfg.lora_path), reason=reason)

    def _stop_on_fault(self, fault: str) -> int:
        """Every rank got here together: save the last good step (when it is new), tell once, exit."""
        cfg, step = self.cfg, self.step
        if step > self.start:
            self.save_checkpoint("fault")
            kept = f"the last good step ({step}) is saved: checkpoint and LoRA {cfg.lora_path}"
        elif self.start:
            kept = f"no new step to save: the checkpoint of step {self.start} is kept"
        else:
            kept = "no step had completed, so nothing was saved"
        self.progress.emit("error", kind="runtime", field=None, step=step,
                           message=f"training stopped on every rank: {fault}. {kept}; {self._remedy(fault)} and start "
                                   "the run again with resume on to continue from the last checkpoint")
        return EXIT_ERROR

    def _remedy(self, fault: str) -> str:
        """What to change: for out of memory, the mode that ran and those the estimate gives less memory."""
        if "out of memory" not in fault.lower() and "outofmemoryerror" not in fault.lower():
            return "fix the cause"
        estimates = self.decision.estimates if self.decision else {}
        ran = estimates.get(self.mode)
        lighter = [(m, e) for m, e in estimates.items() if ran is not None and e.gpu_gib < ran.gpu_gib]
        text = f"out of memory in memory mode {self.mode}" + (f" (estimated {ran.gpu_gib:.1f} GiB per GPU)" if ran else "")
        if lighter:
            text += "; " + ", ".join(f"memory mode {m} needs about {e.gpu_gib:.1f} GiB per GPU" for m, e in lighter)
            text += f": set memory: {lighter[-1][0]}"
        return text + "; or lower frames, width/height, rank or backprop_steps"

    def finish(self) -> None:
        """The checkpoint average (when asked), the finished event, the processes' end."""
        from ..lora_format import save_canonical_lora

        cfg, step = self.cfg, self.step
        average_path = None
        if cfg.average_last_checkpoints > 1 and self.accelerator.is_main_process:
            loras = recent_loras(self.output, cfg.average_last_checkpoints)
            if len(loras) > 1:
                average_path = save_canonical_lora(
                    cfg.average_lora_path, average_loras(loras),
                    {**self.metadata, "steps": str(step), "averaged_checkpoints": str(len(loras)),
                     "averaged_steps": ",".join(p.parent.name.split("-")[-1].lstrip("0") or "0" for p in loras),
                     "rank": str(cfg.lora_rank * len(loras)), "alpha": str(float(cfg.lora_rank * len(loras))),
                     "averaging": "exact average of the last checkpoints' LoRAs (not an EMA)"})
        self.progress.emit("finished", step=step, reason=self.reason, lora_path=str(cfg.lora_path),
                           best_lora_path=str(self.best["path"]) if self.best["path"] else None,
                           average_lora_path=str(average_path) if average_path else None)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def train(cfg: TrainConfig, progress: Progress, reward_loader=load_rewards, decision: Decision | None = None) -> int:
    """Run ``cfg`` to its end; returns the exit code (progress.EXIT_*)."""
    return RewardLoRARecipe(cfg, progress, reward_loader, decision).setup().train()
