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


def _layout_names() -> list[str]:
    from sdpo.data.layouts import LAYOUT_CHOICES

    return list(LAYOUT_CHOICES)


def _column(help_text: str):
    return _f(None, help_text + " (default: the layout's conventional names, see docs/data.md).")


@dataclass
class DataFlags:
    """Which preference pairs, at which size (shared by ``train.py`` and the cache tool)."""

    dataset_name: str | None = _f(None, "Hub dataset id (any layout of --data_layout).")
    dataset_config_name: str | None = _f(None, "Config name of --dataset_name.")
    train_data_dir: str | None = _f(
        None,
        "Local folder: parquet/arrow shards, an imagefolder with metadata.jsonl, or "
        "jsonl/json/csv tables with image paths (any layout of --data_layout).",
    )
    split: str = _f("train", "Dataset split to train on.")
    cache_dir: str | None = _f(None, "Cache folder for hub models and datasets.")
    max_train_samples: int | None = _f(
        None, "Keep this many (non-tie) pairs, drawn with --seed (debugging / quick runs)."
    )
    resolution: int | None = _f(None, "Training image size (default 512, or 1024 with --sdxl).")
    # --- data layout and column mapping (sdpo.data.layouts; docs/data.md) ---
    data_layout: str = _f(
        "auto",
        "Table layout: pickapic (jpg_0, jpg_1, label_0, caption), chosen_rejected, scores (two "
        "images, a score each), ranked (image list + rank/score list), images (image + caption, "
        "SFT only); auto detects the one layout whose columns are present and logs it.",
        choices_from=_layout_names,
    )
    caption_column: str | None = _column("Prompt / caption column (official flag)")
    image_column: str | None = _column("Image column of the 'images' layout (official SFT flag)")
    image_0_column: str | None = _column("First image column (pickapic, scores)")
    image_1_column: str | None = _column("Second image column (pickapic, scores)")
    label_column: str | None = _column("Pick-a-Pic label column: 1 first image won, 0.5 tie")
    chosen_column: str | None = _column("Preferred image column (chosen_rejected)")
    rejected_column: str | None = _column("Rejected image column (chosen_rejected)")
    score_0_column: str | None = _column("Score / votes of the first image (scores)")
    score_1_column: str | None = _column("Score / votes of the second image (scores)")
    images_column: str | None = _column("Image list column (ranked)")
    ranks_column: str | None = _column("Rank list column, lower is better (ranked)")
    scores_column: str | None = _column("Score list column, higher is better (ranked)")
    model_0_column: str | None = _column("Generator of the first / chosen image")
    model_1_column: str | None = _column("Generator of the second / rejected image")
    pair_mode: str = _f(
        "best_worst",
        "ranked layout: one best-vs-worst pair per row, or every pair (gap > threshold).",
        choices=["best_worst", "all"],
    )
    score_tie_threshold: float = _f(
        0.0, "scores / ranked layouts: pairs whose score gap is <= this are ties and dropped."
    )
    dreamlike_pairs_only: bool = _f(
        False, "Keep only pairs whose two images both come from a Dreamlike model (official)."
    )
    choice_model: str | None = _f(
        None,
        "Re-decide every pair with this reward model as rows are read (official flag; "
        "pickscore, hpsv2, clip, aesthetics, imagereward; hps/aes accepted). Offline and "
        "faster: python -m eval.relabel.",
    )


def validate_data(cfg, *, cached: bool = False) -> None:
    """The data flags' own checks (one ``ValueError`` naming the flag); no data is read.
    ``cached``: the pairs go through a precomputed cache (the cache tool, --precomputed_dir)."""
    from sdpo.data.layouts import LAYOUT_CHOICES, PAIR_MODES, mapping_flags

    if bool(cfg.dataset_name) == bool(cfg.train_data_dir):
        raise ValueError(
            "--dataset_name: give exactly one of --dataset_name (hub id) or --train_data_dir"
        )
    if cfg.train_data_dir and not os.path.isdir(cfg.train_data_dir):
        raise ValueError(f"--train_data_dir: folder {cfg.train_data_dir!r} does not exist")
    if cfg.data_layout not in LAYOUT_CHOICES:
        raise ValueError(f"--data_layout: {cfg.data_layout!r} is not one of {list(LAYOUT_CHOICES)}")
    if cfg.pair_mode not in PAIR_MODES:
        raise ValueError(f"--pair_mode: {cfg.pair_mode!r} is not one of {list(PAIR_MODES)}")
    if not cfg.score_tie_threshold >= 0:
        raise ValueError(f"--score_tie_threshold: must be >= 0, got {cfg.score_tie_threshold}")
    if cfg.choice_model:
        from sdpo.data.pairs import CHOICE_ALIASES

        metrics = ("pickscore", "hpsv2", "clip", "aesthetics", "imagereward")
        if CHOICE_ALIASES.get(cfg.choice_model, cfg.choice_model) not in metrics:
            raise ValueError(
                f"--choice_model: {cfg.choice_model!r} is not one of {list(metrics)} "
                f"(or {list(CHOICE_ALIASES)})"
            )
        if cached:
            raise ValueError(
                "--choice_model: cached pairs cannot be re-decided per row; relabel offline "
                "(python -m eval.relabel) and cache the relabelled folder"
            )
    for flag in mapping_flags():
        value = getattr(cfg, flag, None)
        if value is not None and not str(value).strip():
            raise ValueError(f"--{flag}: give a column name (got an empty string)")


@dataclass
class TrainConfig(DataFlags, ModelFlags):
    """Every knob of ``train.py``; field names are the command-line flags (``--name``)."""

    unet_init: str = _f(
        "", "Start from another UNet: a diffusers UNet folder, a hub id, or a unet.pth state_dict."
    )
    ref_unet_init: str = _f(
        "",
        "The DPO reference when it is not the starting UNet: 'base' (the base model's own "
        "UNet, e.g. while --unet_init starts from an earlier round) or a unet.pth / UNet folder; "
        "'' = a frozen copy of the starting UNet.",
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
    max_grad_norm: float = _f(
        1.0,
        "Gradient clipping norm (0 disables clipping; as the reference, an explicit "
        "--use_adafactor never clips).",
    )
    max_nonfinite_steps: int = _f(
        5,
        "Optimizer steps with a NaN/Inf loss or gradient norm (on any process) are skipped; "
        "stop the run after this many in a row.",
    )
    noise_offset: float = _f(
        0.0,
        "Offset noise: add noise_offset x N(0, 1) per (image, channel) to ε, the same for "
        "a pair's winner and loser (0: off).",
    )
    input_perturbation: float = _f(
        0.0,
        "Input perturbation: noise the latents with ε + input_perturbation x N(0, 1) while "
        "the target stays ε, the same perturbation for a pair's winner and loser (0: off).",
    )
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
    log_every: int = _f(
        10,
        "When stderr is not a terminal (a log file), print one plain progress line every N "
        "optimizer steps instead of progress-bar redraws.",
    )
    pathology_window: int = _f(
        50,
        "Optimizer steps of the pathology alarm's window (winner error rising with the "
        "loser's, relative to the reference); 0 disables it.",
    )
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

    @property
    def clip_norm(self) -> float:
        """The gradient-clipping norm, or 0 (no clipping): the reference never clips with an
        explicit --use_adafactor (Adafactor clips its own update, clip_threshold 1), but does
        clip when --sdxl picked Adafactor."""
        if self.use_adafactor and not getattr(self, "_adafactor_from_sdxl", False):
            return 0.0
        return self.max_grad_norm


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
        if not cfg.use_8bit_adam and not cfg.use_adafactor:
            cfg.use_adafactor = True
            cfg._adafactor_from_sdxl = True  # not a flag: clip_norm tells the two apart
    if isinstance(cfg.resume_from_checkpoint, str) and cfg.resume_from_checkpoint.lower() in (
        "",
        "none",
    ):
        cfg.resume_from_checkpoint = None
    return cfg


def resolve_for_family(cfg: TrainConfig, family) -> TrainConfig:
    """Fill the defaults that depend on the model family, known once its configs are read (the
    LoRA rank: LoRA by default for the flow transformers); raise ``ValueError`` naming the flag
    for a combination the family's default makes impossible."""
    if cfg.lora_rank is None:
        cfg.lora_rank = family.default_lora_rank
        if cfg.ref_unet_init and cfg.lora_rank > 0:
            raise ValueError(
                f"--ref_unet_init: {family.name} trains LoRA by default, whose reference is its "
                "base; pass --lora_rank 0 for a full fine-tune with another reference"
            )
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
    ref = cfg.ref_unet_init
    if ref and ref != "base" and _looks_local(ref) and not os.path.exists(ref):
        bad("ref_unet_init", f"{ref!r} does not exist")
    if ref and (cfg.lora_rank or 0) > 0:
        bad("ref_unet_init", "cannot be combined with --lora_rank (LoRA's reference is its base)")

    validate_data(cfg, cached=cfg.precomputed_dir is not None)

    positive = (
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "num_train_epochs",
        "resolution",
        "checkpointing_steps",
        "max_nonfinite_steps",
        "log_every",
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
    for name in (
        "adam_weight_decay",
        "adam_epsilon",
        "max_grad_norm",
        "noise_offset",
        "input_perturbation",
        "pathology_window",
    ):
        if getattr(cfg, name) < 0:
            bad(name, f"must be >= 0, got {getattr(cfg, name)}")

    if 0 < cfg.pathology_window < 4:
        bad("pathology_window", f"must be 0 (off) or at least 4 steps, got {cfg.pathology_window}")

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
