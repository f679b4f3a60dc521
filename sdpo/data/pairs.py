"""Preference pairs as training batches: decoding, augmentation, batching, order.

Randomness (caption dropout, crops, flips) is drawn by ONE object, :class:`Augment`, from a
generator keyed by ``(seed, epoch, row index)``, not from a global stream, so the same row gets
the same augmentation whatever the number of processes, workers or accumulation steps, and a
resumed run sees exactly the data of an uninterrupted one. The cached data path
(:mod:`sdpo.data.cached`) draws through the same object in the same order. The shuffle order is
keyed by ``(seed, epoch)``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from sdpo.data.pickapic import ordered

logger = logging.getLogger(__name__)

# Purposes mixed into the per-row seeds, so data and noise streams never coincide.
PURPOSE_SHUFFLE, PURPOSE_AUGMENT, PURPOSE_NOISE = 0, 1, 2


def keyed_seed(*key: int) -> int:
    """A 63-bit seed hashed from integers (``numpy.random.SeedSequence``): ``(seed, purpose, epoch,
    index)`` -> independent streams with no arithmetic collisions."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in key]).generate_state(
        1, np.uint64
    )
    return int(state[0] >> np.uint64(1))


def keyed_generator(*key: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(keyed_seed(*key))


def image_bytes(value) -> bytes:
    """The encoded bytes of an undecoded image value (bytes, ``{"bytes", "path"}`` or a path)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value["path"]
    if isinstance(value, str):
        with open(value, "rb") as fh:
            return fh.read()
    return bytes(value)


def decode_image(value):
    """Encoded bytes (or ``{"bytes": ...}``, a file path, a PIL image) -> RGB PIL image, fully
    decoded."""
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value["path"]
    if isinstance(value, str):
        with open(value, "rb") as fh:
            value = fh.read()
    if isinstance(value, Image.Image):
        image = value
    else:
        image = Image.open(io.BytesIO(value))
    image.load()  # truncated / corrupt data raises here, not later in a worker
    return image.convert("RGB")


def transform_image(image, resolution: int, gen=None, *, random_crop: bool = False, flip=False):
    """Reference transforms: Resize(bilinear, shorter side) -> Center/RandomCrop (drawn from
    ``gen``) -> horizontal flip -> tensor in [-1, 1] of shape ``[3, resolution, resolution]``.

    ``flip`` is a bool or a callable drawing it (called after the crop's draws)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = TF.resize(image, resolution, interpolation=InterpolationMode.BILINEAR)
    width, height = image.size
    if random_crop:
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=gen))
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=gen))
        image = TF.crop(image, top, left, resolution, resolution)
    else:
        image = TF.center_crop(image, [resolution, resolution])
    if flip() if callable(flip) else flip:
        image = TF.hflip(image)
    return TF.to_tensor(image) * 2.0 - 1.0


@dataclass(frozen=True)
class Augment:
    """The training augmentations and the ONE order in which their random numbers are drawn
    from a row's keyed generator: caption dropout first, then per image (winner, then loser) its
    random crop (image path only) and its flip."""

    resolution: int
    seed: int
    random_crop: bool = False
    hflip: bool = True
    proportion_empty_prompts: float = 0.0

    def generator(self, epoch: int, row: int) -> torch.Generator:
        return keyed_generator(self.seed, PURPOSE_AUGMENT, epoch, row)

    def drop_caption(self, gen: torch.Generator) -> bool:
        return bool(torch.rand((), generator=gen) < self.proportion_empty_prompts)

    def flip(self, gen: torch.Generator) -> bool:
        return self.hflip and bool(torch.rand((), generator=gen) < 0.5)

    def image(self, image, gen: torch.Generator) -> torch.Tensor:
        """Resize -> crop (random or centre) -> this image's flip draw -> ``[3, R, R]`` in [-1, 1]."""
        return transform_image(
            image, self.resolution, gen, random_crop=self.random_crop, flip=lambda: self.flip(gen)
        )

    def cached_draws(self, epoch: int, row: int, n_images: int) -> tuple[bool, list[bool]]:
        """``(drop caption, [flip per image])``: the draws of :meth:`image` for precomputed
        images, which have no crop to draw (random crops cannot be cached)."""
        gen = self.generator(epoch, row)
        return self.drop_caption(gen), [self.flip(gen) for _ in range(n_images)]


CHOICE_ALIASES = {"hps": "hpsv2", "aes": "aesthetics"}  # the official --choice_model names


class RewardChooser:
    """``--choice_model``: a reward model re-decides each pair when its row is read (the
    official online relabelling): the image it scores higher becomes the winner; equal scores
    keep the data's order. The scorer is built on first use in the process that reads rows
    (each DataLoader worker builds its own), through :mod:`eval.scorers` (imported only then:
    the library does not depend on the evaluation package otherwise)."""

    def __init__(self, metric: str, device: str | None = None, weights: dict | None = None):
        self.metric = CHOICE_ALIASES.get(metric, metric)
        self.device = device
        self.weights = dict(weights or {})
        self._scorer = None

    def __getstate__(self):  # workers rebuild the scorer rather than pickling weights
        return {**self.__dict__, "_scorer": None}

    def scorer(self):
        if self._scorer is None:
            from eval.scorers import get_scorer, resolve_weights

            device = self.device
            if device is None:
                # A DataLoader worker is a forked process: CUDA cannot be initialised there once
                # the trainer has, so workers score on the CPU (the offline path avoids this).
                worker = torch.utils.data.get_worker_info() is not None
                device = "cuda" if torch.cuda.is_available() and not worker else "cpu"
            weights = resolve_weights(self.metric, **self.weights)
            self._scorer = get_scorer(self.metric, device=device, batch_size=2, **weights)
        return self._scorer

    def swap(self, winner, loser, caption: str) -> bool:
        """True when the reward model prefers ``loser`` (PIL images) for ``caption``."""
        scores = self.scorer().score([winner, loser], [caption, caption])
        return bool(scores[1] > scores[0])


class PreferencePairs(torch.utils.data.Dataset):
    """Map-style dataset of decoded, transformed pairs (or preferred images for unpaired SFT),
    optionally re-ordered by a reward model (``chooser``, ``--choice_model``).

    Item: ``pixel_values`` ``[2, 3, R, R]`` (winner, loser; ``[1, 3, R, R]`` when
    ``paired=False``), ``caption`` (str, '' after dropout), ``index`` (row used), ``epoch``,
    ``corrupt`` (rows skipped because their images would not decode).

    A row whose image bytes fail to decode is skipped: the next row is used instead, so batches
    keep their size, and the skip is counted in ``corrupt``.
    """

    def __init__(
        self, hf_dataset, augment: Augment, *, paired: bool = True, chooser: RewardChooser = None
    ):
        self.ds = hf_dataset
        self.augment = augment
        self.paired = paired
        self.chooser = chooser
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        """Augmentations depend on the epoch (workers are re-created per epoch, so they see it).

        Not named ``set_epoch``: accelerate would call that with its own iteration counter."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict:
        for skipped in range(len(self.ds)):
            row_index = (index + skipped) % len(self.ds)
            row = self.ds[row_index]
            try:
                winner, loser = ordered(row)
                images = [decode_image(winner)]
                if self.paired or self.chooser is not None:
                    images.append(decode_image(loser))
                if self.chooser is not None and self.chooser.swap(*images, row["caption"] or ""):
                    images.reverse()
                images = images if self.paired else images[:1]
            except Exception as err:  # any decode failure: PIL raises several types
                logger.warning("row %d: image does not decode (%s); skipped", row_index, err)
                continue
            gen = self.augment.generator(self.epoch, row_index)
            caption = "" if self.augment.drop_caption(gen) else (row["caption"] or "")
            return {
                "pixel_values": torch.stack([self.augment.image(img, gen) for img in images]),
                "caption": caption,
                "index": row_index,
                "epoch": self.epoch,
                "corrupt": skipped,
            }
        raise RuntimeError("no row of the dataset has decodable images")


def collate_pairs(items: list[dict]) -> dict:
    """Items -> batch with ``pixel_values`` ``[n·B, 3, R, R]``: all B winners, then the B losers
    (n = 2), or just the B images (n = 1); ``captions`` (B strings), ``index`` ``[B]``,
    ``epoch`` ``[B]``, ``corrupt`` (sum over the batch)."""
    pixels = torch.stack([it["pixel_values"] for it in items])  # [B, n, 3, R, R]
    return {
        "pixel_values": torch.cat(pixels.unbind(1)).contiguous(
            memory_format=torch.contiguous_format
        ),
        "captions": [it["caption"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "epoch": torch.tensor([it["epoch"] for it in items], dtype=torch.long),
        "corrupt": sum(it["corrupt"] for it in items),
    }


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation of ``range(n)`` keyed by ``(seed, epoch)``, identical on every process, or
    ``range(n)`` itself with ``shuffle=False`` (the official code shuffles only the train split).

    Deterministic from the seed alone (no global RNG), so a resumed run replays the same order;
    accelerate shards its batches over processes.
    """

    def __init__(self, n: int, seed: int, *, shuffle: bool = True):
        self.n, self.seed, self.epoch, self.shuffle = n, seed, 0, shuffle

    def start_epoch(self, epoch: int) -> None:
        """Not ``set_epoch``: accelerate's loader would reset it to its own iteration count."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        gen = keyed_generator(self.seed, PURPOSE_SHUFFLE, self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())


def make_loader(
    dataset, *, seed: int, batch_size: int, num_workers: int, collate_fn, shuffle: bool = True
):
    """``(loader, sampler)``: the one loader builder of the image and the cached paths (keyed
    shuffle unless ``shuffle=False``, whole batches only)."""
    sampler = EpochShuffleSampler(len(dataset), seed, shuffle=shuffle)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        drop_last=True,
    )
    return loader, sampler
