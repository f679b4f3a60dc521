"""CPU toy reproduction of the paper's pathology and of the safeguard's fix.

Paper (arXiv 2511.03317): Diffusion-DPO enlarges the preference margin while the noise-prediction
error of BOTH the winner and the loser rises relative to the reference model; the SDPO
winner-preserving safeguard keeps the winner's error from rising while the margin still grows.

This module makes everything needed to see it in a few minutes on a CPU, with no download:

1. a synthetic text-to-image preference task: coloured shapes on coloured backgrounds, captioned
   "a red circle on a blue background"; in each pair the winner is the clean picture and the
   loser the same picture made worse (noisy or blurry by default; a wrong colour or shape
   with ``--loser_kinds``). Written in the
   Pick-a-Pic parquet schema (``jpg_0``, ``jpg_1``, ``label_0``, ``caption``) so ``train.py``
   reads it with ``--train_data_dir``; held-out pairs are written separately;
2. a tiny SD1.5-style model (:func:`sdpo.testing.tiny.build_tiny_sd15`, with a deterministic VAE and a
   smaller UNet) and a short SFT phase run through ``train.py`` (``--train_method sft``) so the
   start already denoises and the reference is meaningful;
3. Diffusion-DPO, DSPO and DMPO, safeguard off / on, several seeds, all through ``train.py`` from
   the same SFT start;
4. on held-out pairs at FIXED noise and timesteps: winner / loser error of the policy minus the
   reference, the margin and implicit accuracy (with :mod:`sdpo.losses`), and λ (from
   ``train_log.jsonl``, and on held-out with :func:`sdpo.safeguard.winner_preserving_scale`);
5. ``curves.json``, PNG plots and ``summary.md``.

Run: ``python -m sdpo.toy [--outdir runs/toy] [--seeds 3] [--steps N] [--quick]``.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# 1. The synthetic preference task
# ---------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges at 16 px


def caption_of(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def draw_scene(
    colour: str, shape: str, background: str, centre: tuple[float, float], radius: float, size: int
):
    """One RGB PIL image ``size``x``size``: a filled shape on a plain background.

    ``centre`` and ``radius`` are fractions of the image side.
    """
    from PIL import Image, ImageDraw

    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), COLOURS[background])
    draw = ImageDraw.Draw(img)
    cx, cy, r = centre[0] * big, centre[1] * big, radius * big
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _jpeg_bytes(img) -> bytes:
    # Full-resolution chroma (subsampling=0): 4:2:0 would smear the colours of a 16-px image.
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


LOSER_KINDS = ("wrong_colour", "wrong_shape", "noisy", "blurry")
# Quality defects by default: with caption mismatches, the tiny random text encoder leaves the
# preference almost unlearnable on held-out pairs in 100 steps (margin ~0), see docs/toy.md.
DEFAULT_LOSER_KINDS = ("noisy", "blurry")


def _degrade(img, kind: str, rng: random.Random):
    """The same picture, worse: pixel noise (std 0.2 of the range) or a Gaussian blur."""
    from PIL import Image, ImageFilter

    if kind == "blurry":
        return img.filter(ImageFilter.GaussianBlur(radius=1.0))
    a = np.asarray(img, dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 0.2 * 255, a.shape)
    return Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8))


def make_pairs(
    n_pairs: int, *, size: int, seed: int, loser_kinds: tuple[str, ...] = DEFAULT_LOSER_KINDS
) -> list[dict]:
    """``n_pairs`` preference pairs in the Pick-a-Pic schema, drawn from ``random.Random(seed)``.

    Winner: the caption's scene, clean. Loser: the same layout made worse in one way
    (``loser_kind``, drawn from ``loser_kinds``): the shape's colour or the shape itself does
    not match the caption, or the picture is noisy or blurry. Which of ``jpg_0`` / ``jpg_1``
    wins is random, as in Pick-a-Pic (``label_0`` 1: jpg_0 won, 0: jpg_1 won).
    """
    unknown = set(loser_kinds) - set(LOSER_KINDS)
    if unknown or not loser_kinds:
        raise ValueError(
            f"loser_kinds must be a non-empty subset of {LOSER_KINDS}; got {loser_kinds}"
        )
    rng = random.Random(seed)
    names = list(COLOURS)
    rows = []
    for _ in range(n_pairs):
        background = rng.choice(names)
        colour = rng.choice([c for c in names if c != background])
        shape = rng.choice(SHAPES)
        centre = (rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65))
        radius = rng.uniform(0.22, 0.32)
        kind = rng.choice(loser_kinds)
        winner = draw_scene(colour, shape, background, centre, radius, size)
        if kind == "wrong_colour":
            bad = rng.choice([c for c in names if c not in (background, colour)])
            loser = draw_scene(bad, shape, background, centre, radius, size)
        elif kind == "wrong_shape":
            bad = rng.choice([s for s in SHAPES if s != shape])
            loser = draw_scene(colour, bad, background, centre, radius, size)
        else:
            loser = _degrade(winner, kind, rng)
        winner_first = rng.random() < 0.5
        a, b = (winner, loser) if winner_first else (loser, winner)
        rows.append(
            {
                "caption": caption_of(colour, shape, background),
                "jpg_0": _jpeg_bytes(a),
                "jpg_1": _jpeg_bytes(b),
                "label_0": 1.0 if winner_first else 0.0,
                "label_1": 0.0 if winner_first else 1.0,
                "loser_kind": kind,
            }
        )
    return rows


def write_parquet(rows: list[dict], path: Path) -> Path:
    """Write rows atomically as one parquet file."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def load_pairs(folder: Path) -> list[dict]:
    """Read every parquet in ``folder`` (sorted) back as row dicts."""
    import pandas as pd

    files = sorted(Path(folder).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files in {folder}")
    return pd.concat([pd.read_parquet(f) for f in files]).to_dict("records")


def winner_loser_arrays(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode pairs to winner-first float arrays ``[N, 3, H, W]`` in [-1, 1] and the captions."""
    from PIL import Image

    def decode(b: bytes) -> np.ndarray:
        a = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32)
        return a.transpose(2, 0, 1) / 127.5 - 1.0

    winners, losers, captions = [], [], []
    for r in rows:
        if r["label_0"] == 0.5:
            continue
        w, lo = (r["jpg_0"], r["jpg_1"]) if r["label_0"] == 1 else (r["jpg_1"], r["jpg_0"])
        winners.append(decode(w))
        losers.append(decode(lo))
        captions.append(r["caption"])
    return np.stack(winners), np.stack(losers), captions


# ---------------------------------------------------------------------------------------------
# 2. The tiny model
# ---------------------------------------------------------------------------------------------

VAE_LOGVAR = -30.0  # the floor DiagonalGaussianDistribution clamps to: posterior std e^-15


def build_toy_model(
    path: Path, images: np.ndarray, *, image_size: int, unet_channels=(16, 32), seed: int = 0
) -> Path:
    """A tiny SD1.5-style folder fit for the toy task; returns ``path``.

    Starts from :func:`sdpo.testing.tiny.build_tiny_sd15` and changes two things, through diffusers:

    - the VAE posterior is made deterministic (log-variance pinned to its floor) and
      ``scaling_factor`` is set so the toy images' latents have unit standard deviation, as
      SD's 0.18215 does for real images. A random VAE otherwise samples latents whose noise
      (std ~1) drowns the image (std ~0.2), and the preference would be invisible to the UNet;
    - the UNet is narrower (``unet_channels``), for speed on a CPU.

    ``images``: ``[N, 3, H, W]`` in [-1, 1], used only to measure the latent scale.
    """
    import torch
    from diffusers import AutoencoderKL

    from sdpo.testing.tiny import build_tiny_sd15

    latent_size = image_size // 2  # the tiny VAE downsamples by 2
    path = Path(path)
    build_tiny_sd15(
        path, seed=seed, sample_size=latent_size, block_out_channels=tuple(unet_channels)
    )

    vae = AutoencoderKL.from_pretrained(path / "vae")
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2  # rows [mean | logvar]
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = VAE_LOGVAR
        x = torch.from_numpy(images[:64]).float()
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(path / "vae")
    return path


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

METHODS = ("diffusion-dpo", "dspo", "dmpo")
# β and μ per method. μ: the paper's SD1.5 recipes (shared/reference/defaults.md). β: see
# DEFAULT_BETA's comment in docs/toy.md and the summary; values measured on this toy task.
DEFAULT_BETA = {"diffusion-dpo": 5000.0, "dspo": 5000.0, "dmpo": 5000.0}
DEFAULT_MU = {"diffusion-dpo": 0.9, "dspo": 0.2, "dmpo": 0.9}
DMPO_ALPHA = 0.01  # the paper's DMPO recipe


def _per_method(values: list[str] | None, defaults: dict[str, float], flag: str) -> dict:
    """``["5000"]`` (all methods) or ``["dspo=0.001", ...]`` -> {method: value}."""
    out = dict(defaults)
    for item in values or []:
        name, _, value = item.rpartition("=")
        targets = [name] if name else list(out)
        if name and name not in out:
            raise ValueError(f"--{flag} {item!r}: unknown method {name!r}; use one of {METHODS}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--{flag} {item!r}: {value!r} is not a number") from None
        for t in targets:
            out[t] = number
    return out


@dataclass
class ToyConfig:
    """Settings of the toy demo; field names are the command-line flags (``--name``)."""

    outdir: str = field(default="runs/toy", metadata={"help": "Output folder (resumable)."})
    seeds: int = field(default=3, metadata={"help": "Training seeds per method x safeguard."})
    steps: int = field(default=100, metadata={"help": "Preference-training steps per run."})
    beta: list[str] | None = field(
        default=None,
        metadata={
            "help": "β: one number for all methods, or METHOD=VALUE (repeatable).",
            "nargs": "+",
        },
    )
    mu: list[str] | None = field(
        default=None,
        metadata={"help": "Safeguard μ: one number, or METHOD=VALUE (repeatable).", "nargs": "+"},
    )
    lr: float = field(default=3e-4, metadata={"help": "Learning rate of the preference runs."})
    methods: list[str] = field(
        default_factory=lambda: list(METHODS),
        metadata={"help": "Preference objectives to run.", "nargs": "+"},
    )
    batch_pairs: int = field(default=8, metadata={"help": "Pairs per step."})
    eval_every: int = field(default=20, metadata={"help": "Checkpoint / evaluate every N steps."})
    sft_steps: int = field(default=250, metadata={"help": "Steps of the SFT phase (the start)."})
    sft_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the SFT phase."})
    train_pairs: int = field(default=512, metadata={"help": "Training pairs generated."})
    heldout_pairs: int = field(default=128, metadata={"help": "Held-out pairs generated."})
    eval_draws: int = field(
        default=2, metadata={"help": "Fixed (noise, timestep) draws per held-out pair."}
    )
    image_size: int = field(default=16, metadata={"help": "Image side in pixels (latents: /2)."})
    loser_kinds: list[str] = field(
        default_factory=lambda: list(DEFAULT_LOSER_KINDS),
        metadata={"help": f"How losers are worse than winners: {LOSER_KINDS}.", "nargs": "+"},
    )
    workers: int = field(
        default=2, metadata={"help": "Parallel training processes (1 thread each)."}
    )
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "Keep checkpoint-N/ folders after evaluating them."}
    )
    quick: bool = field(
        default=False,
        metadata={"help": "Seconds-long smoke version (tests): 1 seed, few steps, less data."},
    )

    def __post_init__(self):
        if self.quick:
            self.seeds, self.steps, self.eval_every, self.batch_pairs = 1, 6, 3, 4
            self.sft_steps, self.train_pairs, self.heldout_pairs, self.eval_draws = 12, 32, 8, 2
            self.workers = 1
        self.betas = _per_method(self.beta, DEFAULT_BETA, "beta")
        self.mus = _per_method(self.mu, DEFAULT_MU, "mu")
        self.validate()

    def validate(self) -> None:
        """Raise ONE ValueError naming the bad setting, before anything is built."""
        for name in (
            "seeds",
            "steps",
            "batch_pairs",
            "eval_every",
            "sft_steps",
            "train_pairs",
            "heldout_pairs",
            "eval_draws",
            "workers",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"--methods {self.methods}: choose from {list(METHODS)}")
        if self.image_size % 8:
            raise ValueError(f"--image_size must be a multiple of 8, got {self.image_size}")
        bad_kinds = set(self.loser_kinds) - set(LOSER_KINDS)
        if bad_kinds or not self.loser_kinds:
            raise ValueError(f"--loser_kinds {self.loser_kinds}: choose from {list(LOSER_KINDS)}")
        if self.train_pairs < self.batch_pairs:
            raise ValueError(
                f"--train_pairs {self.train_pairs} is fewer than one batch of {self.batch_pairs}"
            )
        for m, b in self.betas.items():
            if not b > 0:
                raise ValueError(f"--beta for {m} must be > 0, got {b}")
        for m, mu in self.mus.items():
            if not 0.0 <= mu <= 1.0:
                raise ValueError(f"--mu for {m} must be in [0, 1], got {mu}")
        if not (self.lr > 0 and self.sft_lr > 0):
            raise ValueError(f"--lr and --sft_lr must be > 0, got {self.lr}, {self.sft_lr}")


def parse_args(argv: list[str] | None = None) -> ToyConfig:
    """Command line -> :class:`ToyConfig` (bad values exit with argparse's error)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m sdpo.toy", description=__doc__.split("\n\n")[0]
    )
    defaults = ToyConfig()
    for f in fields(ToyConfig):
        kw = {"help": f.metadata["help"]}
        if f.type in ("bool", bool):
            parser.add_argument(f"--{f.name}", action="store_true", **kw)
            continue
        value = getattr(defaults, f.name)
        if "nargs" in f.metadata:
            kw.update(nargs=f.metadata["nargs"], type=str)
        else:
            kw["type"] = type(value)
        parser.add_argument(f"--{f.name}", default=value, **kw)
    ns = parser.parse_args(argv)
    try:
        return ToyConfig(**vars(ns))
    except ValueError as err:
        parser.error(str(err))


# ---------------------------------------------------------------------------------------------
# 3. Training through train.py
# ---------------------------------------------------------------------------------------------


def train_argv(
    *,
    model: Path,
    data: Path,
    out: Path,
    method: str,
    seed: int,
    steps: int,
    lr: float,
    batch: int,
    checkpoint_every: int,
    beta: float = 1.0,
    mu: float | None = None,
    unet_init: Path | None = None,
) -> list[str]:
    """The ``train.py`` command line of one toy run (``mu=None``: safeguard off)."""
    argv = [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(data),
        "--output_dir", str(out),
        "--resolution", str(_image_size_of(data)),
        "--train_method", method,
        "--beta_dpo", str(beta),
        "--dmpo_alpha", str(DMPO_ALPHA),
        "--learning_rate", str(lr),
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--max_train_steps", str(steps),
        "--train_batch_size", str(batch),
        "--checkpointing_steps", str(checkpoint_every),
        "--seed", str(seed),
        "--mixed_precision", "no",
        "--report_to", "none",
        "--no_hflip",  # winner and loser keep the same layout: the pair differs only in quality
    ]  # fmt: skip
    if mu is not None:
        argv += ["--use_winner_preserving", "--winner_preserving_mu", str(mu)]
    if unet_init is not None:
        argv += ["--unet_init", str(unet_init)]
    return argv


def _image_size_of(data: Path) -> int:
    return int((Path(data).parent / "image_size.txt").read_text())


def run_train(argv: list[str]) -> Path:
    """Run ``train.py`` in this process; returns its output folder. Quiet: the toy logs itself."""
    import logging

    import train

    cfg = train.parse_args(argv)
    # train.py's basicConfig(INFO) is a no-op once the root logger has a handler.
    logging.basicConfig(level=logging.WARNING)
    train.main(cfg)
    return Path(cfg.output_dir)


def read_train_log(out: Path) -> list[dict]:
    import json

    path = Path(out) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare(cfg: ToyConfig) -> dict[str, Path]:
    """Data, tiny model and SFT start under ``cfg.outdir`` (each step skipped if already done)."""

    root = Path(cfg.outdir).resolve()
    data = root / "data"
    paths = {
        "train": data / "train",
        "heldout": data / "heldout",
        "model": root / "model",
        "sft": root / "sft",
    }
    if not (paths["heldout"] / "pairs.parquet").exists():
        # Different seeds: the held-out layouts, colours and noise are never trained on.
        kinds = tuple(cfg.loser_kinds)
        rows = make_pairs(cfg.train_pairs, size=cfg.image_size, seed=1, loser_kinds=kinds)
        write_parquet(rows, paths["train"] / "pairs.parquet")
        (data / "image_size.txt").write_text(str(cfg.image_size))
        rows = make_pairs(cfg.heldout_pairs, size=cfg.image_size, seed=2, loser_kinds=kinds)
        write_parquet(rows, paths["heldout"] / "pairs.parquet")
    if not (paths["model"] / "model_index.json").exists():
        import shutil

        tmp = root / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        winners, _, _ = winner_loser_arrays(load_pairs(paths["train"]))
        build_toy_model(tmp, winners, image_size=cfg.image_size)
        tmp.rename(paths["model"])
    if not (paths["sft"] / "unet.pth").exists():
        # SFT on the preferred images (train.py's --train_method sft), from the random UNet.
        run_train(
            train_argv(
                model=paths["model"],
                data=paths["train"],
                out=paths["sft"],
                method="sft",
                seed=0,
                steps=cfg.sft_steps,
                lr=cfg.sft_lr,
                batch=2 * cfg.batch_pairs,
                checkpoint_every=cfg.sft_steps,
            )
        )
    return paths


# ---------------------------------------------------------------------------------------------
# 4. Held-out evaluation at fixed noise and timesteps
# ---------------------------------------------------------------------------------------------


def build_heldout(cfg: ToyConfig, paths: dict[str, Path]) -> Path:
    """Fix the held-out evaluation once: latents, text conditioning, noise, timesteps and the
    reference (SFT start) predictions; saved to ``outdir/heldout.pt`` and reused by every run.

    Tensors: ``noisy`` ``[D, 2N, 4, h, w]`` (D draws; per draw the N winners then the N losers,
    each pair sharing its noise and timestep as in training), ``timesteps`` ``[D, 2N]``,
    ``target`` ``[D, 2N, 4, h, w]`` (= ε), ``cond`` ``[2N, 77, 32]``, ``ref_pred`` like target.
    """
    import torch

    out = Path(cfg.outdir).resolve() / "heldout.pt"
    if out.exists():
        return out
    import train
    from sdpo.data import decode_image, transform_image
    from sdpo.family import load_model_parts

    tcfg = train.parse_args(
        train_argv(
            model=paths["model"], data=paths["train"], out=paths["sft"], method="sft", seed=0,
            steps=1, lr=1.0, batch=1, checkpoint_every=1, unet_init=paths["sft"] / "unet.pth",
        )
    )  # fmt: skip
    parts = load_model_parts(tcfg)  # the same VAE, text encoder and scheduler train.py uses
    parts.freeze_and_place("cpu", torch.float32)
    ref = parts.unet.eval()
    rows = [r for r in load_pairs(paths["heldout"]) if r["label_0"] != 0.5]
    gen = torch.Generator().manual_seed(1234)
    winners, losers, captions = [], [], []
    for r in rows:
        w, lo = (r["jpg_0"], r["jpg_1"]) if r["label_0"] == 1 else (r["jpg_1"], r["jpg_0"])
        for img, bucket in ((w, winners), (lo, losers)):
            bucket.append(
                transform_image(
                    decode_image(img), tcfg.resolution, gen, random_crop=False, hflip=False
                )
            )
        captions.append(r["caption"])
    with torch.no_grad():
        pixels = torch.stack(winners + losers)
        latents = parts.vae.encode(pixels).latent_dist.mean * parts.vae_scaling_factor
        cond = parts.encode_prompts(captions + captions, "cpu")["encoder_hidden_states"]
        n, draws = len(rows), cfg.eval_draws
        noise = torch.randn(draws, n, *latents.shape[1:], generator=gen)
        t = torch.randint(
            0, parts.noise_scheduler.config.num_train_timesteps, (draws, n), generator=gen
        )
        noise, t = torch.cat([noise, noise], 1), torch.cat([t, t], 1)
        noisy = torch.stack(
            [parts.noise_scheduler.add_noise(latents, noise[d], t[d]) for d in range(draws)]
        )
        ref_pred = _predict(ref, noisy, t, cond)
    payload = {
        "noisy": noisy, "timesteps": t, "target": noise, "cond": cond, "ref_pred": ref_pred,
        "captions": captions, "loser_kind": [r.get("loser_kind", "") for r in rows],
    }  # fmt: skip
    tmp = out.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(out)
    return out


def _predict(unet, noisy, timesteps, cond):
    """UNet ε-predictions for every draw: ``[D, 2N, C, h, w]``."""
    import torch

    with torch.no_grad():
        return torch.stack(
            [
                unet(noisy[d], timesteps[d], encoder_hidden_states=cond).sample
                for d in range(len(noisy))
            ]
        )


def heldout_metrics(model_pred, ref_pred, target, *, mu: float) -> dict[str, float]:
    """Policy-minus-reference errors on the fixed held-out set.

    Inputs ``[D, 2N, C, h, w]``, winners in rows ``0..N-1`` of each draw. Returns scalars:
    ``winner_diff`` / ``loser_diff`` (mean over pairs and draws of ``err_policy - err_ref``,
    the paper's training-dynamics curves), ``margin`` = ``loser_diff - winner_diff`` (the
    preference margin u = β/2 · margin, β-free), ``implicit_acc`` (fraction of (pair, draw)
    with u > 0), ``winner_err`` / ``loser_err`` (absolute policy errors) and ``heldout_lambda``
    (the safeguard's λ at ``mu`` on the held-out residuals, mean over draws).
    """
    import torch

    from sdpo.losses import per_image_error
    from sdpo.safeguard import winner_preserving_scale

    draws = model_pred.shape[0]
    model_err = torch.stack([per_image_error(model_pred[d], target[d]) for d in range(draws)])
    ref_err = torch.stack([per_image_error(ref_pred[d], target[d]) for d in range(draws)])
    diff_w, diff_l = (model_err - ref_err).chunk(2, dim=1)
    margin = diff_l - diff_w  # [D, N]
    lam = torch.stack([winner_preserving_scale(model_pred[d], target[d], mu) for d in range(draws)])
    err_w, err_l = model_err.chunk(2, dim=1)
    return {
        "winner_diff": float(diff_w.mean()),
        "loser_diff": float(diff_l.mean()),
        "margin": float(margin.mean()),
        "implicit_acc": float((margin > 0).float().mean()),
        "winner_err": float(err_w.mean()),
        "loser_err": float(err_l.mean()),
        "heldout_lambda": float(lam.mean()),
    }


def evaluate_run(run_dir: Path, heldout: dict, base_unet_dir: Path, *, mu: float) -> dict:
    """Held-out metrics of ``checkpoint-N/unet.pth`` for every N (and step 0 = the start)."""
    import torch
    from diffusers import UNet2DConditionModel

    from sdpo.checkpoint import list_checkpoints

    unet = UNet2DConditionModel.from_pretrained(base_unet_dir).eval()
    curve: dict[str, list] = {"step": []}

    def add(step: int, pred) -> None:
        row = heldout_metrics(pred, heldout["ref_pred"], heldout["target"], mu=mu)
        curve["step"].append(step)
        for k, v in row.items():
            curve.setdefault(k, []).append(v)

    add(0, heldout["ref_pred"])
    for step, ckpt_dir in list_checkpoints(run_dir):
        unet.load_state_dict(
            torch.load(ckpt_dir / "unet.pth", map_location="cpu", weights_only=True)
        )
        add(step, _predict(unet, heldout["noisy"], heldout["timesteps"], heldout["cond"]))
    return curve


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------

TRAIN_KEYS = ("loss", "implicit_acc", "margin", "winner_diff", "loser_diff", "loser_scale",
              "loser_scale_min", "model_mse", "ref_mse")  # fmt: skip


def run_name(method: str, safeguard: bool, seed: int) -> str:
    return f"{method}_{'on' if safeguard else 'off'}_seed{seed}"


def _one_run(job: dict) -> dict:
    """Train one (method, safeguard, seed) through train.py, then evaluate its checkpoints.

    Runs in a worker process; writes ``run_dir/curves.json`` (atomically) and returns it.
    Skipped when that file exists (resume).
    """
    import contextlib
    import json
    import shutil

    import torch

    run_dir = Path(job["run_dir"])
    done = run_dir / "curves.json"
    if done.exists():
        return json.loads(done.read_text())
    torch.set_num_threads(job["threads"])
    shutil.rmtree(run_dir, ignore_errors=True)  # a run killed half-way restarts from scratch
    run_dir.mkdir(parents=True)
    # Progress bars of parallel runs would interleave: each run's console output goes to a file.
    with (
        open(run_dir / "console.log", "w") as console,
        contextlib.redirect_stderr(console),
        contextlib.redirect_stdout(console),
    ):
        run_train(job["argv"])
    heldout = torch.load(job["heldout"], weights_only=False)
    curves = {
        "method": job["method"],
        "safeguard": job["safeguard"],
        "seed": job["seed"],
        "beta": job["beta"],
        "mu": job["mu"],
        "heldout": evaluate_run(run_dir, heldout, Path(job["base_unet"]), mu=job["mu"]),
    }
    log = read_train_log(run_dir)
    curves["train"] = {"step": [r["step"] for r in log]}
    for key in TRAIN_KEYS:
        curves["train"][key] = [r.get(key) for r in log]
    if not job["keep_checkpoints"]:
        from sdpo.checkpoint import list_checkpoints

        for _, ckpt_dir in list_checkpoints(run_dir):
            shutil.rmtree(ckpt_dir)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(curves))
    tmp.replace(done)
    final = {k: curves["heldout"][k][-1] for k in ("winner_diff", "loser_diff", "margin")}
    print(
        f"[toy] {run_dir.name}: winner {final['winner_diff'] * 1e3:+.1f}e-3, loser "
        f"{final['loser_diff'] * 1e3:+.1f}e-3, margin {final['margin'] * 1e3:+.2f}e-3",
        flush=True,
    )
    return curves


def make_jobs(cfg: ToyConfig, paths: dict[str, Path], heldout: Path) -> list[dict]:
    """Every (method, safeguard, seed) run: same SFT start, same data order and noise per seed."""
    root = Path(cfg.outdir).resolve() / "runs"
    jobs = []
    for method in cfg.methods:
        for seed in range(cfg.seeds):
            for safeguard in (False, True):
                run_dir = root / run_name(method, safeguard, seed)
                argv = train_argv(
                    model=paths["model"],
                    data=paths["train"],
                    out=run_dir,
                    method=method,
                    seed=seed,
                    steps=cfg.steps,
                    lr=cfg.lr,
                    batch=cfg.batch_pairs,
                    checkpoint_every=cfg.eval_every,
                    beta=cfg.betas[method],
                    mu=cfg.mus[method] if safeguard else None,
                    unet_init=paths["sft"] / "unet.pth",
                )
                jobs.append(
                    {
                        "method": method, "safeguard": safeguard, "seed": seed,
                        "beta": cfg.betas[method], "mu": cfg.mus[method],
                        "argv": argv, "run_dir": str(run_dir), "heldout": str(heldout),
                        "base_unet": str(paths["sft"] / "unet"), "threads": 1,
                        "keep_checkpoints": cfg.keep_checkpoints,
                    }
                )  # fmt: skip
    return jobs


def run_jobs(jobs: list[dict], workers: int) -> list[dict]:
    """Run jobs in ``workers`` spawned processes of one thread each (tiny UNets do not scale
    with threads; two single-thread processes do twice the work of one two-thread process)."""
    if workers == 1:
        return [_one_run(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return pool.map(_one_run, jobs, chunksize=1)


# ---------------------------------------------------------------------------------------------
# 5. Curves, plots, summary
# ---------------------------------------------------------------------------------------------

HELDOUT_KEYS = ("winner_diff", "loser_diff", "margin", "implicit_acc", "winner_err", "loser_err",
                "heldout_lambda")  # fmt: skip


def _band(series: list[list[float]]) -> dict[str, list[float]]:
    a = np.asarray(series, dtype=np.float64)  # [seeds, points]
    return {
        "mean": a.mean(0).tolist(),
        "std": a.std(0).tolist(),
        "min": a.min(0).tolist(),
        "max": a.max(0).tolist(),
    }


def aggregate(runs: list[dict]) -> dict:
    """Mean / std / min / max over seeds of every curve, per method and safeguard setting."""
    out: dict = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        out[method] = {}
        for safeguard in (False, True):
            group = [r for r in runs if r["method"] == method and r["safeguard"] == safeguard]
            if not group:
                continue
            agg = {"seeds": [r["seed"] for r in group], "step": group[0]["heldout"]["step"]}
            for key in HELDOUT_KEYS:
                agg[key] = _band([r["heldout"][key] for r in group])
            agg["train_step"] = group[0]["train"]["step"]
            for key in ("loss", "loser_scale", "margin", "implicit_acc"):
                agg[f"train_{key}"] = _band([r["train"][key] for r in group])
            out[method]["on" if safeguard else "off"] = agg
    return out


def final_table(runs: list[dict]) -> list[dict]:
    """One row per (method, safeguard): final held-out values over seeds, and seed counts."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        for safeguard in (False, True):
            group = [r for r in runs if r["method"] == method and r["safeguard"] == safeguard]
            if not group:
                continue
            last = {k: np.array([r["heldout"][k][-1] for r in group]) for k in HELDOUT_KEYS}
            lam = np.array([np.mean(r["train"]["loser_scale"]) for r in group])
            # Training-batch margin u and accuracy as train.py logs them, last 10 steps.
            train_u = np.array([np.mean(r["train"]["margin"][-10:]) for r in group])
            train_acc = np.array([np.mean(r["train"]["implicit_acc"][-10:]) for r in group])
            rows.append(
                {
                    "method": method,
                    "safeguard": safeguard,
                    "beta": group[0]["beta"],
                    "mu": group[0]["mu"] if safeguard else None,
                    "seeds": len(group),
                    "step": group[0]["heldout"]["step"][-1],
                    **{f"{k}_mean": float(v.mean()) for k, v in last.items()},
                    **{f"{k}_std": float(v.std()) for k, v in last.items()},
                    "seeds_winner_up": int((last["winner_diff"] > 0).sum()),
                    "seeds_loser_up": int((last["loser_diff"] > 0).sum()),
                    "seeds_margin_up": int((last["margin"] > 0).sum()),
                    "train_lambda_mean": float(lam.mean()),
                    "train_u_last10": float(train_u.mean()),
                    "train_acc_last10": float(train_acc.mean()),
                }
            )
    return rows


def plot_curves(agg: dict, outdir: Path) -> list[Path]:
    """``errors.png`` (winner / loser error minus reference vs step) and ``margin.png``
    (held-out margin, implicit accuracy, training λ): one column per method, safeguard off (red)
    vs on (blue), mean line and min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"off": ("tab:red", "safeguard off"), "on": ("tab:blue", "safeguard on")}
    figures = {
        "errors.png": [
            ("winner_diff", "step", "winner error − reference (×1e-3)", 1e3),
            ("loser_diff", "step", "loser error − reference (×1e-3)", 1e3),
        ],
        "margin.png": [
            ("margin", "step", "held-out margin: Δloser − Δwinner (×1e-3)", 1e3),
            ("implicit_acc", "step", "held-out implicit accuracy", 1.0),
            ("train_loser_scale", "train_step", "λ (training batches)", 1.0),
        ],
    }
    methods = list(agg)
    written = []
    for name, panels in figures.items():
        fig, axes = plt.subplots(
            len(panels), len(methods), figsize=(4.2 * len(methods), 3.0 * len(panels)),
            squeeze=False, sharex=True,
        )  # fmt: skip
        for col, method in enumerate(methods):
            for row, (key, xkey, label, scale) in enumerate(panels):
                ax = axes[row][col]
                for setting, (colour, legend) in colours.items():
                    if setting not in agg[method]:
                        continue
                    a = agg[method][setting]
                    x = np.asarray(a[xkey])
                    band = a[key]
                    if key == "implicit_acc":  # step 0: u = 0 exactly, so "u > 0" is 0 by rule
                        x, band = x[1:], {k: v[1:] for k, v in band.items()}
                    ax.plot(x, np.asarray(band["mean"]) * scale, color=colour, label=legend)
                    ax.fill_between(
                        x, np.asarray(band["min"]) * scale, np.asarray(band["max"]) * scale,
                        color=colour, alpha=0.2, linewidth=0,
                    )  # fmt: skip
                if key in ("winner_diff", "loser_diff", "margin"):
                    ax.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
                if key == "implicit_acc":
                    ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
                ax.set_ylabel(label, fontsize=9)
                ax.grid(alpha=0.3)
                if row == 0:
                    ax.set_title(method)
                if row == len(panels) - 1:
                    ax.set_xlabel("training step")
        axes[0][0].legend(fontsize=8, loc="best")
        seeds = len(next(iter(agg[methods[0]].values()))["seeds"])
        fig.suptitle(
            f"Toy task, held-out pairs at fixed noise/timesteps: mean and min–max over {seeds} seeds",
            fontsize=10,
        )
        fig.tight_layout()
        path = outdir / name
        tmp = outdir / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written


def _fmt(mean: float, std: float, scale: float = 1e3, digits: int = 1) -> str:
    return f"{mean * scale:+.{digits}f} ± {std * scale:.{digits}f}"


def write_summary(
    cfg: ToyConfig, table: list[dict], ref: dict, outdir: Path, seconds: float
) -> Path:
    """``summary.md``: settings, the table of final values, and what was observed (numbers)."""
    lines = [
        "# Toy reproduction: Diffusion-DPO / DSPO / DMPO with and without the SDPO safeguard",
        "",
        f"Task: {cfg.train_pairs} training and {cfg.heldout_pairs} held-out pairs of "
        f"{cfg.image_size}-px coloured shapes; loser = the winner's picture made worse "
        f"({', '.join(cfg.loser_kinds)}). Tiny SD1.5-style model, SFT start "
        f"({cfg.sft_steps} steps, lr {cfg.sft_lr:g}), then {cfg.steps} preference steps of "
        f"{cfg.batch_pairs} pairs, lr {cfg.lr:g}, {cfg.seeds} seeds, all through `train.py`. "
        f"Held-out: {cfg.eval_draws} fixed (noise, timestep) draws per pair. Reference (SFT) "
        f"held-out errors: winner {ref['winner_err']:.4f}, loser {ref['loser_err']:.4f}. "
        f"Wall time {seconds:.0f} s.",
        "",
        f"Final values at step {table[0]['step']} (policy − reference, ×1e-3, mean ± std over "
        "seeds; margin = Δloser − Δwinner, so u = β/2 · margin):",
        "",
        "| method | β | safeguard (μ) | Δ winner error | Δ loser error | margin | implicit acc "
        "| λ (train mean) | seeds winner↑ / margin↑ | train u / acc (last 10 steps) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        sg = f"on ({r['mu']:g})" if r["safeguard"] else "off"
        lines.append(
            f"| {r['method']} | {r['beta']:g} | {sg} "
            f"| {_fmt(r['winner_diff_mean'], r['winner_diff_std'])} "
            f"| {_fmt(r['loser_diff_mean'], r['loser_diff_std'])} "
            f"| {_fmt(r['margin_mean'], r['margin_std'], digits=2)} "
            f"| {r['implicit_acc_mean']:.2f} | {r['train_lambda_mean']:.2f} "
            f"| {r['seeds_winner_up']}/{r['seeds']} / {r['seeds_margin_up']}/{r['seeds']} "
            f"| {r['train_u_last10']:+.2f} / {r['train_acc_last10']:.2f} |"
        )
    lines += ["", "## Observed", ""]
    for method in dict.fromkeys(r["method"] for r in table):
        pair = {r["safeguard"]: r for r in table if r["method"] == method}
        if False not in pair or True not in pair:
            continue
        off, on = pair[False], pair[True]
        lines.append(
            f"- **{method}** (β {off['beta']:g}): without the safeguard the winner's error "
            f"{'rose' if off['winner_diff_mean'] > 0 else 'fell'} by "
            f"{off['winner_diff_mean'] * 1e3:+.1f}e-3 (up in {off['seeds_winner_up']}/"
            f"{off['seeds']} seeds) and the loser's by {off['loser_diff_mean'] * 1e3:+.1f}e-3, "
            f"margin {off['margin_mean'] * 1e3:+.2f}e-3 (accuracy {off['implicit_acc_mean']:.2f}); "
            f"with it (μ {on['mu']:g}, mean λ {on['train_lambda_mean']:.2f}) the winner's error "
            f"changed by {on['winner_diff_mean'] * 1e3:+.1f}e-3 (up in {on['seeds_winner_up']}/"
            f"{on['seeds']} seeds), the loser's by {on['loser_diff_mean'] * 1e3:+.1f}e-3, margin "
            f"{on['margin_mean'] * 1e3:+.2f}e-3 (accuracy {on['implicit_acc_mean']:.2f})."
        )
    lines += [
        "",
        "Plots: `errors.png` (winner / loser error minus reference), `margin.png` (held-out "
        "margin, implicit accuracy, λ). All curves: `curves.json`.",
        "",
    ]
    path = outdir / "summary.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def main(cfg: ToyConfig) -> dict:
    """Run the whole demo; returns the curves dict also written to ``outdir/curves.json``."""
    import json
    import os
    import time

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # workers inherit it: no progress-bar spam
    start = time.time()
    outdir = Path(cfg.outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    # One thread: with 2 threads on a busy 2-core machine, torch's thread pool can slow 10x.
    torch.set_num_threads(1)
    print(f"[toy] data, model and SFT start in {outdir}", flush=True)
    paths = prepare(cfg)
    heldout = build_heldout(cfg, paths)
    jobs = make_jobs(cfg, paths, heldout)
    print(f"[toy] {len(jobs)} preference runs on {cfg.workers} worker(s) "
          f"({time.time() - start:.0f} s so far)", flush=True)  # fmt: skip
    runs = run_jobs(jobs, cfg.workers)
    ref_pred = torch.load(heldout, weights_only=False)
    start_metrics = heldout_metrics(
        ref_pred["ref_pred"], ref_pred["ref_pred"], ref_pred["target"], mu=0.0
    )
    agg = aggregate(runs)
    table = final_table(runs)
    seconds = time.time() - start
    curves = {
        "settings": {
            k: getattr(cfg, k) for k in ("seeds", "steps", "lr", "batch_pairs", "eval_every",
                                         "sft_steps", "sft_lr", "train_pairs", "heldout_pairs",
                                         "eval_draws", "image_size", "loser_kinds", "methods")
        } | {"beta": cfg.betas, "mu": cfg.mus, "dmpo_alpha": DMPO_ALPHA},
        "reference": {"winner_err": start_metrics["winner_err"],
                      "loser_err": start_metrics["loser_err"]},
        "runs": {run_name(r["method"], r["safeguard"], r["seed"]): r for r in runs},
        "aggregate": agg,
        "final": table,
        "seconds": seconds,
    }  # fmt: skip
    tmp = outdir / "curves.json.tmp"
    tmp.write_text(json.dumps(curves, indent=1))
    tmp.replace(outdir / "curves.json")
    plot_curves(agg, outdir)
    summary = write_summary(cfg, table, curves["reference"], outdir, seconds)
    print(summary.read_text(), flush=True)
    print(f"[toy] done in {time.time() - start:.0f} s: {outdir}/summary.md, curves.json, "
          "errors.png, margin.png", flush=True)  # fmt: skip
    return curves


if __name__ == "__main__":
    main(parse_args())
