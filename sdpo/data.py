"""Pick-a-Pic v2 preference pairs for training, read lazily through ``datasets``.

Schema (``yuvalkirstain/pickapic_v2``): ``jpg_0``, ``jpg_1`` (encoded image bytes), ``label_0``
(1: ``jpg_0`` won, 0: ``jpg_1`` won, 0.5: tie) and ``caption``. Rows are memory-mapped Arrow
tables; images are decoded one row at a time in ``__getitem__`` (so a 300 GB split never has to fit
in memory), ties are dropped up front by reading the ``label_0`` column only.

Randomness (caption dropout, crops, flips) is drawn from a generator keyed by
``(seed, epoch, row index)``, not from a global stream, so the same row gets the same
augmentation whatever the number of processes, workers or accumulation steps, and a resumed run
sees exactly the data of an uninterrupted one. The shuffle order is keyed by ``(seed, epoch)``.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")
DATA_FILE_SUFFIXES = (".parquet", ".arrow")

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


# ---------------------------------------------------------------------------------------------
# Loading and filtering
# ---------------------------------------------------------------------------------------------


def load_pickapic(cfg, seed: int = 0):
    """Load ``cfg.split`` from ``--dataset_name`` (hub) or ``--train_data_dir`` (local files).

    Returns ``(dataset, info)``: a ``datasets.Dataset`` of non-tie rows (``--max_train_samples``
    applied) and a dict with ``rows``, ``ties_dropped``, ``invalid_labels_dropped``, ``pairs``.
    Raises ``ValueError`` naming missing columns before any image is decoded.
    """
    import datasets

    if cfg.train_data_dir:
        root = Path(cfg.train_data_dir)
        files = sorted(p for p in root.rglob("*") if p.suffix in DATA_FILE_SUFFIXES)
        if not files:
            raise ValueError(
                f"--train_data_dir: no {'/'.join(DATA_FILE_SUFFIXES)} files in {str(root)!r}"
            )
        # Hub layout: `<split>-00000-of-00645.parquet` or a `<split>/` folder; a folder of
        # shards named otherwise is taken as the requested split.
        split_files = [p for p in files if _is_split_file(p, cfg.split)]
        chosen = split_files or files
        builder = "parquet" if chosen[0].suffix == ".parquet" else "arrow"
        ds = datasets.load_dataset(
            builder,
            data_files={cfg.split: [str(p) for p in chosen]},
            split=cfg.split,
            cache_dir=cfg.cache_dir,
        )
    else:
        ds = datasets.load_dataset(
            cfg.dataset_name, cfg.dataset_config_name, split=cfg.split, cache_dir=cfg.cache_dir
        )
    return prepare_pairs(ds, seed=seed, max_train_samples=cfg.max_train_samples)


def _is_split_file(path: Path, split: str) -> bool:
    return path.parent.name == split or path.stem == split or path.name.startswith(f"{split}-")


def check_columns(column_names, where: str = "dataset") -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in column_names]
    if missing:
        raise ValueError(
            f"{where} lacks the Pick-a-Pic column(s) {missing}; it has {list(column_names)} "
            f"(needed: {list(REQUIRED_COLUMNS)})"
        )


def prepare_pairs(ds, *, seed: int = 0, max_train_samples: int | None = None):
    """Drop ties (and any label other than 0/1), keep the image columns undecoded, subsample.

    Returns ``(dataset, info)`` (see :func:`load_pickapic`).
    """
    import datasets

    check_columns(ds.column_names)
    # Undecoded image features come back as {"bytes", "path"}; decoding waits for __getitem__.
    for col in ("jpg_0", "jpg_1"):
        if isinstance(ds.features[col], datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
    rows = len(ds)
    labels = np.asarray(ds.select_columns(["label_0"]).with_format("numpy")["label_0"], np.float64)
    ties = int(np.sum(labels == 0.5))
    keep = np.flatnonzero((labels == 0.0) | (labels == 1.0))
    invalid = rows - ties - len(keep)
    ds = ds.select(keep)
    if max_train_samples is not None and len(ds) > max_train_samples:
        ds = ds.shuffle(seed=seed).select(range(max_train_samples))
    info = {
        "rows": rows,
        "ties_dropped": ties,
        "invalid_labels_dropped": invalid,
        "pairs": len(ds),
    }
    logger.info(
        "Pick-a-Pic: %d rows, %d ties dropped, %d invalid labels dropped, %d pairs used",
        rows,
        ties,
        invalid,
        len(ds),
    )
    if len(ds) == 0:
        raise ValueError("no usable (non-tie) pairs in the dataset")
    return ds, info


# ---------------------------------------------------------------------------------------------
# Decoding and transforms
# ---------------------------------------------------------------------------------------------


def decode_image(value):
    """Encoded bytes (or ``{"bytes": ...}`` / a PIL image) -> RGB PIL image, fully decoded."""
    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or open(value["path"], "rb").read()
    if isinstance(value, Image.Image):
        image = value
    else:
        image = Image.open(io.BytesIO(value))
    image.load()  # truncated / corrupt data raises here, not later in a worker
    return image.convert("RGB")


def transform_image(image, resolution: int, gen: torch.Generator, *, random_crop, hflip):
    """Reference transforms: Resize(bilinear, shorter side) -> Center/RandomCrop -> random hflip
    -> tensor in [-1, 1] of shape ``[3, resolution, resolution]``."""
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
    if hflip and torch.rand((), generator=gen) < 0.5:
        image = TF.hflip(image)
    return TF.to_tensor(image) * 2.0 - 1.0


class PreferencePairs(torch.utils.data.Dataset):
    """Map-style dataset of decoded, transformed pairs (or preferred images for unpaired SFT).

    Item: ``pixel_values`` ``[2, 3, R, R]`` (winner, loser; ``[1, 3, R, R]`` when
    ``paired=False``), ``caption`` (str, '' after dropout), ``index`` (row used), ``epoch``,
    ``corrupt`` (rows skipped because their images would not decode).

    A row whose image bytes fail to decode is skipped: the next row is used instead, so batches
    keep their size, and the skip is counted in ``corrupt``.
    """

    def __init__(
        self,
        hf_dataset,
        *,
        resolution: int,
        seed: int,
        paired: bool = True,
        random_crop: bool = False,
        hflip: bool = True,
        proportion_empty_prompts: float = 0.0,
    ):
        self.ds = hf_dataset
        self.resolution = resolution
        self.seed = seed
        self.paired = paired
        self.random_crop = random_crop
        self.hflip = hflip
        self.proportion_empty_prompts = proportion_empty_prompts
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
                winner, loser = _ordered(row)
                images = [decode_image(winner)]
                if self.paired:
                    images.append(decode_image(loser))
            except Exception as err:  # any decode failure: PIL raises several types
                logger.warning("row %d: image does not decode (%s); skipped", row_index, err)
                continue
            return self._make_item(row, images, row_index, corrupt=skipped)
        raise RuntimeError("no row of the dataset has decodable images")

    def _make_item(self, row: dict, images: list, row_index: int, corrupt: int) -> dict:
        gen = keyed_generator(self.seed, PURPOSE_AUGMENT, self.epoch, row_index)
        caption = row["caption"] or ""
        if torch.rand((), generator=gen) < self.proportion_empty_prompts:
            caption = ""
        # Flips (and random crops) drawn independently for the winner and the loser.
        pixels = [
            transform_image(
                img, self.resolution, gen, random_crop=self.random_crop, hflip=self.hflip
            )
            for img in images
        ]
        return {
            "pixel_values": torch.stack(pixels),
            "caption": caption,
            "index": row_index,
            "epoch": self.epoch,
            "corrupt": corrupt,
        }


def _ordered(row: dict):
    """(winner, loser) image values: ``label_0 == 0`` means ``jpg_1`` won."""
    if row["label_0"] == 0:
        return row["jpg_1"], row["jpg_0"]
    return row["jpg_0"], row["jpg_1"]


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
    """A permutation of ``range(n)`` keyed by ``(seed, epoch)``, identical on every process.

    Deterministic from the seed alone (no global RNG), so a resumed run replays the same order;
    accelerate shards its batches over processes.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def start_epoch(self, epoch: int) -> None:
        """Not ``set_epoch``: accelerate's loader would reset it to its own iteration count."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        gen = keyed_generator(self.seed, PURPOSE_SHUFFLE, self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())


def build_dataloader(cfg, *, paired: bool, seed: int):
    """``(dataloader, dataset, sampler, info)`` for ``cfg`` (``train_batch_size`` pairs / batch)."""
    hf_ds, info = load_pickapic(cfg, seed)
    dataset = PreferencePairs(
        hf_ds,
        resolution=cfg.resolution,
        seed=seed,
        paired=paired,
        random_crop=cfg.random_crop,
        hflip=not cfg.no_hflip,
        proportion_empty_prompts=cfg.proportion_empty_prompts,
    )
    sampler = EpochShuffleSampler(len(dataset), seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.train_batch_size,
        sampler=sampler,
        collate_fn=collate_pairs,
        num_workers=cfg.dataloader_num_workers,
        drop_last=True,
    )
    return loader, dataset, sampler, info


# ---------------------------------------------------------------------------------------------
# Synthetic data (tests, toy demo)
# ---------------------------------------------------------------------------------------------


def encode_image(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    """``[H, W, 3]`` uint8 -> encoded bytes (JPEG or PNG), as Pick-a-Pic stores them."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def write_synthetic_pickapic(
    path: str | os.PathLike,
    *,
    n_pairs: int = 16,
    size: int = 40,
    seed: int = 0,
    ties: int = 0,
    corrupt_rows: int = 0,
    drop_columns: tuple[str, ...] = (),
    filename: str = "train-00000.parquet",
) -> Path:
    """Write a Pick-a-Pic-schema parquet file of random pictures with real JPEG/PNG bytes.

    ``n_pairs`` rows with labels alternating 1 / 0, then ``ties`` rows with label 0.5, then
    ``corrupt_rows`` rows whose ``jpg_0`` bytes are a truncated JPEG. Images are ``size`` x
    ``size + 8`` (non-square, so the resize / crop path is exercised). Returns the file path.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {c: [] for c in (*REQUIRED_COLUMNS, "model_0", "model_1")}

    def picture() -> np.ndarray:
        # Smooth random colour fields (compress like photos, unlike white noise).
        low = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
        return np.kron(low, np.ones((size // 4 + 1, (size + 8) // 5 + 1, 1), np.uint8))[
            :size, : size + 8
        ]

    total = n_pairs + ties + corrupt_rows
    for i in range(total):
        img0 = encode_image(picture(), "JPEG" if i % 2 else "PNG")
        img1 = encode_image(picture(), "JPEG")
        label = 0.5 if n_pairs <= i < n_pairs + ties else float((i + 1) % 2)
        if i >= n_pairs + ties:
            img0 = img0[: len(img0) // 3]  # truncated: fails in PIL's load()
        rows["jpg_0"].append(img0)
        rows["jpg_1"].append(img1)
        rows["label_0"].append(label)
        rows["caption"].append(f"picture number {i}")
        rows["model_0"].append("synthetic")
        rows["model_1"].append("synthetic")
    table = pa.table(
        {
            k: pa.array(v, type=pa.binary() if k.startswith("jpg") else None)
            for k, v in rows.items()
            if k not in drop_columns
        }
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = path / filename
    pq.write_table(table, out)
    return out
