"""The CPU toy demo (experiments/toy/): its pieces, and a reduced end-to-end run through the
training loop."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from experiments.toy import config, report, runs, task
from experiments.toy.__main__ import main


def test_pairs_follow_pickapic_schema_and_preference(tmp_path):
    rows = task.make_pairs(12, size=16, seed=3)
    path = task.write_parquet(rows, tmp_path / "d" / "pairs.parquet")
    back = task.load_pairs(path.parent)
    assert len(back) == 12
    assert {"jpg_0", "jpg_1", "label_0", "caption"} <= set(back[0])
    assert {r["label_0"] for r in back} == {0.0, 1.0}  # both orders occur: the swap is exercised
    winners, losers, captions = task.winner_loser_arrays(back)
    assert winners.shape == losers.shape == (12, 3, 16, 16)
    assert winners.min() >= -1.0 and winners.max() <= 1.0
    assert all(c.startswith("a ") and c.endswith(" background") for c in captions)
    # The programmatic preference: the loser is the winner's picture made worse; a noisy loser
    # has more high-frequency energy than its winner, a blurry one less.
    for row, w, lo in zip(back, winners, losers):
        hf_w = np.abs(np.diff(w, axis=-1)).mean()
        hf_l = np.abs(np.diff(lo, axis=-1)).mean()
        assert (hf_l > hf_w) if row["loser_kind"] == "noisy" else (hf_l < hf_w)
    # Same seed, same data (the demo's runs share one dataset).
    assert task.make_pairs(3, size=16, seed=3)[0]["jpg_0"] == rows[0]["jpg_0"]


def test_bad_settings_fail_before_work():
    with pytest.raises(SystemExit):
        config.parse_args(["--beta", "dspo=-1"])
    with pytest.raises(SystemExit):
        config.parse_args(["--methods", "ppo"])
    with pytest.raises(SystemExit):
        config.parse_args(["--loser_kinds", "ugly"])
    cfg = config.parse_args(["--beta", "2000", "dspo=0.5", "--mu", "0.5"])
    assert cfg.betas == {"diffusion-dpo": 2000.0, "dspo": 0.5, "dmpo": 2000.0}
    assert set(cfg.mus.values()) == {0.5}


def test_heldout_metrics_sign_conventions():
    import torch

    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 8, 4, 4, 4, generator=g)  # 2 draws, 4 pairs
    ref = target + 0.5 * torch.randn(target.shape, generator=g)
    worse_losers = ref.clone()
    worse_losers[:, 4:] += 0.3  # the policy got worse on losers only: margin > 0
    m = runs.heldout_metrics(worse_losers, ref, target, mu=0.0)
    assert m["winner_diff"] == pytest.approx(0.0, abs=1e-7)
    assert m["loser_diff"] > 0 and m["margin"] == pytest.approx(m["loser_diff"])
    assert m["implicit_acc"] == 1.0
    same = runs.heldout_metrics(ref, ref, target, mu=0.0)
    assert same["margin"] == 0.0 and same["implicit_acc"] == 0.0  # u > 0 strictly, as logged


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    cfg = config.parse_args(["--outdir", str(out), "--quick"])
    curves = main(cfg)
    return out, cfg, curves


def test_quick_run_writes_curves_plots_and_summary(quick_run):
    from PIL import Image

    out, cfg, curves = quick_run
    on_disk = json.loads((out / "curves.json").read_text())
    assert on_disk["final"] == curves["final"]
    assert set(on_disk) >= {"settings", "reference", "runs", "aggregate", "final"}
    n_points = cfg.steps // cfg.eval_every + 1  # step 0 (the SFT start) and every checkpoint
    assert len(on_disk["runs"]) == len(config.METHODS) * 2 * cfg.seeds
    for run in on_disk["runs"].values():
        assert run["heldout"]["step"] == list(range(0, cfg.steps + 1, cfg.eval_every))
        for key in report.HELDOUT_KEYS:
            assert len(run["heldout"][key]) == n_points
        assert run["heldout"]["winner_diff"][0] == 0.0  # the start is the reference
        assert len(run["train"]["loss"]) == cfg.steps  # one train_log.jsonl row per step
        assert (out / "runs" / runs.run_name(run["method"], run["safeguard"], run["seed"])
                / "unet.pth").is_file()  # fmt: skip
    for method in config.METHODS:
        for setting in ("off", "on"):
            band = on_disk["aggregate"][method][setting]["winner_diff"]
            assert set(band) == {"mean", "std", "min", "max"}
            assert len(band["mean"]) == n_points
    for name in ("errors.png", "margin.png"):
        with Image.open(out / name) as img:
            img.load()
            assert img.size[0] > 600 and img.size[1] > 400
    summary = (out / "summary.md").read_text()
    assert "| method | β | safeguard (μ) |" in summary
    for method in config.METHODS:
        assert f"| {method} | " in summary


def test_quick_run_goes_through_the_trainer_and_the_safeguard(quick_run):
    out, cfg, curves = quick_run
    for run in curves["runs"].values():
        lam = np.array(run["train"]["loser_scale"])
        if run["safeguard"]:
            # The safeguard acted: λ < 1 on every step (≈ 0.1 at μ = 0.9 for DPO / DMPO).
            assert (lam < 1.0).all()
        else:
            assert (lam == 1.0).all()
        log = (out / "runs" / runs.run_name(run["method"], run["safeguard"], run["seed"])
               / "train_log.jsonl").read_text().splitlines()  # fmt: skip
        assert json.loads(log[-1])["step"] == cfg.steps


def test_safeguard_keeps_the_winner_error_below_plain_training(quick_run):
    """Only the directional results measured robust across seeds at this reduced scale.

    Measured with this --quick config over seeds 0-5 (held-out winner error minus reference,
    x1e-3, safeguard off -> on): diffusion-dpo +0.2/+2.5/+3.8/-0.7/+0.8/+0.4 -> -24.2/-18.2/
    -20.0/-22.6/-18.8/-24.7; dmpo +2.4/+2.0/+5.9/-1.1/+2.1/+0.2 -> -21.9/-18.4/-19.7/-20.8/
    -20.5/-20.8; dspo +11.8/+6.9/+7.6/+11.5/+8.7/+11.8 -> +5.8/+0.2/+2.2/+4.9/+2.9/+5.1.
    So: with the safeguard the winner's error is below the unguarded run's for all three
    losses (6/6 seeds), and falls for DPO and DMPO (6/6). NOT robust at this scale, so not
    asserted: the unguarded winner error rising (5/6 seeds for DPO and DMPO) and the sign of
    the margin. The full-scale results (3 seeds, 100 steps) are in docs/toy.md.
    """
    _, _, curves = quick_run
    final = {(r["method"], r["safeguard"]): r for r in curves["final"]}
    for method in config.METHODS:
        guarded, plain = final[(method, True)], final[(method, False)]
        assert guarded["winner_diff_mean"] < plain["winner_diff_mean"], method
    for method in ("diffusion-dpo", "dmpo"):
        assert final[(method, True)]["winner_diff_mean"] < 0, method


def test_summary_numbers_match_the_curves(quick_run):
    out, _, curves = quick_run
    summary = (out / "summary.md").read_text()
    row = next(r for r in curves["final"] if r["method"] == "diffusion-dpo" and r["safeguard"])
    assert f"{row['winner_diff_mean'] * 1e3:+.1f}" in summary


def test_jpeg_bytes_decode_to_the_drawn_picture():
    from PIL import Image

    img = task.draw_scene("red", "circle", "blue", (0.5, 0.5), 0.3, 16)
    back = np.asarray(Image.open(io.BytesIO(task._jpeg_bytes(img))).convert("RGB"), np.float32)
    assert np.abs(back - np.asarray(img, np.float32)).mean() < 6.0
