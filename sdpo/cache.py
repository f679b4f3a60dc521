"""The precompute tool: cache the VAE posteriors and text conditioning of a preference data set.

    python -m sdpo.cache --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset_name yuvalkirstain/pickapic_v2 --output_dir cache/sd15-512 --mixed_precision bf16
    accelerate launch -m sdpo.cache ...     # shards shared over the GPUs
    accelerate launch train.py ... --precomputed_dir cache/sd15-512

The reference re-encodes every image with the VAE and every caption with the text encoder at
every step; a VAE encode costs more than a UNet forward. This tool runs them once. What the cache
holds and how training reads it: :mod:`sdpo.data.cached`.

Every file is written atomically (:mod:`sdpo.io`); a rerun computes only the missing shards
(resume), and ``manifest.json`` says ``"complete": true`` once all are there. Values are stored
in the dtype the encoders ran in (the VAE's and the text encoders' under ``--mixed_precision``),
so training reads exactly what the uncached step would compute (up to the batch composition of
the VAE convolutions).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpo import io
from sdpo.cli import arg, parse
from sdpo.config import DataFlags, ModelFlags, validate_data
from sdpo.data.cached import (
    EMPTY_FILE,
    FORMAT_VERSION,
    MANIFEST,
    cache_identity,
    identity_diff,
    read_manifest,
    shard_name,
    text_shard_name,
)
from sdpo.data.pickapic import DataSource
from sdpo.families import ModelSource

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class CacheConfig(DataFlags, ModelFlags):
    """Flags of ``python -m sdpo.cache``: the model and data flags of ``train.py`` (same names and
    meaning), plus the cache's own."""

    seed: int | None = arg(None, "Seed of the --max_train_samples subset (training's --seed).")
    random_crop: bool = arg(False, "Not cacheable: refused (crops differ at every epoch).")
    mixed_precision: str = arg(
        "bf16", "Precision the encoders run in; must equal training's.", choices=list(DTYPES)
    )
    output_dir: str | None = arg(None, "Cache folder (created; resumable).")
    batch_size: int = arg(8, "Pairs encoded per VAE / text-encoder call.")
    shard_size: int = arg(1024, "Pairs per shard file.")
    dataloader_num_workers: int = arg(4, "Image-decoding worker processes.")


def validate(cfg: CacheConfig) -> CacheConfig:
    """Resolve defaults and raise ONE ``ValueError`` naming the flag, before anything loads."""

    def bad(flag: str, why: str):
        raise ValueError(f"--{flag}: {why}")

    if cfg.resolution is None:
        cfg.resolution = 1024 if cfg.sdxl else 512
    if not cfg.pretrained_model_name_or_path:
        bad("pretrained_model_name_or_path", "is required")
    if not cfg.output_dir:
        bad("output_dir", "is required")
    validate_data(cfg, cached=True)  # the data flags' checks, shared with train.py
    if cfg.random_crop:
        bad(
            "random_crop",
            "random crops cannot be precomputed (each epoch draws a new crop); train without "
            "--precomputed_dir, or use the centre crop",
        )
    if cfg.mixed_precision not in DTYPES:
        bad("mixed_precision", f"{cfg.mixed_precision!r} is not one of {list(DTYPES)}")
    for name in ("resolution", "batch_size", "shard_size"):
        if getattr(cfg, name) <= 0:
            bad(name, f"must be a positive integer, got {getattr(cfg, name)}")
    if cfg.resolution % 8:
        bad("resolution", f"must be a multiple of 8, got {cfg.resolution}")
    if cfg.max_train_samples is not None and cfg.seed is None:
        bad("seed", "--max_train_samples draws its subset with --seed: give training's --seed")
    return cfg


def parse_args(argv: list[str] | None = None) -> CacheConfig:
    return parse(
        CacheConfig,
        argv,
        prog="python -m sdpo.cache",
        description="Cache VAE posteriors and text embeddings of preference pairs for train.py.",
        check=validate,
    )


# ---------------------------------------------------------------------------------------------
# Precompute
# ---------------------------------------------------------------------------------------------


class _RowImages(torch.utils.data.Dataset):
    """Row i of the filtered dataset -> ``(images [2, 3, R, R], caption, valid [2])`` (winner, loser)
    with the training transforms minus the random flip (Resize -> CenterCrop -> [-1, 1])."""

    def __init__(self, hf_dataset, rows, resolution: int):
        self.ds, self.rows, self.resolution = hf_dataset, rows, resolution

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        from sdpo.data.pairs import decode_image, transform_image
        from sdpo.data.pickapic import ordered

        row = self.ds[self.rows[i]]
        images, valid = [], []
        for value in ordered(row):  # winner, loser: each may fail on its own (SFT needs one)
            try:
                image = decode_image(value)
            except Exception as err:  # PIL raises several types on corrupt bytes
                logger.warning("row %d: image does not decode (%s)", self.rows[i], err)
                images.append(torch.zeros(3, self.resolution, self.resolution))
                valid.append(False)
                continue
            images.append(transform_image(image, self.resolution))
            valid.append(True)
        return torch.stack(images), row["caption"] or "", valid


def _collate_rows(items):
    images, captions, valid = zip(*items)
    return torch.stack(images), list(captions), torch.tensor(valid, dtype=torch.uint8)


def unique_captions(hf_dataset) -> tuple[list[str], list[int]]:
    """``(distinct captions in order of first appearance, each row's index into them)``, read
    from the caption column alone (no image is touched)."""
    column = hf_dataset.select_columns(["caption"])["caption"]
    first: dict[str, int] = {}
    index = [first.setdefault(c or "", len(first)) for c in column]
    return list(first), index


@torch.no_grad()
def encode_text(parts, captions: list[str], device, dtype) -> dict[str, torch.Tensor]:
    """The family's cached conditioning tensors (``{"hidden": [B, 77, D]}``, + ``"pooled"``
    ``[B, P]`` for SDXL) in ``dtype`` (the encoders' own output dtype, so the float32 value
    training uses is recovered exactly)."""
    cond = parts.encode_prompts(captions, device)
    return {k: v.to(dtype) for k, v in parts.family.cond_to_cache(cond).items()}


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 3, R, R]`` (winner, loser) -> posterior moments
    ``[B, 2, 2 (plain, flipped), 2·C, h, w]`` in the VAE's dtype."""
    b = images.shape[0]
    flat = images.flatten(0, 1).to(vae.device, vae.dtype)
    both = torch.cat([flat, flat.flip(-1)])  # hflip of a [.., H, W] image = reverse W
    moments = vae.encode(both).latent_dist.parameters  # [2·2B, 2C, h, w]
    plain, flipped = moments.chunk(2)
    return torch.stack([plain, flipped], dim=1).unflatten(0, (b, 2))


def precompute(cfg: CacheConfig, state=None) -> dict:
    """Write (or finish) the cache of ``cfg``; returns the manifest. ``state``: an accelerate
    ``PartialState`` (or an object with ``process_index``, ``num_processes``,
    ``is_main_process``, ``device``, ``wait_for_everyone()``)."""
    from tqdm.auto import tqdm

    from sdpo.data.pickapic import load_pairs
    from sdpo.families import check_family

    validate(cfg)
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    out = Path(cfg.output_dir)
    source = ModelSource.from_flags(cfg)
    # Configs only: the wrong family / a non-epsilon model fails before any weight loads.
    family = check_family(source, flags={"sdxl": cfg.sdxl})
    data = DataSource.from_flags(cfg)
    identity = cache_identity(
        source,
        family=family.name,
        resolution=cfg.resolution,
        mixed_precision=cfg.mixed_precision,
        data=data,
        seed=cfg.seed,
    )
    if (out / MANIFEST).is_file():
        diff = identity_diff(read_manifest(out), identity)
        if diff:
            raise ValueError(
                f"--output_dir {str(out)!r} holds a cache of other settings ({diff}); use "
                "another --output_dir"
            )
    hf_ds, info = load_pairs(data, cfg.seed if cfg.seed is not None else 0)
    n = len(hf_ds)
    num_shards = (n + cfg.shard_size - 1) // cfg.shard_size
    # Each distinct caption is encoded and stored once (T5 states are MBs per caption; data sets
    # repeat a prompt over many pairs); image shards keep an index into this list.
    captions, caption_index = unique_captions(hf_ds)
    num_text_shards = (len(captions) + cfg.shard_size - 1) // cfg.shard_size
    if (out / MANIFEST).is_file() and read_manifest(out).get("pairs") not in (None, n):
        raise ValueError(f"--output_dir {str(out)!r}: cache of another pair count; start afresh")

    # The cache never needs the denoiser.
    parts = family.load_parts(source, resolution=cfg.resolution, with_denoiser=False)
    dtype = DTYPES[cfg.mixed_precision]
    parts.freeze_and_place(state.device, dtype)
    vae_dtype, text_dtype = parts.vae.dtype, parts.text_encoders[0].dtype
    empty = encode_text(parts, [""], state.device, text_dtype)
    latent = cfg.resolution // (2 ** (len(parts.vae.config.block_out_channels) - 1))
    manifest = {
        "format": FORMAT_VERSION,
        **identity,
        "vae_dtype": str(vae_dtype).removeprefix("torch."),
        "text_dtype": str(text_dtype).removeprefix("torch."),
        "scaling_factor": float(parts.vae.config.scaling_factor),
        "moments_shape": [2 * parts.vae.config.latent_channels, latent, latent],
        "conditioning_shapes": {k: list(v.shape[1:]) for k, v in empty.items()},
        "pairs": n,
        "captions": len(captions),
        "num_text_shards": num_text_shards,
        "rows": info["rows"],
        "ties_dropped": info["ties_dropped"],
        "shard_size": cfg.shard_size,
        "num_shards": num_shards,
        "complete": False,
    }
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        io.remove_stale(out)
        io.write_json(out / MANIFEST, manifest)
        io.save_safetensors({k: v[0] for k, v in empty.items()}, out / EMPTY_FILE)
    state.wait_for_everyone()

    text_todo = [
        k
        for k in range(state.process_index, num_text_shards, state.num_processes)
        if not (out / text_shard_name(k)).is_file()
    ]
    for k in tqdm(text_todo, desc="cache captions", disable=not state.is_main_process):
        chunk = captions[k * cfg.shard_size : (k + 1) * cfg.shard_size]
        parts_text: dict[str, list] = {}
        for start in range(0, len(chunk), cfg.batch_size):
            batch = chunk[start : start + cfg.batch_size]
            for key, value in encode_text(parts, batch, state.device, text_dtype).items():
                parts_text.setdefault(key, []).append(value.cpu())
        io.save_safetensors(
            {key: torch.cat(v) for key, v in parts_text.items()}, out / text_shard_name(k)
        )

    mine = [
        k
        for k in range(state.process_index, num_shards, state.num_processes)
        if not (out / shard_name(k)).is_file()
    ]
    bar = tqdm(total=len(mine), desc="cache shards", disable=not state.is_main_process)
    for k in mine:
        rows = list(range(k * cfg.shard_size, min((k + 1) * cfg.shard_size, n)))
        loader = torch.utils.data.DataLoader(
            _RowImages(hf_ds, rows, cfg.resolution),
            batch_size=cfg.batch_size,
            num_workers=cfg.dataloader_num_workers,
            collate_fn=_collate_rows,
        )
        chunks: dict[str, list] = {"moments": [], "valid": []}
        for images, _, valid in loader:
            chunks["moments"].append(encode_images(parts.vae, images).cpu())
            chunks["valid"].append(valid)
        tensors = {key: torch.cat(v) for key, v in chunks.items() if v}
        tensors["rows"] = torch.tensor(rows, dtype=torch.long)
        tensors["caption"] = torch.tensor([caption_index[r] for r in rows], dtype=torch.long)
        io.save_safetensors(tensors, out / shard_name(k))
        bar.update(1)
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        missing = [k for k in range(num_shards) if not (out / shard_name(k)).is_file()]
        missing += [
            f"text {k}" for k in range(num_text_shards) if not (out / text_shard_name(k)).is_file()
        ]
        if missing:
            raise RuntimeError(f"shards {missing[:5]} are missing after the run; rerun")
        manifest["complete"] = True
        io.write_json(out / MANIFEST, manifest)
        logger.info("cache complete: %d pairs in %d shards at %s", n, num_shards, out)
    state.wait_for_everyone()
    return manifest


def main(cfg: CacheConfig) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level="INFO")
    return precompute(cfg)


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as err:
        sys.exit(f"error: {err}")
