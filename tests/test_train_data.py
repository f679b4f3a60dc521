"""Pick-a-Pic loading: ties, winner-first order, corrupt rows, missing columns, transforms,
caption dropout, SFT's preferred image, reproducible order."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from sdpo.config import parse_args
from sdpo.data import Augment, DataSource
from sdpo.data.pairs import EpochShuffleSampler, PreferencePairs, collate_pairs
from sdpo.data.pickapic import load_pairs
from sdpo.testing.data import write_synthetic_pickapic
from tests.train_fixtures import train_args


def _cfg(data_dir, tmp_path, *extra):
    # The model folder is never opened by the data code; validate only checks it exists.
    return DataSource.from_flags(parse_args(train_args(tmp_path, data_dir, tmp_path / "o", *extra)))


def _pairs(ds, *, paired=True, **kw):
    return PreferencePairs(ds, Augment(**{"resolution": 32, "seed": 0, **kw}), paired=paired)


def _decoded(raw: bytes, resolution: int) -> torch.Tensor:
    """Reference transform of one image without flips, computed independently with PIL+numpy."""
    from PIL import Image

    img = Image.open(io.BytesIO(raw)).convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize(
        (int(w * scale), resolution) if w >= h else (resolution, int(h * scale)), Image.BILINEAR
    )
    w, h = img.size
    left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
    img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1.0


def test_ties_dropped_and_counted(tmp_path):
    write_synthetic_pickapic(tmp_path / "d", n_pairs=6, ties=3)
    ds, info = load_pairs(_cfg(tmp_path / "d", tmp_path))
    counts = {k: info[k] for k in ("rows", "ties_dropped", "invalid_labels_dropped", "pairs")}
    assert counts == {"rows": 9, "ties_dropped": 3, "invalid_labels_dropped": 0, "pairs": 6}
    assert info["layout"] == "pickapic"
    assert sorted(set(ds["label_0"])) == [0.0, 1.0]


def test_max_train_samples(tmp_path):
    write_synthetic_pickapic(tmp_path / "d", n_pairs=10, ties=2)
    ds, info = load_pairs(_cfg(tmp_path / "d", tmp_path, "--max_train_samples", "4"))
    assert len(ds) == info["pairs"] == 4 and info["ties_dropped"] == 2


def test_winner_first_and_reference_transforms(tmp_path):
    """label_0 == 0 swaps the images; Resize(bilinear) + CenterCrop + [-1, 1] as the reference."""
    import datasets
    import pyarrow.parquet as pq

    path = write_synthetic_pickapic(tmp_path / "d", n_pairs=4, size=40)
    table = pq.read_table(path).to_pydict()
    ds, _ = load_pairs(_cfg(tmp_path / "d", tmp_path))
    pairs = _pairs(ds, hflip=False)
    for i in range(4):
        item = pairs[i]
        winner, loser = ("jpg_0", "jpg_1") if table["label_0"][i] == 1 else ("jpg_1", "jpg_0")
        assert item["pixel_values"].shape == (2, 3, 32, 32)
        assert table["label_0"][i] in (0.0, 1.0)
        for k, col in enumerate((winner, loser)):
            expected = _decoded(table[col][i], 32)
            # torchvision's PIL resize path is PIL itself: equal up to uint8 rounding
            assert (item["pixel_values"][k] - expected).abs().max() < 2.5 / 127.5
        assert item["caption"] == table["caption"][i]
    assert isinstance(ds, datasets.Dataset)


def test_unpaired_uses_the_preferred_image_only(tmp_path):
    write_synthetic_pickapic(tmp_path / "d", n_pairs=4)
    ds, _ = load_pairs(_cfg(tmp_path / "d", tmp_path))
    paired = _pairs(ds, hflip=False)
    sft = _pairs(ds, hflip=False, paired=False)
    batch_pairs = collate_pairs([paired[i] for i in range(3)])
    batch_sft = collate_pairs([sft[i] for i in range(3)])
    assert batch_pairs["pixel_values"].shape == (6, 3, 32, 32)  # winners, then losers
    assert batch_sft["pixel_values"].shape == (3, 3, 32, 32)
    assert torch.equal(batch_sft["pixel_values"], batch_pairs["pixel_values"][:3])
    assert torch.equal(batch_pairs["pixel_values"][3], paired[0]["pixel_values"][1])


def test_corrupt_row_skipped_and_counted(tmp_path):
    write_synthetic_pickapic(tmp_path / "d", n_pairs=3, corrupt_rows=1)
    ds, info = load_pairs(_cfg(tmp_path / "d", tmp_path))
    assert info["pairs"] == 4  # the corrupt row has a valid label; it fails only at decoding
    pairs = _pairs(ds)
    item = pairs[3]  # the corrupt row: replaced by the next row (wraps to row 0), counted
    assert item["corrupt"] == 1 and item["index"] == 0
    assert torch.isfinite(item["pixel_values"]).all()
    assert [pairs[i]["corrupt"] for i in range(3)] == [0, 0, 0]
    assert collate_pairs([pairs[2], pairs[3]])["corrupt"] == 1


def test_missing_columns_named_before_training(tmp_path, monkeypatch):
    """Missing columns: one ValueError naming them, raised before any model weights load."""
    import train
    from sdpo.families import base
    from tests.train_fixtures import build_models

    models = build_models(tmp_path / "m")
    write_synthetic_pickapic(tmp_path / "d", n_pairs=4, drop_columns=("label_0", "caption"))

    def forbidden(*_, **__):
        raise AssertionError("model weights loaded before the data check")

    monkeypatch.setattr(base.ModelFamily, "load_parts", forbidden)
    cfg = parse_args(train_args(models["sd15"], tmp_path / "d", tmp_path / "o"))
    with pytest.raises(ValueError) as err:
        train.main(cfg)
    msg = str(err.value)
    # Both missing roles, the flags that map them, and the columns the data does have.
    for part in ("'label_0'", "--label_column", "--caption_column", "'jpg_0'", "'model_1'"):
        assert part in msg, (part, msg)


def test_caption_dropout_and_flips_are_seeded(tmp_path):
    write_synthetic_pickapic(tmp_path / "d", n_pairs=12)
    ds, _ = load_pairs(_cfg(tmp_path / "d", tmp_path))
    all_empty = _pairs(ds, proportion_empty_prompts=1.0)
    assert {all_empty[i]["caption"] for i in range(12)} == {""}
    half = _pairs(ds, proportion_empty_prompts=0.5)
    dropped = [half[i]["caption"] == "" for i in range(12)]
    assert 0 < sum(dropped) < 12
    # Same (seed, epoch, row) -> same augmentation; another epoch -> other draws.
    again = _pairs(ds, proportion_empty_prompts=0.5)
    assert [again[i]["caption"] == "" for i in range(12)] == dropped
    again.start_epoch(1)
    assert [again[i]["caption"] == "" for i in range(12)] != dropped
    # Flips are drawn independently for winner and loser: some pair has exactly one flipped.
    flip = _pairs(ds)
    plain = _pairs(ds, hflip=False)
    flipped = [
        [not torch.equal(flip[i]["pixel_values"][k], plain[i]["pixel_values"][k]) for k in (0, 1)]
        for i in range(12)
    ]
    assert any(w != lo for w, lo in flipped) and any(w or lo for w, lo in flipped)


def test_shuffle_order_reproducible_per_epoch():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.start_epoch(1)
    assert list(a) != list(b)
    assert list(EpochShuffleSampler(50, seed=4)) != list(a)


def test_local_folder_split_selection(tmp_path):
    """`<split>-*.parquet` shards are picked by --split (validation != validation_unique)."""
    write_synthetic_pickapic(tmp_path / "d", n_pairs=5, filename="train-00000-of-00001.parquet")
    write_synthetic_pickapic(tmp_path / "d", n_pairs=3, filename="validation-00000.parquet")
    write_synthetic_pickapic(tmp_path / "d", n_pairs=2, filename="validation_unique-00000.parquet")
    sizes = {}
    for split in ("train", "validation", "validation_unique"):
        _, info = load_pairs(_cfg(tmp_path / "d", tmp_path, "--split", split))
        sizes[split] = info["pairs"]
    assert sizes == {"train": 5, "validation": 3, "validation_unique": 2}


def test_only_the_train_split_is_shuffled(tmp_path):
    """As the official code: the train split's order is the keyed permutation, any other split
    is read in its stored order, in every epoch."""
    from sdpo.data import build_dataloader

    write_synthetic_pickapic(tmp_path / "d", n_pairs=8, filename="train-00000.parquet")
    write_synthetic_pickapic(tmp_path / "d", n_pairs=8, filename="validation-00000.parquet")
    orders = {}
    for split in ("train", "validation"):
        source = _cfg(tmp_path / "d", tmp_path, "--split", split)
        aug = Augment(resolution=32, seed=0)
        _, _, sampler, _ = build_dataloader(source, aug, paired=True, batch_size=2, num_workers=0)
        orders[split] = [list(sampler)]
        sampler.start_epoch(1)
        orders[split].append(list(sampler))
    assert orders["validation"] == [list(range(8))] * 2
    assert orders["train"][0] != list(range(8)) and orders["train"][0] != orders["train"][1]
    assert sorted(orders["train"][0]) == list(range(8))
