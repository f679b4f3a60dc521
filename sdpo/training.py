"""The training loop of ``train.py``, importable (the toy demo, the bench and tests call it).

:func:`main` takes a validated :class:`sdpo.config.TrainConfig` and runs the whole training:
checks, data, models (through the model-family registry), the accelerate loop, checkpoints and
the final outputs. ``train.py`` is only its command line.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from sdpo import io
from sdpo.config import TrainConfig, resolve, validate

logger = logging.getLogger("sdpo.training")


def _tracker_config(cfg: TrainConfig) -> dict:
    """Tensorboard's hparams accept only scalars and strings."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(cfg).items()
    }


def _append_log(path: Path, row: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


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
    from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from sdpo import checkpoint as ckpt
    from sdpo.data import Augment, DataSource, build_dataloader
    from sdpo.families import ModelSource, check_family
    from sdpo.families.flow import TimestepDensity
    from sdpo.losses import LOSSES
    from sdpo.perf import ModelSetup, setup_models
    from sdpo.step import Preference, StepStats, build_optimizer, training_step

    # 1. Everything that can be wrong is checked before weights or images load.
    validate(resolve(cfg))
    source = ModelSource.from_flags(cfg)
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
    if cfg.lora_rank is None:  # LoRA by default for the flow transformers (family setting)
        cfg.lora_rank = family.default_lora_rank
    parts = family.load_parts(
        source, resolution=cfg.resolution, density=TimestepDensity.from_flags(cfg)
    )
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    # Frozen encoders placed, frozen reference (a copy, or LoRA's base), trainable parameters.
    unet, ref_unet, params = setup_models(
        parts,
        ModelSetup.from_flags(cfg),
        needs_reference=spec.needs_reference,
        device=accelerator.device,
        weight_dtype=weight_dtype,
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
    logger.info("%s on %d pairs; %d processes", cfg.train_method, data_info["pairs"], n_proc)
    main_proc = accelerator.is_main_process
    bar = tqdm(total=cfg.max_train_steps, initial=global_step, disable=not main_proc, desc="steps")

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
                loss, stats = training_step(
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
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            meter.add(stats, batch["corrupt"])
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            row = {"step": global_step, "epoch": epoch, **meter.reduce(accelerator)}
            row["lr"] = lr_scheduler.get_last_lr()[0]
            row["grad_norm"] = None if grad_norm is None else float(grad_norm)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4g}", lam=f"{row['loser_scale']:.3f}")
            accelerator.log({k: v for k, v in row.items() if v is not None}, step=global_step)
            if accelerator.is_main_process:
                _append_log(log_path, row)
            done = global_step >= cfg.max_train_steps
            if global_step % cfg.checkpointing_steps == 0 or done:
                at_end = batch_i >= len(loader)  # resume into the next epoch
                position = {"epoch": epoch + at_end, "batches_in_epoch": 0 if at_end else batch_i}
                ckpt.save_checkpoint(
                    accelerator,
                    unet,
                    family,
                    out,
                    global_step,
                    {**position, "seed": seed, "corrupt_skipped": meter.corrupt_total},
                    cfg.checkpoints_total_limit,
                )
            if done:
                break
        epoch += 1
    bar.close()

    # 5. Final outputs.
    accelerator.wait_for_everyone()
    paths = ckpt.save_final(accelerator, unet, family, out)
    result = {
        "output_dir": str(out),
        "global_step": global_step,
        "seed": seed,
        "data": {**data_info, "corrupt_skipped": meter.corrupt_total},
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

    cfg = parse_args(argv)
    try:
        check_family(ModelSource.from_flags(cfg), flags={"sdxl": cfg.sdxl})
    except ValueError as err:
        build_parser().error(str(err))
    return main(cfg)
