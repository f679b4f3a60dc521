"""Every preference layout (sdpo.data.layouts) on synthetic sets in the real public schemas:
detection, winner/loser orientation, ties, corrupt rows, mapping errors, and a two-step
training run per layout."""

from __future__ import annotations

import pytest

from sdpo.config import parse_args
from sdpo.data import Augment, DataSource
from sdpo.data.layouts import DataLayoutError, rank_pairs
from sdpo.data.pairs import PreferencePairs
from sdpo.data.pickapic import load_pairs
from sdpo.testing import data as synth
from tests.train_fixtures import build_models, load_unet_state, max_abs_diff, train_args

pytestmark = pytest.mark.usefixtures("one_thread")


def _source(folder, **kw) -> DataSource:
    columns = tuple(kw.pop("columns", {}).items())
    return DataSource(train_data_dir=str(folder), columns=columns, **kw)


def _items(ds, paired=True):
    pairs = PreferencePairs(ds, Augment(resolution=32, seed=0, hflip=False), paired=paired)
    return [pairs[i] for i in range(len(pairs))]


def _assert_winners_brighter(items):
    """Synthetic preferred images are brighter (by >= 70 of 255, sdpo.testing.data)."""
    for item in items:
        winner, loser = item["pixel_values"]
        assert winner.mean() - loser.mean() > 0.3, item["index"]


def test_chosen_rejected_detected_and_oriented(tmp_path, capsys):
    synth.write_synthetic_chosen_rejected(tmp_path / "d", n_pairs=5, corrupt_rows=1)
    ds, info = load_pairs(_source(tmp_path / "d"), paired=True)
    assert info["layout"] == "chosen_rejected" and info["pairs"] == 6
    assert "data layout 'chosen_rejected' (detected)" in capsys.readouterr().out
    items = _items(ds)
    # The corrupt row (index 5) is replaced by the next one and counted.
    assert sum(it["corrupt"] for it in items) == 1 and items[5]["index"] == 0
    _assert_winners_brighter(items)
    assert items[0]["caption"] == "chosen picture 0"


@pytest.mark.parametrize(("threshold", "pairs", "ties"), [(0.0, 5, 1), (1.5, 4, 2), (4.5, 1, 5)])
def test_scores_layout_threshold(tmp_path, threshold, pairs, ties):
    """Votes 3:1, 0:2, 2:2, 5:4, 1:6, 4:0 -> gaps 2, 2, 0, 1, 5, 4."""
    synth.write_synthetic_scores(tmp_path / "d")
    ds, info = load_pairs(_source(tmp_path / "d", score_tie_threshold=threshold))
    assert info["layout"] == "scores"
    assert (info["pairs"], info["score_ties_dropped"]) == (pairs, ties)
    assert list(ds["model_0"]) == ["flux"] * pairs
    _assert_winners_brighter(_items(ds))


@pytest.mark.parametrize(
    ("split", "mode", "per_prompt"),
    [
        ("test", "best_worst", 1),
        ("test", "all", 3),
        ("train", "best_worst", 1),
        ("train", "all", 2),
    ],
)
def test_ranked_hpdv2(tmp_path, split, mode, per_prompt):
    """HPDv2 test.json (rank lists, lower is better) and train.json (human_preference, 1 = the
    preferred image); 3 images per prompt."""
    synth.write_synthetic_hpdv2(tmp_path / "d", n_prompts=4, k=3, split=split)
    ds, info = load_pairs(_source(tmp_path / "d", split=split, pair_mode=mode))
    assert info["layout"] == "ranked" and info["pairs"] == 4 * per_prompt
    _assert_winners_brighter(_items(ds))


def test_ranked_missing_image_file_is_skipped_and_counted(tmp_path):
    synth.write_synthetic_hpdv2(tmp_path / "d", n_prompts=3, k=2, missing_files=1)
    ds, info = load_pairs(_source(tmp_path / "d", split="test"))
    items = _items(ds)
    assert info["pairs"] == 3 and sum(it["corrupt"] for it in items) == 1
    _assert_winners_brighter(items)


def test_rank_pairs_by_hand():
    assert rank_pairs([2, 1, 3], higher_is_better=False, mode="best_worst") == [(1, 2)]
    # gaps: 0.9-0.1 = 0.8, 0.9-0.5 = 0.4, 0.5-0.1 = 0.4
    scores = [0.1, 0.9, 0.5]
    assert rank_pairs(scores, higher_is_better=True, mode="all", threshold=0.3) == [
        (1, 0),
        (1, 2),
        (2, 0),
    ]
    assert rank_pairs(scores, higher_is_better=True, mode="all", threshold=0.45) == [(1, 0)]
    assert rank_pairs([1, 1], higher_is_better=True, mode="best_worst") == []  # tie


def test_imagefolder_pairs_and_sft_folder(tmp_path):
    synth.write_synthetic_imagefolder(tmp_path / "pairs", n=4, pairs=True)
    ds, info = load_pairs(_source(tmp_path / "pairs"), paired=True)
    assert info["layout"] == "chosen_rejected" and info["pairs"] == 4
    _assert_winners_brighter(_items(ds))

    synth.write_synthetic_imagefolder(tmp_path / "sft", n=3)
    with pytest.raises(DataLayoutError, match="only --train_method sft"):
        load_pairs(_source(tmp_path / "sft", data_layout="images"), paired=True)
    ds, info = load_pairs(_source(tmp_path / "sft"), paired=False)
    assert info["layout"] == "images" and info["pairs"] == 3
    items = _items(ds, paired=False)
    assert [it["pixel_values"].shape[0] for it in items] == [1, 1, 1]
    assert sorted(it["caption"] for it in items) == [f"folder picture {i}" for i in range(3)]


def test_mapping_flags_rename_columns(tmp_path):
    """A Pick-a-Pic table with renamed columns trains through the mapping flags."""
    import pyarrow.parquet as pq

    path = synth.write_synthetic_pickapic(tmp_path / "d", n_pairs=4, ties=1)
    table = pq.read_table(path)
    table = table.rename_columns(["left", "right", "pref", "text_prompt", "m0", "m1"])
    pq.write_table(table, path)
    with pytest.raises(DataLayoutError) as err:
        load_pairs(_source(tmp_path / "d", data_layout="pickapic"))
    msg = str(err.value)
    for part in ("--image_0_column", "--label_column", "--caption_column", "'pref'", "'left'"):
        assert part in msg, (part, msg)
    columns = {
        "image_0_column": "left",
        "image_1_column": "right",
        "label_column": "pref",
        "caption_column": "text_prompt",
    }
    ds, info = load_pairs(_source(tmp_path / "d", data_layout="pickapic", columns=columns))
    assert (info["pairs"], info["ties_dropped"]) == (4, 1)
    assert ds[0]["caption"] == "picture number 0"


def test_misnamed_flag_column_is_one_error(tmp_path):
    synth.write_synthetic_scores(tmp_path / "d")
    with pytest.raises(DataLayoutError) as err:
        load_pairs(_source(tmp_path / "d", columns={"score_0_column": "votes_1"}))
    msg = str(err.value)
    assert "--score_0_column 'votes_1' (not a column)" in msg and "'votes_image1'" in msg


def test_dreamlike_pairs_only(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = synth.write_synthetic_pickapic(tmp_path / "d", n_pairs=6)
    table = pq.read_table(path)
    models = ["dreamlike-photoreal-2.0", "sdxl"]
    m0 = [models[i % 2] for i in range(6)]
    m1 = [models[(i // 2) % 2] for i in range(6)]  # both dreamlike: rows 0 and 4
    table = table.set_column(4, "model_0", pa.array(m0)).set_column(5, "model_1", pa.array(m1))
    pq.write_table(table, path)
    ds, info = load_pairs(_source(tmp_path / "d", dreamlike_pairs_only=True))
    assert info["pairs"] == 2 and info["non_dreamlike_dropped"] == 4
    assert list(ds["caption"]) == ["picture number 0", "picture number 4"]
    synth.write_synthetic_chosen_rejected(tmp_path / "c", n_pairs=2)
    # open-image-preferences names its generators chosen_model / rejected_model ('dev', 'sd'):
    # they are read, and no pair is Dreamlike-vs-Dreamlike.
    with pytest.raises(ValueError, match="no usable"):
        load_pairs(_source(tmp_path / "c", dreamlike_pairs_only=True))
    synth.write_synthetic_scores(tmp_path / "s")
    with pytest.raises(ValueError, match="no usable"):
        load_pairs(_source(tmp_path / "s", dreamlike_pairs_only=True))


# ---------------------------------------------------------------------------------------------
# Training on every layout (tiny SD1.5, 2 steps each)

LAYOUT_SETS = {
    "chosen_rejected": (lambda p: synth.write_synthetic_chosen_rejected(p, n_pairs=4), ()),
    "scores": (lambda p: synth.write_synthetic_scores(p), ()),
    "ranked": (lambda p: synth.write_synthetic_hpdv2(p, n_prompts=3), ("--split", "test")),
    "imagefolder_pairs": (lambda p: synth.write_synthetic_imagefolder(p, n=4, pairs=True), ()),
    "sft_imagefolder": (
        lambda p: synth.write_synthetic_imagefolder(p, n=4),
        ("--train_method", "sft"),
    ),
}


LAYOUT_NAMES = {
    "chosen_rejected": "chosen_rejected",
    "scores": "scores",
    "ranked": "ranked",
    "imagefolder_pairs": "chosen_rejected",
    "sft_imagefolder": "images",
}


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model = build_models(root)["sd15"]
    return model, load_unet_state(model)


@pytest.mark.parametrize("name", list(LAYOUT_SETS))
def test_every_layout_trains(tiny_sd15, tmp_path, name):
    import train

    model, start = tiny_sd15
    write, extra = LAYOUT_SETS[name]
    write(tmp_path / "d")
    # Two optimizer steps per layout; the update must move the UNet.
    steps = ("--max_train_steps", "2", "--lr_warmup_steps", "0")
    args = train_args(model, tmp_path / "d", tmp_path / "o", *extra, *steps)
    result = train.main(parse_args(args))
    assert result["global_step"] == 2 and result["data"]["layout"] == LAYOUT_NAMES[name]
    trained = {k: v.detach().cpu() for k, v in result["unet"].state_dict().items()}
    assert max_abs_diff(trained, start) > 0
    assert (tmp_path / "o" / "train_log.jsonl").read_text().count("\n") == 2


def test_wrong_mapping_fails_before_models_load(tiny_sd15, tmp_path, monkeypatch):
    import train
    from sdpo.families import base

    def forbidden(*_, **__):
        raise AssertionError("model weights loaded before the data check")

    monkeypatch.setattr(base.ModelFamily, "load_parts", forbidden)
    synth.write_synthetic_chosen_rejected(tmp_path / "d", n_pairs=4)
    args = train_args(tiny_sd15[0], tmp_path / "d", tmp_path / "o", "--chosen_column", "winner")
    with pytest.raises(DataLayoutError, match=r"--chosen_column 'winner' \(not a column\)"):
        train.main(parse_args(args))


def test_data_flags_validated(tmp_path):
    synth.write_synthetic_scores(tmp_path / "d")
    base = train_args(tmp_path, tmp_path / "d", tmp_path / "o")
    for bad in (["--score_tie_threshold", "-1"], ["--caption_column", " "]):
        with pytest.raises(SystemExit):
            parse_args(base + bad)
    assert parse_args(base + ["--score_tie_threshold", "0.5"]).score_tie_threshold == 0.5


def test_ranked_needs_exactly_one_ranking(tmp_path):
    import json

    path = synth.write_synthetic_hpdv2(tmp_path / "d", n_prompts=2, k=2)
    rows = json.loads(path.read_text())
    for row in rows:
        row["scores"] = [1.0, 0.0]
    path.write_text(json.dumps(rows))
    with pytest.raises(DataLayoutError, match="exactly one of \\['ranks', 'scores'\\] \\(both"):
        load_pairs(_source(tmp_path / "d", split="test", data_layout="ranked"))
