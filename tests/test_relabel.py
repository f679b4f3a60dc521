"""Relabelling with a reward model: offline (eval.relabel: flips / drops exactly the pairs a
deterministic scorer disagrees with, cached by image bytes) and online (train.py --choice_model,
all five metrics)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

import eval.relabel as R
from eval.scorers import Scorer
from sdpo.data import Augment
from sdpo.data.pairs import PreferencePairs, RewardChooser
from sdpo.testing.data import write_graded_pickapic

# Row i: (brightness of jpg_0, of jpg_1), human label. Brightness disagrees on rows 1, 4, 6;
# row 7 is a reward tie (equal brightness): never a disagreement.
LEVELS = [(200, 60), (200, 60), (60, 200), (190, 80), (70, 180), (60, 200), (80, 190), (120, 120)]
LABELS = [1, 0, 0, 1, 1, 0, 1, 1]
DISAGREE = {1, 4, 6}


pytestmark = pytest.mark.usefixtures("one_thread")


class BrightnessScorer(Scorer):
    """Deterministic reward: the mean pixel value (ignores the prompt); counts its images."""

    name = "brightness"
    seen = 0

    def _score_batch(self, images, prompts):
        BrightnessScorer.seen += len(images)
        import numpy as np

        return torch.tensor([float(np.asarray(im).mean()) for im in images])


def _factory(metric, device="cpu", batch_size=16, **weights):
    return BrightnessScorer(device=device, batch_size=batch_size)


@pytest.fixture
def data(tmp_path):
    write_graded_pickapic(tmp_path / "d", LEVELS, LABELS)
    return tmp_path / "d"


def _args(data, out, *extra):
    # min_gap 5: the equal-brightness row's random texture must stay a reward tie.
    return ["--train_data_dir", str(data), "--outdir", str(out), "--min_gap", "5", *extra]


def _rows(out):
    return sorted(
        (r for p in (out / "data").glob("*.parquet") for r in pq.read_table(p).to_pylist()),
        key=lambda r: int(r["caption"].split()[-1]),
    )


def test_flip_flips_exactly_the_disagreeing_pairs(data, tmp_path):
    out = tmp_path / "flip"
    summary = R.main(R.parse_args(_args(data, out, "--action", "flip")), _factory)
    rows = _rows(out)
    assert len(rows) == len(LEVELS)
    flipped = {i for i, r in enumerate(rows) if r["label_0"] != r["human_label_0"]}
    assert flipped == DISAGREE and summary["flipped"] == 3
    assert [r["human_label_0"] for r in rows] == LABELS
    assert rows[7]["reward_label_0"] == 0.5 and rows[7]["label_0"] == 1
    for i, r in enumerate(rows):
        brighter_first = LEVELS[i][0] > LEVELS[i][1]
        if i != 7:
            assert r["label_0"] == float(brighter_first)
            assert (r["reward_0"] > r["reward_1"]) == brighter_first


def test_drop_and_cache(data, tmp_path):
    out = tmp_path / "drop"
    BrightnessScorer.seen = 0
    R.main(R.parse_args(_args(data, out, "--action", "drop", "--batch_size", "3")), _factory)
    assert BrightnessScorer.seen == 2 * len(LEVELS)
    rows = _rows(out)
    assert [int(r["caption"].split()[-1]) for r in rows] == [
        i for i in range(len(LEVELS)) if i not in DISAGREE
    ]
    assert all(r["label_0"] == r["human_label_0"] for r in rows)
    # Another action on the same images: every score comes from the cache.
    BrightnessScorer.seen = 0
    summary = R.main(R.parse_args(_args(data, out, "--action", "label")), _factory)
    assert BrightnessScorer.seen == 0 and summary["images_scored"] == 0
    assert len(_rows(out)) == len(LEVELS) and summary["disagree"] == 3


def test_relabelled_folder_trains(data, tmp_path):
    import train
    from sdpo.config import parse_args
    from sdpo.testing.tiny import build_tiny_sd15
    from tests.train_fixtures import train_args

    R.main(R.parse_args(_args(data, tmp_path / "r", "--action", "flip")), _factory)
    model = build_tiny_sd15(tmp_path / "m")
    args = train_args(model, tmp_path / "r", tmp_path / "o", "--max_train_steps", "1")
    result = train.main(parse_args(args))
    assert result["global_step"] == 1 and result["data"]["pairs"] == len(LEVELS)


def test_choice_model_orders_pairs_online(data, monkeypatch):
    """--choice_model: the reward model's preferred image comes first whatever the label."""
    from sdpo.data import DataSource
    from sdpo.data.pickapic import load_pairs

    monkeypatch.setattr(RewardChooser, "scorer", lambda self: BrightnessScorer())
    ds, _ = load_pairs(DataSource(train_data_dir=str(data)))
    augment = Augment(resolution=16, seed=0, hflip=False)
    plain = PreferencePairs(ds, augment)
    chosen = PreferencePairs(ds, augment, chooser=RewardChooser("pickscore"))
    for i in range(len(ds)):
        w, lo = chosen[i]["pixel_values"]
        if i != 7:
            assert w.mean() > lo.mean()
        swapped = not torch.equal(chosen[i]["pixel_values"], plain[i]["pixel_values"])
        assert swapped == (i in DISAGREE)
    sft = PreferencePairs(ds, augment, paired=False, chooser=RewardChooser("pickscore"))
    assert torch.equal(sft[1]["pixel_values"][0], chosen[1]["pixel_values"][0])


@pytest.fixture(scope="module")
def tiny_scorer_env(tmp_path_factory):
    from eval.tiny_scorers import build_tiny_scorers

    return build_tiny_scorers(tmp_path_factory.mktemp("scorers"))


@pytest.mark.parametrize("metric", ["pickscore", "hps", "clip", "aes", "imagereward"])
def test_choice_model_all_five_metrics(metric, tiny_scorer_env, monkeypatch):
    """Every metric (and the official aliases) loads through its real path and decides."""
    from PIL import Image

    for key, value in tiny_scorer_env.items():
        monkeypatch.setenv(key, value)
    chooser = RewardChooser(metric, device="cpu")
    a = Image.new("RGB", (40, 40), (250, 20, 20))
    b = Image.new("RGB", (40, 40), (20, 20, 250))
    scores = chooser.scorer().score([a, b], ["a red square"] * 2)
    assert chooser.swap(a, b, "a red square") == bool(scores[1] > scores[0])
    assert chooser.swap(b, a, "a red square") == bool(scores[0] > scores[1])


def test_train_with_choice_model(data, tmp_path, tiny_scorer_env, monkeypatch):
    import train
    from sdpo.config import parse_args
    from sdpo.testing.tiny import build_tiny_sd15
    from tests.train_fixtures import train_args

    for key, value in tiny_scorer_env.items():
        monkeypatch.setenv(key, value)
    model = build_tiny_sd15(tmp_path / "m")
    args = train_args(
        model, data, tmp_path / "o", "--max_train_steps", "1", "--choice_model", "aes"
    )
    assert train.main(parse_args(args))["global_step"] == 1
    with pytest.raises(SystemExit):
        parse_args(train_args(model, data, tmp_path / "o", "--choice_model", "nope"))


def test_choice_model_in_a_loader_worker(data, monkeypatch):
    """The chooser crosses into DataLoader workers (pickled without its scorer, rebuilt there)."""
    import pickle

    from sdpo.data import DataSource
    from sdpo.data.pairs import collate_pairs, make_loader
    from sdpo.data.pickapic import load_pairs

    chooser = RewardChooser("pickscore")
    chooser._scorer = BrightnessScorer()
    assert pickle.loads(pickle.dumps(chooser))._scorer is None
    monkeypatch.setattr(RewardChooser, "scorer", lambda self: BrightnessScorer())
    ds, _ = load_pairs(DataSource(train_data_dir=str(data)))
    pairs = PreferencePairs(ds, Augment(resolution=16, seed=0, hflip=False), chooser=chooser)
    loader, _ = make_loader(pairs, seed=0, batch_size=2, num_workers=1, collate_fn=collate_pairs)
    for batch in loader:
        winners, losers = batch["pixel_values"].chunk(2)
        for k, row in enumerate(batch["index"].tolist()):
            if row != 7:
                assert winners[k].mean() > losers[k].mean()
