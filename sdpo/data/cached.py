"""Training from a precomputed cache of VAE posteriors and text conditioning (``--precomputed_dir``).

The cache is written by the ``python -m sdpo.cache`` tool. What it holds, per non-tie pair (the
rows and order of :func:`sdpo.data.pickapic.load_pairs`, winner first):

* the VAE POSTERIOR moments (mean and log-variance, ``[2·C, h, w]``, as the VAE returns them)
  of the winner and the loser, each also of its horizontally flipped image: training draws the
  latent sample from the posterior with the same keyed generator as the uncached step, and picks
  the flipped or plain moments with the same :class:`sdpo.data.pairs.Augment` draws, so sampling
  and random flips stay exact. ``--random_crop`` cannot be cached and is refused.
* the conditioning tensors of every DISTINCT caption, once, as the model family stores them
  (:meth:`sdpo.families.base.ModelFamily.cond_to_cache`; SD1.5: ``hidden``; SDXL: ``hidden`` and
  ``pooled``; SD3 / FLUX: the T5 and CLIP states), and the empty caption's, used where caption
  dropout replaces a caption. A prompt repeated over many pairs costs its (for T5, several MB)
  conditioning once.

Files: ``manifest.json`` (model, family, VAE, resolution, dtypes, data source; training refuses a
cache whose manifest does not match its flags), ``empty.safetensors``,
``text-NNNNN.safetensors`` (the conditioning tensors of the distinct captions, ``shard_size``
per file, in order of first appearance) and ``shard-NNNNN.safetensors`` (tensors ``moments``
``[N, 2 (winner, loser), 2 (plain, flipped), 2·C, h, w]``, ``caption`` ``[N]`` (the row's index
into the distinct captions), ``valid`` ``[N, 2]`` (0 where the winner / loser image does not
decode), ``rows`` ``[N]``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from sdpo.data.pairs import Augment, make_loader

FORMAT_VERSION = 3
MANIFEST = "manifest.json"
EMPTY_FILE = "empty.safetensors"
# Manifest entries training compares with its own flags (the rest is informational).
MATCH_KEYS = ("model", "revision", "vae", "family", "resolution", "mixed_precision", "data")
CONDITIONING_SKIP = ("moments", "valid", "rows")  # shard tensors that are not conditioning


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def text_shard_name(k: int) -> str:
    return f"text-{k:05d}.safetensors"


def cache_identity(
    model, *, family: str, resolution: int, mixed_precision: str, data, seed: int | None
) -> dict:
    """The settings a cache is valid for. ``model``: a :class:`sdpo.families.ModelSource`;
    ``data``: a :class:`sdpo.data.pickapic.DataSource`; ``seed``: the seed of a
    ``max_train_samples`` subset."""
    name = model.name_or_path
    return {
        "model": str(Path(name).resolve()) if Path(name).is_dir() else name,
        "revision": model.revision,
        "vae": model.vae,
        "family": family,
        "resolution": int(resolution),
        "mixed_precision": mixed_precision,
        "data": {
            **data.identity(),
            "subset_seed": seed if data.max_train_samples is not None else None,
        },
    }


def read_manifest(cache_dir) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"--precomputed_dir {str(cache_dir)!r}: no {MANIFEST} (not a cache)")
    return json.loads(path.read_text())


def identity_diff(manifest: dict, identity: dict) -> list[str]:
    return [k for k in MATCH_KEYS if manifest.get(k) != identity[k]]


def check_cache(cache_dir, identity: dict) -> dict:
    """Refuse a cache made for other settings, or an incomplete one; return its manifest.
    Called by training before any model loads."""
    manifest = read_manifest(cache_dir)
    diff = identity_diff(manifest, identity)
    if diff:
        details = "; ".join(
            f"{k}: cache {manifest.get(k)!r} vs training {identity[k]!r}" for k in diff
        )
        raise ValueError(
            f"--precomputed_dir {str(cache_dir)!r} was made for other settings ({details}); "
            "rerun python -m sdpo.cache with training's flags"
        )
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"--precomputed_dir {str(cache_dir)!r} is a cache of format "
            f"{manifest.get('format')} (this version reads {FORMAT_VERSION}): rebuild it with "
            "python -m sdpo.cache into a new folder"
        )
    if not manifest.get("complete"):
        raise ValueError(
            f"--precomputed_dir {str(cache_dir)!r} is incomplete: rerun the same "
            "python -m sdpo.cache command to finish it"
        )
    return manifest


class CachedPairs(torch.utils.data.Dataset):
    """The cached counterpart of :class:`sdpo.data.pairs.PreferencePairs`: same rows, same
    :class:`Augment` draws, same skipping of undecodable rows.

    Item: ``latent_moments`` ``[n, 2·C, h, w]`` (winner then loser; n = 1 when
    ``paired=False``), ``cond`` (the family's cached conditioning tensors of the caption, the
    empty caption's after dropout), ``index``, ``epoch``, ``corrupt``.
    """

    def __init__(self, cache_dir, augment: Augment, *, paired: bool = True):
        from safetensors.torch import load_file

        self.root = Path(cache_dir)
        self.manifest = read_manifest(self.root)
        self.augment, self.paired = augment, paired
        self.epoch = 0
        self.empty = load_file(str(self.root / EMPTY_FILE))
        self.shard_size = self.manifest["shard_size"]
        self._open: dict[str, object] = {}  # per process (and per DataLoader worker)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.manifest["pairs"]

    def _file(self, name: str):
        from safetensors import safe_open

        if name not in self._open:
            self._open[name] = safe_open(str(self.root / name), framework="pt")
        return self._open[name]

    def _get(self, key: str, row: int) -> torch.Tensor:
        k, i = divmod(row, self.shard_size)
        return self._file(shard_name(k)).get_slice(key)[i : i + 1][0]

    def _text(self, key: str, row: int) -> torch.Tensor:
        """The conditioning tensor ``key`` of the row's caption (stored once per caption)."""
        k, i = divmod(int(self._get("caption", row)), self.shard_size)
        return self._file(text_shard_name(k)).get_slice(key)[i : i + 1][0]

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
        n_images = 2 if self.paired else 1
        drop, flips = self.augment.cached_draws(self.epoch, row, n_images)
        moments = self._get("moments", row)  # [2, 2, 2C, h, w]
        chosen = [moments[image, int(flip)] for image, flip in enumerate(flips)]
        cond = {key: self.empty[key] if drop else self._text(key, row) for key in self.empty}
        return {
            "latent_moments": torch.stack(chosen),
            "cond": cond,
            "index": row,
            "epoch": self.epoch,
            "corrupt": corrupt,
        }


def collate_cached(items: list[dict], *, family, resolution: int) -> dict:
    """Items -> a batch for :func:`sdpo.step.training_step`: ``latent_moments`` ``[n·B, 2C, h, w]``
    (B winners, then B losers), ``cond`` (the family's float32 conditioning kwargs),
    ``index`` / ``epoch`` ``[B]``, ``corrupt``."""
    moments = torch.stack([it["latent_moments"] for it in items])  # [B, n, 2C, h, w]
    tensors = {key: torch.stack([it["cond"][key] for it in items]) for key in items[0]["cond"]}
    return {
        "latent_moments": torch.cat(moments.unbind(1)),
        "cond": family.cond_from_cache(tensors, resolution),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "epoch": torch.tensor([it["epoch"] for it in items], dtype=torch.long),
        "corrupt": sum(it["corrupt"] for it in items),
    }


def build_cached_loader(
    cache_dir, augment: Augment, *, family, paired, batch_size, num_workers, shuffle=True
):
    """``(loader, dataset, sampler, info)`` of a checked cache (see :func:`check_cache`)."""
    dataset = CachedPairs(cache_dir, augment, paired=paired)
    collate = functools.partial(collate_cached, family=family, resolution=augment.resolution)
    loader, sampler = make_loader(
        dataset,
        seed=augment.seed,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate,
        shuffle=shuffle,
    )
    info = {k: dataset.manifest[k] for k in ("rows", "ties_dropped", "pairs")}
    return loader, dataset, sampler, info
