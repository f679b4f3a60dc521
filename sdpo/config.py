"""Training configuration: one typed dataclass, its command line, and up-front validation.

Flag names and defaults follow the official Diffusion-SDPO ``train.py``.
:func:`parse_args` builds the argparse parser from the dataclass fields (help text from each
field's ``metadata``), resolves the reference's derived defaults (resolution 512 / 1024, ``--sdxl``
forcing Adafactor and gradient checkpointing) and validates every value with :func:`validate`
before any model or data is touched.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from dataclasses import dataclass

from sdpo.cli import arg as _f
from sdpo.cli import build_parser as _build_parser

MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "all", "none")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)


def _loss_names() -> list[str]:
    from sdpo.losses import LOSSES

    return list(LOSSES)


@dataclass
class ModelFlags:
    """Which base model (shared by ``train.py`` and the cache tool)."""

    pretrained_model_name_or_path: str | None = _f(
        None, "Base model: hub id or local diffusers pipeline folder (required).", required=True
    )
    revision: str | None = _f(None, "Hub revision of the base model.")
    pretrained_vae_model_name_or_path: str | None = _f(
        None, "Separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL."
    )
    sdxl: bool = _f(
        False, "The base model is SDXL (two text encoders, pooled + size conditioning)."
    )


@dataclass
class DataFlags:
    """Which preference pairs, at which size (shared by ``train.py`` and the cache tool)."""

    dataset_name: str | None = _f(None, "Hub dataset id in the Pick-a-Pic v2 schema.")
    dataset_config_name: str | None = _f(None, "Config name of --dataset_name.")
    train_data_dir: str | None = _f(
        None, "Local folder of parquet/arrow files in the Pick-a-Pic v2 schema."
    )
    split: str = _f("train", "Dataset split to train on.")
    cache_dir: str | None = _f(None, "Cache folder for hub models and datasets.")
    max_train_samples: int | None = _f(
        None, "Keep this many (non-tie) pairs, drawn with --seed (debugging / quick runs)."
    )
    resolution: int | None = _f(None, "Training image size (default 512, or 1024 with --sdxl).")


@dataclass
class TrainConfig(DataFlags, ModelFlags):
    """Every knob of ``train.py``; field names are the command-line flags (``--name``)."""

    unet_init: str = _f(
        "", "Start from another UNet: a diffusers UNet folder, a hub id, or a unet.pth state_dict."
    )
    random_crop: bool = _f(False, "RandomCrop instead of CenterCrop after the resize.")
    no_hflip: bool = _f(False, "Disable the random horizontal flips.")
    proportion_empty_prompts: float = _f(
        0.2, "Probability of replacing a caption by '' (caption dropout)."
    )
    dataloader_num_workers: int = _f(0, "DataLoader worker processes (0: decode in the main one).")
    # --- optimisation ---
    train_batch_size: int = _f(1, "Pairs per process per micro-step.")
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimizer step.")
    max_train_steps: int = _f(2000, "Optimizer steps to train for.")
    num_train_epochs: int = _f(
        100, "Kept for compatibility: as in the reference, --max_train_steps sets the length."
    )
    learning_rate: float = _f(1e-8, "Base learning rate (per pair, see --scale_lr).")
    scale_lr: bool = _f(
        False, "Multiply the lr by accumulation steps x batch size x number of processes."
    )
    lr_scheduler: str = _f(
        "constant_with_warmup", "diffusers learning-rate schedule.", choices=LR_SCHEDULERS
    )
    lr_warmup_steps: int = _f(500, "Warm-up length in optimizer steps.")
    use_adafactor: bool = _f(
        False, "Adafactor (scale_parameter=False, relative_step=False); implied by --sdxl."
    )
    use_8bit_adam: bool = _f(False, "8-bit AdamW from bitsandbytes (must be installed).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(1e-2, "AdamW / Adafactor weight decay.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables clipping).")
    mixed_precision: str = _f(
        "fp16", "Autocast precision (fp16 needs a GPU; use 'no' on CPU).", choices=MIXED_PRECISION
    )
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    gradient_checkpointing: bool = _f(
        False, "Recompute UNet activations in backward (forced by --sdxl)."
    )
    seed: int | None = _f(
        None, "Seed of data order, augmentations, noise and timesteps (random if unset)."
    )
    # --- outputs, logging, checkpoints ---
    output_dir: str = _f("sd-model-finetuned", "Where checkpoints, logs and the final UNet go.")
    logging_dir: str = _f("logs", "Tracker folder, relative to --output_dir.")
    report_to: str = _f("tensorboard", "Experiment tracker.", choices=REPORT_TO)
    tracker_project_name: str = _f("tuning", "Tracker project / run group name.")
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint every N optimizer steps.")
    checkpoints_total_limit: int | None = _f(None, "Keep at most this many checkpoints.")
    resume_from_checkpoint: str | None = _f(
        "latest",
        "'latest' (resume from the newest checkpoint in --output_dir if any, else start fresh),"
        " a checkpoint folder, or 'none' to always start fresh.",
    )
    # --- method ---
    train_method: str = _f(
        "diffusion-dpo", "Objective, from sdpo.losses.LOSSES.", choices_from=_loss_names
    )
    beta_dpo: float = _f(5000.0, "β of the preference margin u.")
    dmpo_alpha: float = _f(0.0, "DMPO α in [0, 1): target probability q = 1 - α.")
    use_winner_preserving: bool = _f(False, "Enable the SDPO winner-preserving loser scale λ.")
    winner_preserving_mu: float = _f(0.0, "Safeguard conservativeness μ in [0, 1].")
    winner_preserving_per_pair: bool = _f(
        False, "One λ per pair instead of one per micro-batch (extension, off = reference)."
    )
    winner_preserving_sync: bool = _f(
        False, "Compute λ from residuals summed over all processes (extension, off = reference)."
    )
    # --- flow-matching timesteps (SD3 / FLUX; sdpo.families.flow; defaults: diffusers' scripts) ---
    weighting_scheme: str = _f(
        "logit_normal",
        "Density of the flow-matching σ (SD3 / FLUX only).",
        choices=["logit_normal", "mode", "uniform"],
    )
    logit_mean: float = _f(0.0, "Mean of the logit-normal σ density (SD3 / FLUX only).")
    logit_std: float = _f(1.0, "Std of the logit-normal σ density (SD3 / FLUX only).")
    mode_scale: float = _f(1.29, "Scale of the 'mode' σ density (SD3 / FLUX only).")
    # --- optional speed-ups (sdpo.perf; all off = the reference's computation) ---
    precomputed_dir: str | None = _f(
        None,
        "Train from a cache of VAE posteriors and text embeddings made by python -m sdpo.cache.",
    )
    lora_rank: int | None = _f(
        None,
        "Train LoRA adapters of this rank instead of the full denoiser (0: off). Default: the "
        "model family's (0 for SD1.5 / SDXL; 32 for SD3 / FLUX).",
    )
    lora_alpha: float | None = _f(None, "LoRA alpha (scale alpha / rank); default: the rank.")
    lora_target_modules: str = _f(
        "to_q,to_k,to_v,to_out.0", "Comma-separated UNet module names that get LoRA adapters."
    )
    channels_last: bool = _f(False, "NHWC memory format for the UNet(s).")
    torch_compile: bool = _f(False, "torch.compile the policy (and reference) UNet.")
    use_fused_adam: bool = _f(False, "The fused CUDA AdamW kernel (needs a GPU).")

    @property
    def optimizer_name(self) -> str:
        """'adafactor' (--use_adafactor, or --sdxl as the reference), 'adamw8bit' or 'adamw'."""
        if self.use_adafactor:
            return "adafactor"
        return "adamw8bit" if self.use_8bit_adam else "adamw"


def build_parser() -> argparse.ArgumentParser:
    """The ``train.py`` parser, generated from :class:`TrainConfig` (same names, defaults, help)."""
    return _build_parser(
        TrainConfig,
        prog="train.py",
        description="Preference fine-tuning of diffusion models (Diffusion-DPO, DSPO, DMPO, SFT) "
        "with the SDPO winner-preserving safeguard.",
    )


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the reference's derived defaults in place and return ``cfg``."""
    if cfg.resolution is None:
        cfg.resolution = 1024 if cfg.sdxl else 512
    if cfg.sdxl:
        # Reference behaviour: SDXL always trains with checkpointing and (unless 8-bit AdamW is
        # asked for explicitly) Adafactor, to fit the 2.6 B-parameter UNet.
        cfg.gradient_checkpointing = True
        if not cfg.use_8bit_adam:
            cfg.use_adafactor = True
    if isinstance(cfg.resume_from_checkpoint, str) and cfg.resume_from_checkpoint.lower() in (
        "",
        "none",
    ):
        cfg.resume_from_checkpoint = None
    return cfg


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value before anything expensive happens; raise ONE ``ValueError`` naming the
    flag. Cheap filesystem checks (local paths that must exist) are included."""

    def bad(flag: str, why: str) -> None:
        raise ValueError(f"--{flag}: {why}")

    if not cfg.pretrained_model_name_or_path:
        bad("pretrained_model_name_or_path", "is required (hub id or local diffusers folder)")
    model = cfg.pretrained_model_name_or_path
    if _looks_local(model) and not os.path.isdir(model):
        bad("pretrained_model_name_or_path", f"local folder {model!r} does not exist")
    vae = cfg.pretrained_vae_model_name_or_path
    if vae and _looks_local(vae) and not os.path.isdir(vae):
        bad("pretrained_vae_model_name_or_path", f"local folder {vae!r} does not exist")
    if cfg.unet_init and _looks_local(cfg.unet_init) and not os.path.exists(cfg.unet_init):
        bad("unet_init", f"{cfg.unet_init!r} does not exist")

    if bool(cfg.dataset_name) == bool(cfg.train_data_dir):
        bad("dataset_name", "give exactly one of --dataset_name (hub id) or --train_data_dir")
    if cfg.train_data_dir and not os.path.isdir(cfg.train_data_dir):
        bad("train_data_dir", f"folder {cfg.train_data_dir!r} does not exist")

    positive = (
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "num_train_epochs",
        "resolution",
        "checkpointing_steps",
    )
    for name in positive:
        if getattr(cfg, name) is None or getattr(cfg, name) <= 0:
            bad(name, f"must be a positive integer, got {getattr(cfg, name)}")
    for name in ("max_train_samples", "checkpoints_total_limit"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            bad(name, f"must be a positive integer when given, got {getattr(cfg, name)}")
    for name in ("lr_warmup_steps", "dataloader_num_workers"):
        if getattr(cfg, name) < 0:
            bad(name, f"must be >= 0, got {getattr(cfg, name)}")
    if cfg.resolution % 8:
        bad("resolution", f"must be a multiple of 8, got {cfg.resolution}")
    if not 0.0 <= cfg.proportion_empty_prompts <= 1.0:
        bad("proportion_empty_prompts", f"must be in [0, 1], got {cfg.proportion_empty_prompts}")
    if not cfg.learning_rate > 0:
        bad("learning_rate", f"must be > 0, got {cfg.learning_rate}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            bad(name, f"must be in [0, 1), got {getattr(cfg, name)}")
    for name in ("adam_weight_decay", "adam_epsilon", "max_grad_norm"):
        if getattr(cfg, name) < 0:
            bad(name, f"must be >= 0, got {getattr(cfg, name)}")

    choices = {
        "mixed_precision": MIXED_PRECISION,
        "report_to": REPORT_TO,
        "lr_scheduler": LR_SCHEDULERS,
        "train_method": tuple(_loss_names()),
    }
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            bad(name, f"{getattr(cfg, name)!r} is not one of {list(allowed)}")
    if cfg.mixed_precision == "fp16" and not _cuda_available():
        bad(
            "mixed_precision",
            "fp16 needs a CUDA GPU (accelerate would silently train in fp32 on CPU); "
            "pass --mixed_precision no (or bf16) on CPU",
        )
    if cfg.report_to in ("wandb",) and importlib.util.find_spec("wandb") is None:
        bad("report_to", "wandb is not installed: pip install wandb, or use tensorboard / none")
    if cfg.use_adafactor and cfg.use_8bit_adam and not cfg.sdxl:
        bad("use_8bit_adam", "cannot be combined with --use_adafactor")
    if cfg.use_8bit_adam:
        if importlib.util.find_spec("bitsandbytes") is None:
            bad("use_8bit_adam", "needs bitsandbytes: pip install bitsandbytes")

    if not cfg.beta_dpo > 0:
        bad("beta_dpo", f"must be > 0, got {cfg.beta_dpo}")
    if not 0.0 <= cfg.dmpo_alpha < 1.0:
        bad("dmpo_alpha", f"must be in [0, 1), got {cfg.dmpo_alpha}")
    if not 0.0 <= cfg.winner_preserving_mu <= 1.0:
        bad("winner_preserving_mu", f"μ must be in [0, 1], got {cfg.winner_preserving_mu}")

    if cfg.precomputed_dir is not None:
        if not os.path.isdir(cfg.precomputed_dir):
            bad("precomputed_dir", f"folder {cfg.precomputed_dir!r} does not exist")
        if cfg.random_crop:
            bad("precomputed_dir", "cannot be combined with --random_crop (crops are not cached)")
    if cfg.lora_rank is not None and cfg.lora_rank < 0:
        bad("lora_rank", f"must be >= 0, got {cfg.lora_rank}")
    if cfg.lora_alpha is not None and not cfg.lora_alpha > 0:
        bad("lora_alpha", f"must be > 0, got {cfg.lora_alpha}")
    if not cfg.logit_std > 0:
        bad("logit_std", f"must be > 0, got {cfg.logit_std}")
    if not [m for m in cfg.lora_target_modules.split(",") if m.strip()]:
        bad("lora_target_modules", "give at least one module name")
    if cfg.use_fused_adam and (cfg.optimizer_name != "adamw" or not _cuda_available()):
        bad("use_fused_adam", "needs plain AdamW (not Adafactor / 8-bit) on a CUDA GPU")

    resume = cfg.resume_from_checkpoint
    if resume and resume != "latest" and not os.path.isdir(resume):
        bad("resume_from_checkpoint", f"checkpoint folder {resume!r} does not exist")
    return cfg


def _looks_local(name: str) -> bool:
    """Paths (absolute, relative with ./ or ../, or existing) are local; 'org/name' is a hub id."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or os.path.exists(name)
        or name.endswith((".pth", ".pt", ".bin", ".safetensors"))
        or name.count("/") > 1
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse ``argv`` (``sys.argv[1:]`` if None) into a resolved, validated :class:`TrainConfig`.

    A bad value exits through ``argparse``'s error (status 2) with the flag and the reason.
    """
    from sdpo.cli import from_namespace

    parser = build_parser()
    cfg = resolve(from_namespace(TrainConfig, parser.parse_args(argv)))
    try:
        validate(cfg)
    except ValueError as err:
        parser.error(str(err))
    return cfg
