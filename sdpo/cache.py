"""Precompute the VAE posteriors and text-encoder outputs of a Pick-a-Pic split, and train from them.

    python -m sdpo.cache --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset_name yuvalkirstain/pickapic_v2 --output_dir cache/sd15-512 --mixed_precision bf16
    accelerate launch -m sdpo.cache ...     # shards shared over the GPUs
    accelerate launch train.py ... --precomputed_dir cache/sd15-512

The reference re-encodes every image with the VAE and every caption with the text encoder at
every step; a VAE encode costs more than a UNet forward. This module runs them once.

What is cached, per non-tie pair (the rows and order of :func:`sdpo.data.load_pickapic`,
winner first by :func:`sdpo.data._ordered`):

* the VAE POSTERIOR moments (mean and log-variance, ``[2·C, h, w]``, as the VAE returns them)
  of the winner and the loser, each also of its horizontally flipped image: training draws the
  latent sample from the posterior with the same keyed generator as the uncached step, and picks
  the flipped or plain moments with the same keyed draw as :class:`sdpo.data.PreferencePairs`, so
  sampling and random flips stay exact. (A flip is a pixel permutation, so the flipped image is
  exactly ``TF.hflip`` of the plain one.) ``--random_crop`` cannot be cached and is refused.
* the caption's text conditioning (SD1.5: last hidden state ``[77, D]``; SDXL: both encoders'
  penultimate hidden states concatenated ``[77, D1 + D2]`` and the pooled embedding ``[P]``), and,
  once, the empty caption's, used where caption dropout replaces a caption by "".

Files in ``--output_dir``: ``manifest.json`` (model, VAE, resolution, dtypes, data source; training
refuses a cache whose manifest does not match its flags), ``empty.safetensors`` and
``shard-NNNNN.safetensors`` (``--shard_size`` pairs each; tensors ``moments``
``[N, 2 (winner, loser), 2 (plain, flipped), 2·C, h, w]``, ``hidden`` ``[N, 77, D]``, ``pooled``
``[N, P]`` (SDXL), ``valid`` ``[N, 2]`` (0 where the winner / loser image does not decode), ``rows`` ``[N]``).
Every file is written to a temporary name and renamed; a rerun computes only the missing shards
(resume), and ``manifest.json`` says ``"complete": true`` once all are there.

Values are stored in the dtype the encoders ran in (the VAE's and the text encoders' under
``--mixed_precision``), so training reads exactly what the uncached step would compute (up to
the batch composition of the VAE convolutions).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMPTY_FILE = "empty.safetensors"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Manifest entries training compares with its own flags (the rest is informational).
MATCH_KEYS = ("model", "revision", "vae", "sdxl", "resolution", "mixed_precision", "data")


def _f(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class CacheConfig:
    """Flags of ``python -m sdpo.cache`` (same names and meaning as ``train.py``'s)."""

    pretrained_model_name_or_path: str | None = _f(None, "Base model (hub id or folder).")
    revision: str | None = _f(None, "Hub revision of the base model.")
    pretrained_vae_model_name_or_path: str | None = _f(None, "Separate VAE (hub id or folder).")
    sdxl: bool = _f(False, "The base model is SDXL.")
    dataset_name: str | None = _f(None, "Hub dataset id in the Pick-a-Pic v2 schema.")
    dataset_config_name: str | None = _f(None, "Config name of --dataset_name.")
    train_data_dir: str | None = _f(None, "Local folder of Pick-a-Pic parquet/arrow files.")
    split: str = _f("train", "Dataset split.")
    cache_dir: str | None = _f(None, "Cache folder for hub models and datasets.")
    max_train_samples: int | None = _f(
        None, "Keep this many pairs drawn with --seed (must match training's flags and seed)."
    )
    seed: int | None = _f(None, "Seed of the --max_train_samples subset (training's --seed).")
    resolution: int | None = _f(None, "Image size (default 512, or 1024 with --sdxl).")
    random_crop: bool = _f(False, "Not cacheable: refused (crops differ at every epoch).")
    mixed_precision: str = _f(
        "bf16", "Precision the encoders run in; must equal training's.", choices=list(DTYPES)
    )
    output_dir: str | None = _f(None, "Cache folder (created; resumable).")
    batch_size: int = _f(8, "Pairs encoded per VAE / text-encoder call.")
    shard_size: int = _f(1024, "Pairs per shard file.")
    dataloader_num_workers: int = _f(4, "Image-decoding worker processes.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdpo.cache",
        description="Cache VAE posteriors and text embeddings of Pick-a-Pic pairs for train.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(CacheConfig):
        kwargs = {"help": f.metadata["help"], "default": f.default}
        kind = str(f.type)
        if kind.startswith("bool"):
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = int if kind.startswith("int") else str
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


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
    if bool(cfg.dataset_name) == bool(cfg.train_data_dir):
        bad("dataset_name", "give exactly one of --dataset_name or --train_data_dir")
    if cfg.train_data_dir and not os.path.isdir(cfg.train_data_dir):
        bad("train_data_dir", f"folder {cfg.train_data_dir!r} does not exist")
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
    parser = build_parser()
    cfg = CacheConfig(**vars(parser.parse_args(argv)))
    try:
        return validate(cfg)
    except ValueError as err:
        parser.error(str(err))


# ---------------------------------------------------------------------------------------------
# Identity of a cache: what training must match
# ---------------------------------------------------------------------------------------------


def cache_identity(cfg) -> dict:
    """The settings a cache is valid for, from a :class:`CacheConfig` or a training config."""
    data_source = cfg.dataset_name or str(Path(cfg.train_data_dir).resolve())
    subset = cfg.max_train_samples
    return {
        "model": cfg.pretrained_model_name_or_path
        if not os.path.isdir(cfg.pretrained_model_name_or_path)
        else str(Path(cfg.pretrained_model_name_or_path).resolve()),
        "revision": cfg.revision,
        "vae": cfg.pretrained_vae_model_name_or_path,
        "sdxl": bool(cfg.sdxl),
        "resolution": int(cfg.resolution),
        "mixed_precision": cfg.mixed_precision,
        "data": {
            "source": data_source,
            "config": cfg.dataset_config_name,
            "split": cfg.split,
            "max_train_samples": subset,
            "subset_seed": cfg.seed if subset is not None else None,
        },
    }


def read_manifest(cache_dir) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"--precomputed_dir {str(cache_dir)!r}: no {MANIFEST} (not a cache)")
    return json.loads(path.read_text())


def check_cache(cache_dir, train_cfg) -> dict:
    """Refuse a cache made for other settings, or an incomplete one; return its manifest.

    Called by training before any model loads. ``train_cfg`` carries training's flags (and the
    seed actually used as ``seed`` when a subset is drawn)."""
    manifest = read_manifest(cache_dir)
    if getattr(train_cfg, "random_crop", False):
        raise ValueError("--random_crop cannot be combined with --precomputed_dir")
    want = cache_identity(train_cfg)
    diff = [k for k in MATCH_KEYS if manifest.get(k) != want[k]]
    if diff:
        details = "; ".join(f"{k}: cache {manifest.get(k)!r} vs training {want[k]!r}" for k in diff)
        raise ValueError(
            f"--precomputed_dir {str(cache_dir)!r} was made for other settings ({details}); "
            "rerun python -m sdpo.cache with training's flags"
        )
    if not manifest.get("complete"):
        raise ValueError(
            f"--precomputed_dir {str(cache_dir)!r} is incomplete: rerun the same "
            "python -m sdpo.cache command to finish it"
        )
    return manifest


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _save_atomic(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


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
        from sdpo.data import _ordered, decode_image, transform_image

        row = self.ds[self.rows[i]]
        gen = torch.Generator()  # unused without random crop / flip
        images, valid = [], []
        for value in _ordered(row):  # winner, loser: each may fail on its own (SFT needs one)
            try:
                image = decode_image(value)
            except Exception as err:  # PIL raises several types on corrupt bytes
                logger.warning("row %d: image does not decode (%s)", self.rows[i], err)
                images.append(torch.zeros(3, self.resolution, self.resolution))
                valid.append(False)
                continue
            images.append(
                transform_image(image, self.resolution, gen, random_crop=False, hflip=False)
            )
            valid.append(True)
        return torch.stack(images), row["caption"] or "", valid


def _collate_rows(items):
    images, captions, valid = zip(*items)
    return torch.stack(images), list(captions), torch.tensor(valid, dtype=torch.uint8)


def load_encoders(cfg):
    """A :class:`sdpo.family.ModelParts` without the UNet: the cache never needs it."""
    from sdpo.family import load_model_parts

    return load_model_parts(cfg, with_unet=False)


@torch.no_grad()
def encode_text(parts, captions: list[str], device, dtype) -> dict[str, torch.Tensor]:
    """``{"hidden": [B, 77, D]}`` (+ ``"pooled": [B, P]`` for SDXL) in ``dtype`` (the encoders'
    own output dtype, so the float32 value training uses is recovered exactly)."""
    cond = parts.encode_prompts(captions, device)
    out = {"hidden": cond["encoder_hidden_states"].to(dtype)}
    if "added_cond_kwargs" in cond:
        out["pooled"] = cond["added_cond_kwargs"]["text_embeds"].to(dtype)
    return out


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

    from sdpo.data import load_pickapic
    from sdpo.family import check_family

    validate(cfg)
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    out = Path(cfg.output_dir)
    identity = cache_identity(cfg)
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        diff = [k for k in MATCH_KEYS if old.get(k) != identity[k]]
        if diff:
            raise ValueError(
                f"--output_dir {str(out)!r} holds a cache of other settings ({diff}); use "
                "another --output_dir"
            )
    # Configs only: the wrong family / a non-epsilon model fails before any weight loads.
    check_family(_FamilyView(cfg))
    hf_ds, info = load_pickapic(cfg, cfg.seed if cfg.seed is not None else 0)
    n = len(hf_ds)
    num_shards = (n + cfg.shard_size - 1) // cfg.shard_size
    if (out / MANIFEST).is_file() and read_manifest(out).get("pairs") not in (None, n):
        raise ValueError(f"--output_dir {str(out)!r}: cache of another pair count; start afresh")

    parts = load_encoders(cfg)
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
        "hidden_shape": list(empty["hidden"].shape[1:]),
        "pooled_dim": int(empty["pooled"].shape[-1]) if "pooled" in empty else None,
        "pairs": n,
        "rows": info["rows"],
        "ties_dropped": info["ties_dropped"],
        "shard_size": cfg.shard_size,
        "num_shards": num_shards,
        "complete": False,
    }
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("*.tmp"):
            stale.unlink()
        _write_json_atomic(out / MANIFEST, manifest)
        _save_atomic({k: v[0] for k, v in empty.items()}, out / EMPTY_FILE)
    state.wait_for_everyone()

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
        chunks: dict[str, list] = {"moments": [], "hidden": [], "pooled": [], "valid": []}
        for images, captions, valid in loader:
            chunks["moments"].append(encode_images(parts.vae, images).cpu())
            for key, value in encode_text(parts, captions, state.device, text_dtype).items():
                chunks[key].append(value.cpu())
            chunks["valid"].append(valid)
        tensors = {key: torch.cat(v) for key, v in chunks.items() if v}
        tensors["rows"] = torch.tensor(rows, dtype=torch.long)
        _save_atomic(tensors, out / shard_name(k))
        bar.update(1)
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        missing = [k for k in range(num_shards) if not (out / shard_name(k)).is_file()]
        if missing:
            raise RuntimeError(f"shards {missing[:5]} are missing after the run; rerun")
        manifest["complete"] = True
        _write_json_atomic(out / MANIFEST, manifest)
        logger.info("cache complete: %d pairs in %d shards at %s", n, num_shards, out)
    state.wait_for_everyone()
    return manifest


class _FamilyView:
    """The attributes :func:`sdpo.family.check_family` reads, from a cache config."""

    def __init__(self, cfg):
        self.pretrained_model_name_or_path = cfg.pretrained_model_name_or_path
        self.revision, self.cache_dir, self.sdxl = cfg.revision, cfg.cache_dir, cfg.sdxl


# ---------------------------------------------------------------------------------------------
# Training from the cache
# ---------------------------------------------------------------------------------------------


class CachedPairs(torch.utils.data.Dataset):
    """The cached counterpart of :class:`sdpo.data.PreferencePairs`: same rows, same keyed
    caption-dropout and flip draws, same skipping of undecodable rows.

    Item: ``latent_moments`` ``[n, 2·C, h, w]`` (winner then loser; n = 1 when
    ``paired=False``), ``hidden`` ``[77, D]`` (+ ``pooled`` ``[P]`` for SDXL; the empty caption's
    after dropout), ``index``, ``epoch``, ``corrupt``.
    """

    def __init__(
        self,
        cache_dir,
        *,
        seed: int,
        paired: bool = True,
        hflip: bool = True,
        proportion_empty_prompts: float = 0.0,
    ):
        from safetensors.torch import load_file

        self.root = Path(cache_dir)
        self.manifest = read_manifest(self.root)
        self.seed, self.paired, self.hflip = seed, paired, hflip
        self.proportion_empty_prompts = proportion_empty_prompts
        self.epoch = 0
        self.empty = load_file(str(self.root / EMPTY_FILE))
        self.shard_size = self.manifest["shard_size"]
        self._open: dict[int, object] = {}  # per process (and per DataLoader worker)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.manifest["pairs"]

    def _shard(self, k: int):
        from safetensors import safe_open

        if k not in self._open:
            self._open[k] = safe_open(str(self.root / shard_name(k)), framework="pt")
        return self._open[k]

    def _get(self, key: str, row: int) -> torch.Tensor:
        k, i = divmod(row, self.shard_size)
        return self._shard(k).get_slice(key)[i : i + 1][0]

    def __getstate__(self):  # open file handles stay in their process (DataLoader workers)
        return {**self.__dict__, "_open": {}}

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        for skipped in range(n):
            row = (index + skipped) % n
            valid = self._get("valid", row)  # [2]: winner, loser decodable
            if bool(valid.all()) if self.paired else bool(valid[0]):
                return self._make_item(row, skipped)
        raise RuntimeError("no row of the cache has decodable images")

    def _make_item(self, row: int, corrupt: int) -> dict:
        from sdpo.data import PURPOSE_AUGMENT, keyed_generator

        # The draws of sdpo.data.PreferencePairs._make_item, in the same order: caption dropout,
        # then one flip per image (winner, then loser).
        gen = keyed_generator(self.seed, PURPOSE_AUGMENT, self.epoch, row)
        drop = bool(torch.rand((), generator=gen) < self.proportion_empty_prompts)
        moments = self._get("moments", row)  # [2, 2, 2C, h, w]
        chosen = []
        for image in range(2 if self.paired else 1):
            flip = self.hflip and bool(torch.rand((), generator=gen) < 0.5)
            chosen.append(moments[image, int(flip)])
        item = {
            "latent_moments": torch.stack(chosen),
            "index": row,
            "epoch": self.epoch,
            "corrupt": corrupt,
        }
        for key in ("hidden", "pooled"):
            if key in self.empty:
                item[key] = self.empty[key] if drop else self._get(key, row)
        return item


def collate_cached(items: list[dict], resolution: int | None = None) -> dict:
    """Items -> a batch for :func:`sdpo.step.training_step`: ``latent_moments`` ``[n·B, 2C, h, w]``
    (B winners, then B losers), ``cond`` (float32 UNet conditioning kwargs, for SDXL with
    ``time_ids = [R, R, 0, 0, R, R]``), ``index`` / ``epoch`` ``[B]``, ``corrupt``."""
    moments = torch.stack([it["latent_moments"] for it in items])  # [B, n, 2C, h, w]
    cond = {"encoder_hidden_states": torch.stack([it["hidden"] for it in items]).float()}
    if "pooled" in items[0]:
        size = float(resolution)
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.stack([it["pooled"] for it in items]).float(),
            "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * len(items)),
        }
    return {
        "latent_moments": torch.cat(moments.unbind(1)),
        "cond": cond,
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "epoch": torch.tensor([it["epoch"] for it in items], dtype=torch.long),
        "corrupt": sum(it["corrupt"] for it in items),
    }


def build_cached_dataloader(cfg, *, paired: bool, seed: int):
    """The cached counterpart of :func:`sdpo.data.build_dataloader` (same return values:
    ``(loader, dataset, sampler, info)``); checks the cache against ``cfg`` first."""
    import functools

    from sdpo.data import EpochShuffleSampler

    manifest = check_cache(cfg.precomputed_dir, _WithSeed(cfg, seed))
    dataset = CachedPairs(
        cfg.precomputed_dir,
        seed=seed,
        paired=paired,
        hflip=not cfg.no_hflip,
        proportion_empty_prompts=cfg.proportion_empty_prompts,
    )
    sampler = EpochShuffleSampler(len(dataset), seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.train_batch_size,
        sampler=sampler,
        collate_fn=functools.partial(collate_cached, resolution=cfg.resolution),
        num_workers=cfg.dataloader_num_workers,
        drop_last=True,
    )
    info = {k: manifest[k] for k in ("rows", "ties_dropped", "pairs")}
    return loader, dataset, sampler, info


class _WithSeed:
    """``cfg`` with ``seed`` replaced by the seed training actually uses."""

    def __init__(self, cfg, seed):
        self._cfg, self.seed = cfg, seed

    def __getattr__(self, name):
        return getattr(self._cfg, name)


def main(cfg: CacheConfig) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level="INFO")
    return precompute(cfg)


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as err:
        sys.exit(f"error: {err}")
