"""Interop with the official evaluation: its manifests in (image paths relative to the folder the
official script ran in, list-valued ``gen_image_path``), its pair/summary layout out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval import compare

PROMPTS = ["a red cube", "a blue sphere", "a green cone", "a yellow star"]


def _official_run(workdir: Path, name: str, shift: int) -> Path:
    """A manifest as the official test_sd15.py leaves it: paths relative to ``workdir`` (where
    it ran), the manifest itself elsewhere; one entry's path given as a list."""
    rng = np.random.default_rng(shift)
    img_dir = workdir / "output" / name
    img_dir.mkdir(parents=True)
    rows = []
    for i, p in enumerate(PROMPTS):
        px = np.clip(rng.integers(0, 150, (32, 32, 3)) + shift, 0, 255).astype(np.uint8)
        Image.fromarray(px).save(img_dir / f"{i}_32x32.png")
        rel = f"output/{name}/{i}_32x32.png"
        rows.append({"prompt": p, "gen_image_path": [rel] if i == 0 else rel,
                     "raw_image_path": "", "metadata": {}})  # fmt: skip
    manifest = workdir / "manifests" / f"{name}.json"
    manifest.parent.mkdir(exist_ok=True)
    manifest.write_text(json.dumps(rows))
    return manifest


def test_official_manifests_in_and_official_layout_out(tiny_env, tmp_path, monkeypatch):
    work = tmp_path / "official_checkout"
    a = _official_run(work, "sdpo", 60)
    b = _official_run(work, "base", 0)
    out = tmp_path / "cmp"
    argv = ["--json_a", str(a), "--json_b", str(b), "--label_a", "sdpo", "--label_b", "base",
            "--metrics", "clip", "--device", "cpu", "--outdir", str(out)]  # fmt: skip
    # from another folder the relative paths do not resolve: one clear error naming the images
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"8 image\(s\).*missing.*--image_root"):
        compare.main(compare.parse_args([*argv, "--no_report"]))
    # run where the official script ran: the working directory resolves them
    monkeypatch.chdir(work)
    summary = compare.main(compare.parse_args(argv))
    assert summary["n_pairs"] == 4 and summary["pairing"] == "prompt"
    assert (out / "report.html").is_file()
    # or from anywhere, with --image_root
    monkeypatch.chdir(tmp_path)
    again = compare.main(
        compare.parse_args(
            [*argv, "--image_root", str(work), "--no_report", "--outdir", str(tmp_path / "cmp2")]
        )  # fmt: skip
    )
    assert again["metrics"]["clip"]["win_rate_a"] == summary["metrics"]["clip"]["win_rate_a"]

    # out: the official layout, read the way the official summary step reads it
    d = json.loads((out / "official" / "pair_clip.json").read_text())
    ours = json.loads((out / "clip.json").read_text())
    assert (d["model_a"], d["model_b"], d["ties_policy"]) == ("sdpo", "base", "half")
    assert d["total_pairs"] == 4 and d["win_rate_a_over_b"] == ours["win_rate_a"]
    assert (d["wins_a"], d["wins_b"], d["ties"]) == (ours["wins_a"], ours["wins_b"], ours["ties"])
    assert d["mean_score_a"] == ours["mean_a"] and d["mean_score_b"] == ours["mean_b"]
    for r, p in zip(d["results"], ours["pairs"]):
        assert Path(r["image_a"]).is_absolute() and Path(r["image_a"]).is_file()
        assert r["image_a"].endswith(f"output/sdpo/{p['index_a']}_32x32.png")
        assert r["score_a"] == p["score_a"] and r["prompt"] == p["prompt"]
        assert r["winner"] in ("sdpo", "base", "tie")
    s = json.loads((out / "official" / "summary.json").read_text())
    assert s["pair"] == {"model_a": "sdpo", "model_b": "base", "ties_policy": "half"}
    assert s["metrics"][0]["metric"] == "CLIP"
    assert s["metrics"][0]["win_rate_a_over_b"] == d["win_rate_a_over_b"]
    assert s["averages"]["macro_win_rate_a_over_b"] == pytest.approx(d["win_rate_a_over_b"])


def test_official_layout_ties_policy_and_pair_files():
    from eval.official import official_pair_file, official_summary

    ra = [{"prompt": "x", "clip": 1.0}, {"prompt": "y", "clip": 1.0}]
    rb = [{"prompt": "x", "clip": 1.0}, {"prompt": "y", "clip": 0.0}]
    files, _ = compare.compare_records(ra, rb, ["clip"], "A", "B", ties_as_loss_for_a=True)
    d = official_pair_file({**files["clip"], "ties_as_loss_for_a": True}, {}, {})
    assert d["ties_policy"] == "loss_for_a" and d["win_rate_a_over_b"] == 0.5
    assert [r["winner"] for r in d["results"]] == ["tie", "A"]
    two = official_summary({"clip": d, "pickscore": {**d, "win_rate_a_over_b": 1.0,
                                                     "total_pairs": 6}})  # fmt: skip
    assert two["averages"]["macro_win_rate_a_over_b"] == pytest.approx(0.75)
    assert two["averages"]["micro_win_rate_a_over_b"] == pytest.approx((0.5 * 2 + 6) / 8)
