"""Where preference pairs come from: a hub data set or a local folder, in any layout of
:mod:`sdpo.data.layouts`, brought to the one schema training reads, Pick-a-Pic v2's.

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
    (``train_data_dir``), a split, an optional seeded subset, and how its columns map onto
    preference pairs (:mod:`sdpo.data.layouts`)."""

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    split: str = "train"
    cache_dir: str | None = None
    max_train_samples: int | None = None
    data_layout: str = "auto"
    columns: tuple[tuple[str, str], ...] = ()  # (mapping flag, column) pairs given
    pair_mode: str = "best_worst"
    score_tie_threshold: float = 0.0
    dreamlike_pairs_only: bool = False
    choice_model: str | None = None  # reward model re-deciding each pair online

    @classmethod
    def from_flags(cls, cfg) -> DataSource:
        from sdpo.data.layouts import mapping_flags

        columns = tuple(
            (flag, getattr(cfg, flag))
            for flag in mapping_flags()
            if getattr(cfg, flag, None) is not None
        )
        return cls(
            dataset_name=cfg.dataset_name,
            dataset_config_name=cfg.dataset_config_name,
            train_data_dir=cfg.train_data_dir,
            split=cfg.split,
            cache_dir=cfg.cache_dir,
            max_train_samples=cfg.max_train_samples,
            data_layout=getattr(cfg, "data_layout", "auto"),
            columns=columns,
            pair_mode=getattr(cfg, "pair_mode", "best_worst"),
            score_tie_threshold=getattr(cfg, "score_tie_threshold", 0.0),
            dreamlike_pairs_only=getattr(cfg, "dreamlike_pairs_only", False),
            choice_model=getattr(cfg, "choice_model", None) or None,
        )

    def column_map(self):
        from sdpo.data.layouts import ColumnMap

        return ColumnMap(
            data_layout=self.data_layout,
            columns=dict(self.columns),
            pair_mode=self.pair_mode,
            score_tie_threshold=self.score_tie_threshold,
        )

    def identity(self) -> dict:
        """What a cache made from these rows records (the local folder resolved; layout
        settings only where they differ from the defaults, so older caches stay valid)."""
        out = {
            "source": self.dataset_name or str(Path(self.train_data_dir).resolve()),
            "config": self.dataset_config_name,
            "split": self.split,
            "max_train_samples": self.max_train_samples,
        }
        defaults = DataSource()
        for name in ("data_layout", "columns", "pair_mode", "score_tie_threshold"):
            if getattr(self, name) != getattr(defaults, name):
                value = getattr(self, name)
                out[name] = dict(value) if name == "columns" else value
        if self.dreamlike_pairs_only:
            out["dreamlike_pairs_only"] = True
        return out


def ordered(row: dict):
    """(winner, loser) image values of a row: ``label_0 == 0`` means ``jpg_1`` won. A one-image
    row (the ``images`` layout, SFT) has no loser: ``None``."""
    if row["label_0"] == 0:
        return row["jpg_1"], row["jpg_0"]
    return row["jpg_0"], row.get("jpg_1")


def load_pairs(source: DataSource, seed: int = 0, *, paired: bool | None = None):
    """Load ``source.split`` (hub data set or local folder), map its layout onto the Pick-a-Pic
    schema (:mod:`sdpo.data.layouts`), drop ties, apply ``--dreamlike_pairs_only`` and
    ``max_train_samples``.

    Returns ``(dataset, info)``: a ``datasets.Dataset`` of non-tie rows and a dict with
    ``layout``, ``rows``, ``ties_dropped``, ``invalid_labels_dropped``, ``pairs`` and the
    layout's own counts. Raises ``ValueError`` naming missing columns (and the flags that map
    them) before any image is decoded. ``paired``: whether the objective needs two images
    (True refuses the one-image layout; None: no check)."""
    import datasets

    from sdpo.data.layouts import prepare_layout

    cfg = source
    base = None
    if cfg.train_data_dir:
        ds, base = load_local_folder(Path(cfg.train_data_dir), cfg.split, cfg.cache_dir)
    else:
        ds = datasets.load_dataset(
            cfg.dataset_name, cfg.dataset_config_name, split=cfg.split, cache_dir=cfg.cache_dir
        )
    ds, layout_info = prepare_layout(ds, cfg.column_map(), paired=paired, base=base)
    ds, info = prepare_pairs(
        ds,
        seed=seed,
        max_train_samples=cfg.max_train_samples,
        dreamlike_pairs_only=cfg.dreamlike_pairs_only,
    )
    return ds, {**layout_info, **info}


TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def load_local_folder(root: Path, split: str, cache_dir: str | None = None):
    """``(dataset, base folder of relative image paths)`` of a local folder, whichever of these
    it holds (first match wins):

    1. parquet / arrow shards (the hub's layout; ``<split>-*`` files or a ``<split>/`` folder
       are picked by ``split``, other names are taken as the requested split);
    2. an ``imagefolder``: image files and a ``metadata.jsonl`` / ``.csv`` (``file_name`` ->
       an ``image`` column, ``<x>_file_name`` -> ``<x>``, ``file_names`` -> ``images``:
       datasets' own builder);
    3. jsonl / json / csv tables whose image columns are file paths relative to the table.
    """
    import datasets

    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    tables = [p for p in files if p.suffix in DATA_FILE_SUFFIXES]
    if tables:
        # Hub layout: `<split>-00000-of-00645.parquet` or a `<split>/` folder; a folder of
        # shards named otherwise is taken as the requested split.
        chosen = [p for p in tables if _is_split_file(p, split)] or tables
        builder = "parquet" if chosen[0].suffix == ".parquet" else "arrow"
        ds = datasets.load_dataset(
            builder,
            data_files={split: [str(p) for p in chosen]},
            split=split,
            cache_dir=cache_dir,
        )
        return ds, chosen[0].parent
    if any(p.name in METADATA_FILES for p in files):
        ds = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir)
        if split not in ds:
            raise ValueError(
                f"--split {split!r}: the imagefolder {str(root)!r} has splits {list(ds)}"
            )
        return ds[split], root
    text = [p for p in files if p.suffix in TABLE_SUFFIXES]
    if text:
        chosen = [p for p in text if _is_split_file(p, split)] or text
        builder = TABLE_SUFFIXES[chosen[0].suffix]
        ds = datasets.load_dataset(
            builder, data_files={split: [str(p) for p in chosen]}, split=split, cache_dir=cache_dir
        )
        return ds, chosen[0].parent
    raise ValueError(
        f"--train_data_dir: no parquet/arrow shards, imagefolder metadata ({'/'.join(METADATA_FILES)})"
        f" or jsonl/json/csv table in {str(root)!r}"
    )


def _is_split_file(path: Path, split: str) -> bool:
    return path.parent.name == split or path.stem == split or path.name.startswith(f"{split}-")


def check_columns(column_names, where: str = "dataset", required=REQUIRED_COLUMNS) -> None:
    missing = [c for c in required if c not in column_names]
    if missing:
        raise ValueError(
            f"{where} lacks the Pick-a-Pic column(s) {missing}; it has {list(column_names)} "
            f"(needed: {list(REQUIRED_COLUMNS)})"
        )


def dreamlike_rows(model_0, model_1) -> np.ndarray:
    """Rows whose two images both come from a Dreamlike model (the official
    ``--dreamlike_pairs_only``: "dream" in both generator names)."""
    return np.asarray(
        [
            i
            for i, (a, b) in enumerate(zip(model_0, model_1))
            if "dream" in str(a).lower() and "dream" in str(b).lower()
        ],
        dtype=np.int64,
    )


def prepare_pairs(
    ds,
    *,
    seed: int = 0,
    max_train_samples: int | None = None,
    dreamlike_pairs_only: bool = False,
):
    """Drop ties (and any label other than 0/1), keep the image columns undecoded, optionally
    keep Dreamlike-vs-Dreamlike pairs only, subsample.

    Returns ``(dataset, info)`` (see :func:`load_pairs`).
    """
    import datasets

    check_columns(ds.column_names, required=("jpg_0", "label_0", "caption"))
    # Undecoded image features come back as {"bytes", "path"}; decoding waits for __getitem__.
    for col in ("jpg_0", "jpg_1"):
        if col in ds.column_names and isinstance(ds.features[col], datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
    rows = len(ds)
    labels = np.asarray(ds.select_columns(["label_0"]).with_format("numpy")["label_0"], np.float64)
    ties = int(np.sum(labels == 0.5))
    keep = np.flatnonzero((labels == 0.0) | (labels == 1.0))
    invalid = rows - ties - len(keep)
    ds = ds.select(keep)
    info = {"rows": rows, "ties_dropped": ties, "invalid_labels_dropped": invalid}
    if dreamlike_pairs_only:
        if not {"model_0", "model_1"} <= set(ds.column_names):
            raise ValueError(
                "--dreamlike_pairs_only needs the generator of each image (Pick-a-Pic's model_0 /"
                " model_1; map them with --model_0_column / --model_1_column); the data has "
                f"{ds.column_names}"
            )
        dream = dreamlike_rows(ds["model_0"], ds["model_1"])
        info["non_dreamlike_dropped"] = len(ds) - len(dream)
        ds = ds.select(dream)
    if max_train_samples is not None and len(ds) > max_train_samples:
        ds = ds.shuffle(seed=seed).select(range(max_train_samples))
    info["pairs"] = len(ds)
    logger.info(
        "pairs: %d rows, %d ties dropped, %d invalid labels dropped, %d pairs used",
        rows,
        ties,
        invalid,
        len(ds),
    )
    if len(ds) == 0:
        raise ValueError("no usable (non-tie) pairs in the dataset")
    return ds, info
