"""Synthetic Pick-a-Pic data for tests: random pictures with real JPEG/PNG bytes."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from sdpo.data.pickapic import REQUIRED_COLUMNS


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
