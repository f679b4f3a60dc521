"""A/B win rates on hand-made score files: the rules of metrics.md, checked by hand-counted values."""

from __future__ import annotations

import json
import math

import pytest

from eval import compare
from eval.compare import (
    CompareError,
    averages,
    compare_records,
    compare_runs,
    pair_indices,
    win_stats,
)


def _records(prompts, **metric_values):
    return [
        {"index": i, "prompt": p, **{m: v[i] for m, v in metric_values.items()}}
        for i, p in enumerate(prompts)
    ]


def test_ties_count_half():
    s = win_stats([1.0, 2.0, 3.0, 0.5], [0.0, 2.0, 4.0, 0.5])
    assert (s["n"], s["wins_a"], s["wins_b"], s["ties"]) == (4, 1, 1, 2)
    assert s["win_rate_a"] == (1 + 0.5 * 2) / 4 == 0.5
    assert s["win_rate_b"] == 0.5
    assert s["mean_a"] == pytest.approx(6.5 / 4) and s["mean_b"] == pytest.approx(6.5 / 4)
    # a win is strictly higher: a tiny positive margin counts, equality does not
    s = win_stats([1.0 + 1e-12, 1.0], [1.0, 1.0])
    assert (s["wins_a"], s["ties"], s["win_rate_a"]) == (1, 1, 0.75)


def test_pairing_by_prompt_with_duplicates_in_order():
    a = ["cat", "dog", "cat", "bird", "cat"]
    b = ["dog", "cat", "fish", "cat"]
    pairs, rule = pair_indices(a, b)
    # 1st "cat" of A <-> 1st of B, 2nd <-> 2nd, 3rd has no partner; "bird"/"fish" unpaired
    assert rule == "prompt"
    assert pairs == [(0, 1), (1, 0), (2, 3)]


def test_prompt_pairing_is_exact_string_match():
    pairs, rule = pair_indices(["A cat", "a dog "], ["a cat", "a dog", "A cat"])
    assert rule == "prompt" and pairs == [(0, 2)]


def test_no_common_prompt_pairs_by_index():
    pairs, rule = pair_indices(["a", "b", "c"], ["x", "y"])
    assert rule == "index" and pairs == [(0, 0), (1, 1)]


def test_compare_records_duplicates_and_reordering():
    # B lists the prompts in another order; the duplicate "cat" pairs in order of appearance
    ra = _records(["cat", "dog", "cat", "sun"], m1=[1.0, 5.0, 3.0, 2.0], m2=[0.0, 0.0, 1.0, 1.0])
    rb = _records(["sun", "cat", "dog", "cat"], m1=[2.0, 0.5, 6.0, 4.0], m2=[1.0, 0.0, 1.0, 0.0])
    files, summary = compare_records(ra, rb, ["m1", "m2"], "base", "sdpo")
    # pairs: (cat#1: A0,B1) (dog: A1,B2) (cat#2: A2,B3) (sun: A3,B0)
    assert [(p["index_a"], p["index_b"]) for p in files["m1"]["pairs"]] == [
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 0),
    ]
    # m1: 1>0.5 win A; 5<6 win B; 3<4 win B; 2=2 tie -> (1 + .5)/4
    m1 = files["m1"]
    assert (m1["wins_a"], m1["wins_b"], m1["ties"], m1["n"]) == (1, 2, 1, 4)
    assert m1["win_rate_a"] == 0.375 and m1["label_a"] == "base" and m1["label_b"] == "sdpo"
    assert m1["mean_a"] == pytest.approx(11 / 4) and m1["mean_b"] == pytest.approx(12.5 / 4)
    # m2: 0=0 tie; 0<1 B; 1>0 A; 1=1 tie -> (1 + 1)/4
    assert summary["metrics"]["m2"]["win_rate_a"] == 0.5
    assert summary["macro_win_rate_a"] == pytest.approx((0.375 + 0.5) / 2)
    assert summary["pairing"] == "prompt" and summary["n_pairs"] == 4


def test_macro_vs_micro_with_different_pair_counts():
    per_metric = {
        "m1": win_stats([1, 1, 1, 1], [0, 0, 0, 0]),  # 4 pairs, win rate 1.0
        "m2": win_stats([0], [1]),  # 1 pair, win rate 0.0
        "m3": win_stats([0, 1, 2, 3, 4], [0, 0, 5, 5, 5]),  # 5 pairs: 1 win, 3 losses, 1 tie -> .3
    }
    avg = averages(per_metric)
    assert avg["macro_win_rate_a"] == pytest.approx((1.0 + 0.0 + 0.3) / 3)
    assert avg["micro_win_rate_a"] == pytest.approx((4 + 0 + 1.5) / (4 + 1 + 5))
    assert avg["macro_win_rate_a"] != pytest.approx(avg["micro_win_rate_a"])


def test_missing_metric_is_an_error():
    ra = _records(["a"], m1=[1.0])
    rb = [{"index": 0, "prompt": "a"}]
    with pytest.raises(ValueError, match="m1"):
        compare_records(ra, rb, ["m1"])


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_compare_cli_on_score_files_writes_pair_files_and_summary(tmp_path, capsys):
    # index pairing (no shared prompt), every metric, from .scores.jsonl files (no model needed)
    metrics = ["pickscore", "hpsv2", "clip", "aesthetics", "imagereward"]
    ra = _records(["p0", "p1", "p2"], **{m: [0.1 * k, 0.2, 0.3] for k, m in enumerate(metrics)})
    rb = _records(["q0", "q1", "q2"], **{m: [0.15, 0.2, 0.25] for m in metrics})
    fa = _write_jsonl(tmp_path / "a.scores.jsonl", ra)
    fb = _write_jsonl(tmp_path / "b.scores.jsonl", rb)
    cfg = compare.parse_args(
        [
            "--json_a",
            str(fa),
            "--json_b",
            str(fb),
            "--label_a",
            "base",
            "--label_b",
            "ours",
            "--outdir",
            str(tmp_path / "out"),
            "--no_report",
            "--pair_by_index",
        ]
    )
    summary = compare.main(cfg)
    out = capsys.readouterr().out
    assert "macro win rate base" in out
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["pairing"] == "index" and on_disk["n_pairs"] == 3
    assert math.isclose(on_disk["macro_win_rate_a"], summary["macro_win_rate_a"])
    # metric k: A's first score 0.1k vs 0.15 -> A wins for k >= 2; pair 2 tie; pair 3 A wins
    expected = {m: ((1 if 0.1 * k > 0.15 else 0) + 0.5 + 1) / 3 for k, m in enumerate(metrics)}
    for m in metrics:
        pair_file = json.loads((tmp_path / "out" / f"{m}.json").read_text())
        assert pair_file["win_rate_a"] == pytest.approx(expected[m])
        assert {
            "label_a",
            "label_b",
            "n",
            "wins_a",
            "wins_b",
            "ties",
            "win_rate_a",
            "mean_a",
            "mean_b",
        } <= set(pair_file)
    assert on_disk["macro_win_rate_a"] == pytest.approx(sum(expected.values()) / 5)
    assert on_disk["micro_win_rate_a"] == pytest.approx(sum(expected.values()) / 5)  # equal n


def test_no_common_prompt_is_refused_unless_asked(tmp_path, capsys):
    ra = _records(["p0", "p1"], m1=[1.0, 0.0])
    rb = _records(["q0", "q1"], m1=[0.0, 0.0])
    with pytest.raises(CompareError, match="share no prompt.*--pair_by_index"):
        compare_records(ra, rb, ["m1"])
    _, summary = compare_records(ra, rb, ["m1"], pair_by_index=True)
    assert summary["pairing"] == "index" and summary["metrics"]["m1"]["win_rate_a"] == 0.75
    assert any("paired by position" in w for w in summary["warnings"])
    # the command line: one line on stderr, no traceback, exit status 1, nothing written
    metrics = ["pickscore"]
    fa = _write_jsonl(tmp_path / "a.scores.jsonl", _records(["p0"], pickscore=[1.0]))
    fb = _write_jsonl(tmp_path / "b.scores.jsonl", _records(["q0"], pickscore=[0.0]))
    argv = ["--json_a", str(fa), "--json_b", str(fb), "--metrics", metrics[0]]
    with pytest.raises(SystemExit) as exit_info:
        compare.cli([*argv, "--outdir", str(tmp_path / "out"), "--no_report"])
    msg = str(exit_info.value.code)
    assert msg.startswith("error: ") and "share no prompt" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_unpaired_prompts_and_differing_settings_are_warned_in_the_files(tmp_path, capsys):
    def manifest(folder, prompts, scores, **settings):
        folder.mkdir()
        rows = [
            {"prompt": p, "gen_image_path": f"{i}.png", "metadata": {"index": i, **settings}}
            for i, p in enumerate(prompts)
        ]
        m = folder / "set_seed0.json"
        m.write_text(json.dumps(rows))
        recs = _records(prompts, pickscore=scores)
        _write_jsonl(folder / "set_seed0.scores.jsonl", recs)
        return folder / "set_seed0.scores.jsonl"

    fa = manifest(tmp_path / "a", ["x", "y", "z"], [1.0, 2.0, 3.0], steps=50, cfg=7.5, seed=0)
    fb = manifest(tmp_path / "b", ["x", "y"], [0.0, 5.0], steps=20, cfg=7.5, seed=0)
    out = tmp_path / "out"
    compare.main(
        compare.parse_args(
            [
                "--json_a",
                str(fa),
                "--json_b",
                str(fb),
                "--metrics",
                "pickscore",
                "--outdir",
                str(out),
                "--no_report",
            ]  # fmt: skip
        )
    )
    printed = capsys.readouterr().out
    warnings = json.loads((out / "summary.json").read_text())["warnings"]
    assert any("1 of 3 in A" in w and "0 of 2 in B" in w for w in warnings)
    assert any("steps = 50 for A but 20 for B" in w for w in warnings)
    assert not any("cfg" in w for w in warnings)  # equal settings are not reported
    assert printed.count("WARNING:") == len(warnings) == 2


def test_seeds_pool_per_prompt_and_report_their_spread():
    # two seeds x three prompts; per seed the k-th runs are paired by prompt
    a0 = _records(["p", "q", "r"], m=[1.0, 1.0, 0.0])
    b0 = _records(["r", "q", "p"], m=[1.0, 0.0, 0.0])  # p: win, q: win, r: loss
    a1 = _records(["p", "q", "r"], m=[0.0, 2.0, 2.0])
    b1 = _records(["p", "q", "r"], m=[1.0, 2.0, 0.0])  # p: loss, q: tie, r: win
    files, summary = compare_runs([a0, a1], [b0, b1], ["m"], seeds=[0, 1], resamples=200)
    s = summary["metrics"]["m"]
    assert (s["n"], s["n_prompts"], summary["n_seeds"]) == (6, 3, 2)
    assert (s["wins_a"], s["wins_b"], s["ties"]) == (3, 2, 1)
    assert s["win_rate_a"] == pytest.approx(3.5 / 6)
    # per prompt pooled over seeds: w = (p .5, q .75, r .5), d = (p 0, q .5, r .5)
    assert s["mean_diff"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    seeds = {x["seed"]: x for x in s["per_seed"]}
    assert seeds[0]["win_rate_a"] == pytest.approx(2 / 3) and seeds[1]["win_rate_a"] == 0.5
    assert seeds[0]["mean_diff"] == pytest.approx(1 / 3) and seeds[1]["mean_diff"] == pytest.approx(
        1 / 3
    )
    # sample sd of two values x, y is |x - y| / sqrt(2)
    assert s["seed_sd_win_rate_a"] == pytest.approx((2 / 3 - 0.5) / math.sqrt(2))
    assert s["seed_sd_mean_diff"] == pytest.approx(0.0)
    # sign test over prompts: q won (w > .5), p and r tied at .5 -> 1 win, 0 losses -> p = 1
    assert s["sign_test_p"] == 1.0
    assert {p["seed"] for p in files["m"]["pairs"]} == {0, 1}


def test_ties_as_loss_for_a():
    ra = _records(["a", "b", "c", "d"], m=[1.0, 1.0, 2.0, 0.0])
    rb = _records(["a", "b", "c", "d"], m=[1.0, 1.0, 1.0, 1.0])
    _, half = compare_records(ra, rb, ["m"])
    _, loss = compare_records(ra, rb, ["m"], ties_as_loss_for_a=True)
    assert half["metrics"]["m"]["win_rate_a"] == 0.5
    assert loss["metrics"]["m"]["win_rate_a"] == 0.25 and loss["macro_win_rate_a"] == 0.25
    assert loss["ties_as_loss_for_a"] is True


def test_console_table_stays_aligned_with_long_labels():
    ra = _records(["a", "b"], pickscore=[1.0, 0.0], clip=[0.5, 0.5])
    rb = _records(["a", "b"], pickscore=[0.0, 1.0], clip=[0.5, 0.4])
    label = "checkpoint-2000 of a run with a very long name"
    _, summary = compare_records(ra, rb, ["pickscore", "clip"], label, "base")
    lines = compare.format_summary(summary).splitlines()
    table = [ln for ln in lines if " | " in ln]
    assert len(table) == 3 and len({len(ln) for ln in table}) == 1
    # every column separator sits at the same position in every row
    cols = [[i for i, ch in enumerate(ln) if ch == "|"] for ln in table]
    assert cols[0] == cols[1] == cols[2]
    assert f"A = {label}" in compare.format_summary(summary)


@pytest.mark.parametrize("module", ["eval.compare", "eval.score", "eval.leaderboard"])
def test_missing_manifest_is_one_line_without_traceback(module, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    missing = str(tmp_path / "nope.json")
    argv = {
        "eval.compare": ["--json_a", missing, "--json_b", missing],
        "eval.score": ["--manifest", missing],
        "eval.leaderboard": ["--runs", missing, "--outdir", str(tmp_path / "b")],
    }[module]
    r = subprocess.run(
        [sys.executable, "-m", module, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(compare.__file__).resolve().parents[1],
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope.json" in lines[0]
