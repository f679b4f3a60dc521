"""The training loop of ``train.py``, importable (the toy demo, the bench and tests call it).

:func:`main` takes a validated :class:`sdpo.config.TrainConfig` and runs the whole training:
checks, data, models (through the model-family registry), the accelerate loop, checkpoints and
the final outputs. ``train.py`` is only its command line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

from sdpo import io
from sdpo.config import TrainConfig, resolve, resolve_for_family, validate

logger = logging.getLogger("sdpo.training")


def _tracker_config(cfg: TrainConfig) -> dict:
    """Tensorboard's hparams accept only scalars and strings."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(cfg).items()
    }


def _append_log(path: Path, row: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def _finite_or_none(value):
    """Log rows are strict JSON: a NaN/Inf statistic of a skipped step is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Progress:
    """A tqdm bar on a terminal; in a log file (stderr not a terminal) one plain line every
    ``every`` optimizer steps instead of a screenful of bar redraws."""

    def __init__(self, total: int, initial: int, *, enabled: bool, every: int, stream=None):
        self.total, self.every, self.enabled = total, every, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start, self.start_step = time.monotonic(), initial
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="steps", file=self.stream)

    def update(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        loss, lam = row.get("loss"), row.get("loser_scale")
        if self.bar is not None:
            post = {"loss": "nan" if loss is None else f"{loss:.4g}"}
            if lam is not None:
                post["lam"] = f"{lam:.3f}"
            if row.get("nonfinite_skipped"):
                post["skipped"] = row["nonfinite_skipped"]
            self.bar.update(1)
            self.bar.set_postfix(post)
        elif step % self.every == 0 or step == self.total:
            self.stream.write(self.line(step, row) + "\n")
            self.stream.flush()

    def line(self, step: int, row: dict) -> str:
        elapsed = time.monotonic() - self.start
        per_step = elapsed / max(step - self.start_step, 1)
        eta = per_step * (self.total - step)
        parts = [f"step {step}/{self.total}"]
        for key, label, fmt in (
            ("loss", "loss", ".4g"),
            ("implicit_acc", "acc", ".3f"),
            ("loser_scale", "lambda", ".3f"),
            ("lr", "lr", ".3g"),
            ("grad_norm", "grad_norm", ".3g"),
        ):
            if key in row:
                value = row[key]
                parts.append(f"{label} {'nan' if value is None else format(value, fmt)}")
        parts.append(f"skipped {row.get('nonfinite_skipped', 0)}")
        parts.append(f"{per_step:.2f} s/step, eta {_duration(eta)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def quiet_library_bars() -> None:
    """In a log file the libraries' own progress bars (dataset split generation, weight loading
    and saving) would write their redraws too; switch them off (one call, process-wide)."""
    import datasets
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    datasets.disable_progress_bars()
    diffusers_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    transformers_logging.disable_progress_bar()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class LaunchError(RuntimeError):
    """The launch does not run what was asked for (reported as one line by :func:`cli`)."""


def check_engine(accelerator) -> None:
    """Refuse a launch that accelerate silently runs as something else (before models load).

    On a machine without GPUs accelerate 1.x cannot run its sharded engines: with ``--cpu`` it
    ignores FSDP and DeepSpeed and runs DDP over gloo; without it, every process of a
    2-process launch becomes its own world of one (FSDP: no distribution at all; DeepSpeed
    then fails its batch-size check against the real world size)."""
    import os

    # torchrun / accelerate launch set WORLD_SIZE (mpirun sets its own variables instead).
    world = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if world != accelerator.num_processes:
        raise LaunchError(
            f"the launcher started {world} processes but accelerate sees "
            f"{accelerator.num_processes} ({accelerator.distributed_type.value}): a sharded engine "
            "(FSDP, DeepSpeed) needs GPUs; on CPUs launch plain DDP (ACCELERATE_USE_CPU=true)"
        )
    for engine in ("FSDP", "DEEPSPEED"):
        asked = os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true"
        if asked and accelerator.distributed_type.value != engine:
            raise LaunchError(
                f"{engine} was asked for (ACCELERATE_USE_{engine}) but accelerate runs "
                f"{accelerator.distributed_type.value}: it shards only on GPUs"
            )


def _stop(accelerator, out: Path, message: str) -> None:
    """End the run on every process with ``message`` (the decision is already reduced, so all
    processes arrive here at the same step); the summary records why."""
    from sdpo.guard import NonFiniteStop

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        io.write_json(out / "train_summary.json", {"output_dir": str(out), "stopped": message})
    accelerator.end_training()
    raise NonFiniteStop(message)


def main(cfg: TrainConfig) -> dict:
    """Train; returns ``{"output_dir", "global_step", "seed", "data": {...counts}, "unet_pth",
    "unet", "ref_unet"}`` (the last two: the trained and the frozen reference UNet modules)."""
    try:
        return _train(cfg)
    finally:
        _release_accelerate()


def _release_accelerate() -> None:
    """Forget accelerate's process-wide state after a single-process run (even a failed one), so
    a later in-process run (tests, the toy demo) can build an Accelerator with other settings."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    if not (dist.is_available() and dist.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _train(cfg: TrainConfig) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedType,
        ProjectConfiguration,
        broadcast_object_list,
        set_seed,
    )
    from diffusers.optimization import get_scheduler

    from sdpo import checkpoint as ckpt
    from sdpo import step as step_module
    from sdpo.data import Augment, DataSource, build_dataloader
    from sdpo.families import ModelSource, check_family
    from sdpo.families.flow import TimestepDensity
    from sdpo.guard import NonFiniteGuard, PathologyAlarm, weights_finite
    from sdpo.losses import LOSSES
    from sdpo.perf import ModelSetup, setup_models
    from sdpo.step import Preference, StepStats, build_optimizer

    # 1. Everything that can be wrong is checked before weights or images load.
    validate(resolve(cfg))
    source = ModelSource.from_flags(cfg, denoiser_init=cfg.unet_init)
    family = check_family(source, flags={"sdxl": cfg.sdxl})  # reads only the configs
    out = Path(cfg.output_dir)
    resume = ckpt.resolve_resume(cfg.resume_from_checkpoint, out)
    spec = LOSSES[cfg.train_method]
    pref = Preference.from_flags(cfg)

    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(out), logging_dir=str(out / cfg.logging_dir)
        ),
    )
    check_engine(accelerator)
    if not sys.stderr.isatty():
        quiet_library_bars()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level="INFO")
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    seed = cfg.seed
    if seed is None:  # one random seed for all processes, kept in checkpoints for resuming
        seed = ckpt.read_state(resume)["seed"] if resume else random.SystemRandom().randrange(2**31)
        seed = broadcast_object_list([seed])[0]
    set_seed(seed + accelerator.process_index)  # the reference's per-process seed
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    # 2. Data (column check, tie filtering), then models.
    data = DataSource.from_flags(cfg)
    precomputed = None
    if cfg.precomputed_dir:
        from sdpo.data.cached import cache_identity, check_cache

        identity = cache_identity(
            source,
            family=family.name,
            resolution=cfg.resolution,
            mixed_precision=cfg.mixed_precision,
            data=data,
            seed=seed,
        )
        check_cache(cfg.precomputed_dir, identity)
        precomputed = (cfg.precomputed_dir, family)
    augment = Augment(
        resolution=cfg.resolution,
        seed=seed,
        random_crop=cfg.random_crop,
        hflip=not cfg.no_hflip,
        proportion_empty_prompts=cfg.proportion_empty_prompts,
    )
    loader, dataset, sampler, data_info = build_dataloader(
        data,
        augment,
        paired=spec.paired,
        batch_size=cfg.train_batch_size,
        num_workers=cfg.dataloader_num_workers,
        precomputed=precomputed,
    )
    if data_info["pairs"] < cfg.train_batch_size * accelerator.num_processes:
        raise ValueError(
            f"{data_info['pairs']} usable pairs are fewer than one global batch "
            f"(--train_batch_size {cfg.train_batch_size} x {accelerator.num_processes} processes)"
        )
    if cfg.use_winner_preserving and not spec.paired:
        logger.warning("--use_winner_preserving has no effect on unpaired %s", cfg.train_method)
    resolve_for_family(cfg, family)
    parts = family.load_parts(
        source, resolution=cfg.resolution, density=TimestepDensity.from_flags(cfg)
    )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    # Frozen encoders placed, frozen reference (a copy, or LoRA's base), trainable parameters.
    reference = None
    if cfg.ref_unet_init and spec.needs_reference:  # another reference than the start
        init = "" if cfg.ref_unet_init == "base" else cfg.ref_unet_init
        reference = family.load_denoiser(ModelSource.from_flags(cfg, denoiser_init=init))
    unet, ref_unet, params = setup_models(
        parts,
        ModelSetup.from_flags(cfg),
        needs_reference=spec.needs_reference,
        device=accelerator.device,
        weight_dtype=weight_dtype,
        reference=reference,
    )

    n_proc = accelerator.num_processes
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * n_proc
    optimizer = build_optimizer(
        params,
        name=cfg.optimizer_name,
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
        fused=cfg.use_fused_adam,
    )
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * n_proc,
        num_training_steps=cfg.max_train_steps * n_proc,
    )
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(
        unet, optimizer, loader, lr_scheduler
    )

    # 3. Resume, trackers.
    state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "corrupt_skipped": 0}
    if resume:
        state.update(ckpt.load_checkpoint(accelerator, resume))
    if accelerator.is_main_process:
        ckpt.truncate_log(out, state["global_step"])
        accelerator.init_trackers(cfg.tracker_project_name, config=_tracker_config(cfg))
    log_path = out / ckpt.LOG_FILE
    global_step = state["global_step"]
    meter = StepStats()
    meter.corrupt_total = state["corrupt_skipped"]
    nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps)
    nonfinite.load_state_dict(state.get("nonfinite", {}))
    alarm = PathologyAlarm(window=cfg.pathology_window)
    alarm.load_state_dict(state.get("pathology", {}))
    last_checkpoint = resume
    clip_norm = cfg.clip_norm if cfg.clip_norm > 0 else math.inf  # inf: measure, never clip
    steps_in_backward = accelerator.distributed_type == DistributedType.DEEPSPEED
    logger.info("%s on %d pairs; %d processes", cfg.train_method, data_info["pairs"], n_proc)
    main_proc = accelerator.is_main_process
    progress = Progress(cfg.max_train_steps, global_step, enabled=main_proc, every=cfg.log_every)

    # 4. The loop: one batch = one micro-step; accelerate syncs every N micro-steps. As in the
    # reference, --max_train_steps decides the length (epochs follow from it).
    epoch = state["epoch"]
    while global_step < cfg.max_train_steps:
        dataset.start_epoch(epoch)
        sampler.start_epoch(epoch)
        skip = state["batches_in_epoch"] if epoch == state["epoch"] else 0
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch_i, batch in enumerate(batches, start=skip + 1):
            with accelerator.accumulate(unet):
                loss, stats = step_module.training_step(
                    parts=parts,
                    unet=unet,
                    ref_unet=ref_unet,
                    batch=batch,
                    spec=spec,
                    pref=pref,
                    seed=seed,
                    device=accelerator.device,
                    autocast=accelerator.autocast,
                )
                nonfinite.watch(loss)
                accelerator.backward(loss)
                skipped = False
                grad_norm = None
                if accelerator.sync_gradients:
                    # Always measured (clip_norm inf = no clipping) so a NaN/Inf is seen.
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), clip_norm)
                    skipped = nonfinite.check(
                        grad_norm, accelerator, scaler_handles_grads=accelerator.scaler is not None
                    )
                    if not skipped:
                        optimizer.step()
                        lr_scheduler.step()
                    elif accelerator.scaler is not None:
                        accelerator.scaler.update()  # forget the unscale_ of this step
                    elif steps_in_backward:
                        # DeepSpeed stepped inside accelerator.backward: too late to skip.
                        _stop(
                            accelerator,
                            out,
                            f"stopped at step {global_step + 1}: non-finite loss or gradient "
                            "norm under DeepSpeed, which applies the update inside backward, so "
                            "it could not be skipped; last good checkpoint: "
                            f"{last_checkpoint}",
                        )
                optimizer.zero_grad(set_to_none=True)  # drops a skipped step's gradients
            meter.add(stats, batch["corrupt"])
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            row = {"step": global_step, "epoch": epoch, **meter.reduce(accelerator)}
            row["lr"] = lr_scheduler.get_last_lr()[0]
            row["grad_norm"] = None if grad_norm is None else float(grad_norm)
            nonfinite.record(global_step, skipped, row.get("loss"))
            row["nonfinite"] = skipped
            row["nonfinite_skipped"] = nonfinite.total
            row = {k: _finite_or_none(v) for k, v in row.items()}
            if skipped:
                logger.warning(
                    "step %d skipped (non-finite loss or gradient norm on a process): loss %s, "
                    "grad norm %s; %d in a row, %d in all",
                    global_step,
                    row["loss"],
                    row["grad_norm"],
                    nonfinite.consecutive,
                    nonfinite.total,
                )
            fired = None if skipped else alarm.update(global_step, row)
            if fired and main_proc:
                logger.warning(PathologyAlarm.message(fired))
            progress.update(global_step, row)
            accelerator.log({k: v for k, v in row.items() if v is not None}, step=global_step)
            if accelerator.is_main_process:
                _append_log(log_path, row)
            if nonfinite.exhausted:
                _stop(accelerator, out, nonfinite.stop_message(global_step, last_checkpoint))
            done = global_step >= cfg.max_train_steps
            if global_step % cfg.checkpointing_steps == 0 or done:
                trained = [p for p in unet.parameters() if p.requires_grad]  # after prepare()
                if not weights_finite(trained, accelerator):
                    _stop(
                        accelerator,
                        out,
                        f"stopped at step {global_step}: the weights are not finite, so no "
                        f"checkpoint was written; last good checkpoint: {last_checkpoint}",
                    )
                at_end = batch_i >= len(loader)  # resume into the next epoch
                position = {"epoch": epoch + at_end, "batches_in_epoch": 0 if at_end else batch_i}
                last_checkpoint = ckpt.save_checkpoint(
                    accelerator,
                    unet,
                    family,
                    out,
                    global_step,
                    {
                        **position,
                        "seed": seed,
                        "corrupt_skipped": meter.corrupt_total,
                        "nonfinite": nonfinite.state_dict(),
                        "pathology": alarm.state_dict(),
                    },
                    cfg.checkpoints_total_limit,
                )
            if done:
                break
        epoch += 1
    progress.close()

    # 5. Final outputs.
    accelerator.wait_for_everyone()
    paths = ckpt.save_final(accelerator, unet, family, out)
    result = {
        "output_dir": str(out),
        "global_step": global_step,
        "seed": seed,
        "data": {**data_info, "corrupt_skipped": meter.corrupt_total},
        "nonfinite_skipped": nonfinite.total,
        "pathology_alarm": alarm.fired,
        "unet_pth": str(paths["unet_pth"]),
        "unet": accelerator.unwrap_model(unet, keep_torch_compile=False),
        "ref_unet": ref_unet,
    }
    if accelerator.is_main_process:
        summary = {k: v for k, v in result.items() if k not in ("unet", "ref_unet")}
        io.write_json(out / "train_summary.json", summary)
    accelerator.end_training()
    return result


def cli(argv: list[str] | None = None) -> dict:
    """``train.py``'s command line: parse, report a model-family mismatch as a usage error (it
    reads only configs), train."""
    from sdpo.config import build_parser, parse_args
    from sdpo.families import ModelSource, check_family
    from sdpo.guard import NonFiniteStop

    cfg = parse_args(argv)
    try:
        check_family(ModelSource.from_flags(cfg), flags={"sdxl": cfg.sdxl})
    except ValueError as err:
        build_parser().error(str(err))
    try:
        return main(cfg)
    except (NonFiniteStop, LaunchError, ValueError) as err:
        # Expected ends (a run stopped by the guard, a launch accelerate would silently change,
        # bad input found while loading: a data set without the needed columns, a --unet_init
        # file that is no state dict): one line, once, no traceback.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
