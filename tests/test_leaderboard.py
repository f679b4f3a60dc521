"""eval.leaderboard on three tiny checkpoints x two prompt sets, scored by the tiny scorers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import compare, leaderboard, score

SETS = {"setA": ["a red cube", "a blue sphere", "a green cone"],
        "setB": ["a cat on a mat", "a dog in fog", "two birds", "a small boat"]}  # fmt: skip
METRICS = ["clip", "aesthetics"]


def _eval_folder(folder: Path, shift: int, seeds=(0,)) -> Path:
    """An eval folder as test_sd15.sh writes it: one manifest + image folder per set and seed."""
    rng = np.random.default_rng(shift)
    for prompt_set, prompts in SETS.items():
        for seed in seeds:
            stem = f"{prompt_set}_seed{seed}_32x32_2s_7.5cfg"
            (folder / stem).mkdir(parents=True)
            rows = []
            for i, p in enumerate(prompts):
                px = np.clip(rng.integers(0, 160, (32, 32, 3)) + shift, 0, 255).astype(np.uint8)
                Image.fromarray(px).save(folder / stem / f"{i}_32x32.png")
                rows.append({"prompt": p, "gen_image_path": f"{stem}/{i}_32x32.png",
                             "raw_image_path": "", "metadata": {"index": i, "seed": seed}})  # fmt: skip
            (folder / f"{stem}.json").write_text(json.dumps(rows))
    (folder / "summary_seed0_32x32_2s_7.5cfg.json").write_text("{}")  # not a manifest
    return folder


def test_leaderboard_three_checkpoints_two_sets(tiny_env, tmp_path):
    runs = tmp_path / "runs" / "x"
    folders = [
        _eval_folder(runs / "checkpoint-100" / "eval_sd15", 0),
        _eval_folder(runs / "checkpoint-200" / "eval_sd15", 40),
        _eval_folder(runs / "checkpoint-300" / "eval_sd15", 80, seeds=(0, 1)),
    ]
    out = tmp_path / "board"
    argv = ["--runs", *map(str, folders), "--outdir", str(out), "--metrics", ",".join(METRICS),
            "--device", "cpu", "--batch_size", "8", "--resamples", "300"]  # fmt: skip
    written = leaderboard.main(leaderboard.parse_args(argv))
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert len(rows) == 3 * 2 * 2
    assert {r["run"] for r in rows} == {"checkpoint-100", "checkpoint-200", "checkpoint-300"}
    assert sorted({int(r["step"]) for r in rows}) == [100, 200, 300]

    # the means are those of the score files; checkpoint-300 pools its two seeds per prompt
    def scores(run, prompt_set, seed, metric):
        m = runs / run / "eval_sd15" / f"{prompt_set}_seed{seed}_32x32_2s_7.5cfg.json"
        return [r[metric] for r in score.read_scores(score.scores_path(m))]

    for r in rows:
        seeds = [int(s) for s in r["seeds"].split()]
        per_seed = np.array([scores(r["run"], r["prompt_set"], s, r["metric"]) for s in seeds])
        assert float(r["mean"]) == pytest.approx(per_seed.mean(axis=0).mean())
        assert float(r["mean_ci_low"]) <= float(r["mean"]) <= float(r["mean_ci_high"])
        assert int(r["n_prompts"]) == len(SETS[r["prompt_set"]])
        if r["run"] == "checkpoint-100":  # the baseline (the first run) has no win rate
            assert math.isnan(float(r["win_rate_vs_baseline"]))
            continue
        # the win rate is eval.compare's on the seeds both runs have (seed 0)
        rec = {
            run: score.read_scores(score.scores_path(
                runs / run / "eval_sd15" / f"{r['prompt_set']}_seed0_32x32_2s_7.5cfg.json"))
            for run in (r["run"], "checkpoint-100")
        }  # fmt: skip
        _, summary = compare.compare_records(rec[r["run"]], rec["checkpoint-100"], [r["metric"]])
        assert float(r["win_rate_vs_baseline"]) == pytest.approx(
            summary["metrics"][r["metric"]]["win_rate_a"]
        )
    assert {r["seeds"] for r in rows if r["run"] == "checkpoint-300"} == {"0 1"}

    md = (out / "leaderboard.md").read_text()
    assert "## setA" in md and "## setB" in md and "win " in md and "(baseline)" in md
    page = (out / "leaderboard.html").read_text()
    assert page.count("data:image/png;base64,") == len(METRICS)  # one step plot per metric
    for m in METRICS:
        with Image.open(written[f"{m}_vs_step"]) as im:
            im.load()
            assert im.width > 300 and im.height > 200


def test_leaderboard_errors_and_no_series(tiny_env, tmp_path):
    base = _eval_folder(tmp_path / "base" / "eval_sd15", 0)
    other = _eval_folder(tmp_path / "other" / "eval_sd15", 30)
    with pytest.raises(FileNotFoundError, match="--runs: .*does not exist"):
        leaderboard.discover([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no generation manifest"):
        leaderboard.discover([str(tmp_path / "empty")])
    ms = leaderboard.discover([f"mine={other}", str(base)])
    assert {m.run for m in ms} == {"mine", "base"} and all(m.step is None for m in ms)
    out = tmp_path / "board"
    argv = ["--runs", f"mine={other}", str(base), "--baseline", "base", "--outdir", str(out),
            "--metrics", "clip", "--device", "cpu", "--resamples", "100"]  # fmt: skip
    written = leaderboard.main(leaderboard.parse_args(argv))
    assert "clip_vs_step" not in written  # no training steps: no plot
    with pytest.raises(ValueError, match="--baseline 'zzz'"):
        leaderboard.main(leaderboard.parse_args([*argv, "--baseline", "zzz"]))
