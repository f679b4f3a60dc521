"""Where preference pairs come from: the Pick-a-Pic v2 schema, from the hub or a local folder.

Schema (``yuvalkirstain/pickapic_v2``): ``jpg_0``, ``jpg_1`` (encoded image bytes), ``label_0``
(1: ``jpg_0`` won, 0: ``jpg_1`` won, 0.5: tie) and ``caption``. Rows are memory-mapped Arrow
tables; ties are dropped up front by reading the ``label_0`` column only, and images stay
undecoded until :mod:`sdpo.data.pairs` reads a row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")
DATA_FILE_SUFFIXES = (".parquet", ".arrow")


@dataclass(frozen=True)
class DataSource:
    """Which rows train: a hub data set (``dataset_name``) or a local folder
    (``train_data_dir``), a split, and an optional seeded subset."""

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    split: str = "train"
    cache_dir: str | None = None
    max_train_samples: int | None = None

    @classmethod
    def from_flags(cls, cfg) -> DataSource:
        return cls(
            dataset_name=cfg.dataset_name,
            dataset_config_name=cfg.dataset_config_name,
            train_data_dir=cfg.train_data_dir,
            split=cfg.split,
            cache_dir=cfg.cache_dir,
            max_train_samples=cfg.max_train_samples,
        )

    def identity(self) -> dict:
        """What a cache made from these rows records (the local folder resolved)."""
        return {
            "source": self.dataset_name or str(Path(self.train_data_dir).resolve()),
            "config": self.dataset_config_name,
            "split": self.split,
            "max_train_samples": self.max_train_samples,
        }


def ordered(row: dict):
    """(winner, loser) image values of a row: ``label_0 == 0`` means ``jpg_1`` won."""
    if row["label_0"] == 0:
        return row["jpg_1"], row["jpg_0"]
    return row["jpg_0"], row["jpg_1"]


def load_pickapic(source: DataSource, seed: int = 0):
    """Load ``source.split`` from the hub data set or the local folder of ``source``.

    Returns ``(dataset, info)``: a ``datasets.Dataset`` of non-tie rows (``max_train_samples``
    applied) and a dict with ``rows``, ``ties_dropped``, ``invalid_labels_dropped``, ``pairs``.
    Raises ``ValueError`` naming missing columns before any image is decoded.
    """
    import datasets

    cfg = source
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
