"""Synthetic preference data for tests, in the column schemas of real public sets (Pick-a-Pic
v2 and the layouts of docs/data.md): random pictures with real JPEG/PNG bytes."""

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


# ---------------------------------------------------------------------------------------------
# The other layouts (sdpo.data.layouts), each in the column schema of a public set (docs/data.md).
# Preference is visible in the pixels: a preferred image is brighter than the one it beats, so a
# test can check the winner/loser orientation of every decoded pair.


def _graded_picture(rng, level: int, size: int) -> np.ndarray:
    """A smooth random picture whose pixels lie within ±25 of ``level`` (0..255)."""
    low = rng.integers(-25, 26, size=(4, 5, 3)) + level
    big = np.kron(low, np.ones((size // 4 + 1, (size + 8) // 5 + 1, 1), np.int64))
    return np.clip(big[:size, : size + 8], 0, 255).astype(np.uint8)


def _png(rng, level: int, size: int) -> bytes:
    return encode_image(_graded_picture(rng, level, size), "PNG")


WIN_LEVEL, LOSE_LEVEL = 200, 60


def write_synthetic_chosen_rejected(
    path, *, n_pairs: int = 8, size: int = 40, seed: int = 0, corrupt_rows: int = 0
) -> Path:
    """``data/train-00000-of-00001.parquet`` in the schema of
    ``data-is-better-together/open-image-preferences-v1-binarized``: ``id``, ``prompt``,
    ``chosen`` / ``rejected`` (datasets ``Image`` features), ``chosen_model``,
    ``rejected_model``, ``evolution``, ``category``, ``sub_category``."""
    import datasets

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_pairs + corrupt_rows):
        chosen = _png(rng, WIN_LEVEL, size)
        if i >= n_pairs:
            chosen = chosen[: len(chosen) // 3]
        rows.append(
            {
                "id": str(i),
                "prompt": f"chosen picture {i}",
                "chosen": {"bytes": chosen, "path": None},
                "rejected": {"bytes": _png(rng, LOSE_LEVEL, size), "path": None},
                "chosen_model": "dev",
                "rejected_model": "sd",
                "evolution": "simplified",
                "category": "Art",
                "sub_category": "Pixel",
            }
        )
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "chosen": datasets.Image(),
            "rejected": datasets.Image(),
            "chosen_model": datasets.Value("string"),
            "rejected_model": datasets.Value("string"),
            "evolution": datasets.Value("string"),
            "category": datasets.Value("string"),
            "sub_category": datasets.Value("string"),
        }
    )
    out = Path(path) / "data" / "train-00000-of-00001.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(out))
    return out


def write_synthetic_scores(
    path, *, votes: list[tuple[int, int]] | None = None, size: int = 40, seed: int = 0
) -> Path:
    """``train-00000.parquet`` in the schema of
    ``Rapidata/700k_Human_Preference_Dataset_FLUX_SD3_MJ_DALLE3``: ``prompt``, ``image1``,
    ``image2`` (``Image``), ``votes_image1``, ``votes_image2``, ``model1``, ``model2``,
    ``detailed_results``, ``image1_path``, ``image2_path``. The image with more votes is the
    brighter one; equal votes are ties. Default votes: 3:1, 0:2, 2:2 (tie), 5:4, 1:6, 4:0."""
    import datasets

    votes = votes or [(3, 1), (0, 2), (2, 2), (5, 4), (1, 6), (4, 0)]
    rng = np.random.default_rng(seed)
    rows = []
    for i, (v1, v2) in enumerate(votes):
        level1, level2 = (WIN_LEVEL, LOSE_LEVEL) if v1 >= v2 else (LOSE_LEVEL, WIN_LEVEL)
        rows.append(
            {
                "prompt": f"scored picture {i}",
                "image1": {"bytes": _png(rng, level1, size), "path": None},
                "image2": {"bytes": _png(rng, level2, size), "path": None},
                "votes_image1": v1,
                "votes_image2": v2,
                "model1": "flux",
                "model2": "dalle3",
                "detailed_results": "[]",
                "image1_path": f"{i}_1.png",
                "image2_path": f"{i}_2.png",
            }
        )
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "image1": datasets.Image(),
            "image2": datasets.Image(),
            "votes_image1": datasets.Value("int64"),
            "votes_image2": datasets.Value("int64"),
            "model1": datasets.Value("string"),
            "model2": datasets.Value("string"),
            "detailed_results": datasets.Value("string"),
            "image1_path": datasets.Value("string"),
            "image2_path": datasets.Value("string"),
        }
    )
    out = Path(path) / "train-00000.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(out))
    return out


def write_synthetic_hpdv2(
    path,
    *,
    n_prompts: int = 4,
    k: int = 3,
    size: int = 40,
    seed: int = 0,
    split: str = "test",
    missing_files: int = 0,
) -> Path:
    """``{split}.json`` + image files in the schema of ``ymhao/HPDv2`` (dataset card):
    ``test``: ``prompt``, ``image_path`` (list of file paths), ``rank`` (list of ints, lower is
    better), ``raw_annotations``; ``train``: ``prompt``, ``file_path``, ``human_preference``
    (list, 1 for the preferred image). Brightness falls with rank. The last ``missing_files``
    prompts list an image file that does not exist (a corrupt row)."""
    import json

    rng = np.random.default_rng(seed)
    root = Path(path)
    (root / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(n_prompts):
        order = rng.permutation(k)  # order[j] = rank of image j (0 best)
        files = []
        for j in range(k):
            level = WIN_LEVEL - int(order[j]) * (WIN_LEVEL - LOSE_LEVEL) // max(k - 1, 1)
            name = f"{split}/{p:05d}_{j}.png"
            if p < n_prompts - missing_files or j:
                (root / name).write_bytes(_png(rng, level, size))
            files.append(name)
        if split == "train":
            pref = [int(order[j] == 0) for j in range(k)]
            rows.append(
                {"prompt": f"ranked picture {p}", "file_path": files, "human_preference": pref}
            )
        else:
            ranks = [int(order[j]) + 1 for j in range(k)]
            rows.append(
                {
                    "prompt": f"ranked picture {p}",
                    "image_path": files,
                    "rank": ranks,
                    "raw_annotations": [{"rank": ranks, "user_hash": "a"}],
                }
            )
    out = root / f"{split}.json"
    out.write_text(json.dumps(rows))
    return out


def write_synthetic_imagefolder(
    path, *, n: int = 6, size: int = 40, seed: int = 0, pairs: bool = False
) -> Path:
    """An ``imagefolder`` (datasets' builder) with ``metadata.jsonl``: for SFT the official
    ``train_data_dir`` convention (``file_name``, ``text``); with ``pairs`` a preference folder
    (``chosen_file_name``, ``rejected_file_name``, ``prompt``)."""
    import json

    rng = np.random.default_rng(seed)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        if pairs:
            (root / f"{i}_w.png").write_bytes(_png(rng, WIN_LEVEL, size))
            (root / f"{i}_l.png").write_bytes(_png(rng, LOSE_LEVEL, size))
            lines.append(
                {
                    "chosen_file_name": f"{i}_w.png",
                    "rejected_file_name": f"{i}_l.png",
                    "prompt": f"folder pair {i}",
                }
            )
        else:
            (root / f"{i}.png").write_bytes(_png(rng, WIN_LEVEL, size))
            lines.append({"file_name": f"{i}.png", "text": f"folder picture {i}"})
    out = root / "metadata.jsonl"
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return out


def write_graded_pickapic(
    path, levels: list[tuple[int, int]], labels: list[float], *, size: int = 24, seed: int = 0
) -> Path:
    """A Pick-a-Pic-schema parquet whose row i shows pictures of brightness ``levels[i]``
    (``jpg_0``, ``jpg_1``) with human label ``labels[i]``: a brightness reward model then
    agrees or disagrees with each label by construction."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {c: [] for c in (*REQUIRED_COLUMNS, "model_0", "model_1")}
    for i, ((l0, l1), label) in enumerate(zip(levels, labels)):
        cols["jpg_0"].append(_png(rng, l0, size))
        cols["jpg_1"].append(_png(rng, l1, size))
        cols["label_0"].append(float(label))
        cols["caption"].append(f"graded pair {i}")
        cols["model_0"].append("synthetic")
        cols["model_1"].append("synthetic")
    table = pa.table(
        {k: pa.array(v, type=pa.binary() if k.startswith("jpg") else None) for k, v in cols.items()}
    )
    out = Path(path) / "train-00000.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return out
